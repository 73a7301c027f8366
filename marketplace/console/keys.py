"""Console pages for API keys: list, create (the key is shown once), revoke."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render

from marketplace import selectors
from marketplace.console.access import (
    AuthenticatedHttpRequest,
    OrgContext,
    org_template_context,
    org_view,
)
from marketplace.console.forms import ApiKeyForm
from marketplace.console.views import service_message
from marketplace.models import ApiKey
from marketplace.services import ServiceError, console_api_key_create, console_api_key_revoke


@org_view("keys.view")
def key_list(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    keys = selectors.organization_api_keys(organization=ctx.organization)
    return render(
        request,
        "console/keys.html",
        org_template_context(ctx, keys=keys, periods=dict(ApiKey.Period.choices)),
    )


@org_view("keys.manage")
def key_create(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    form = ApiKeyForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            created = console_api_key_create(
                actor=request.user, organization=ctx.organization, **form.service_arguments()
            )
        except ServiceError as exc:
            form.add_error(None, service_message(exc))
        else:
            # Rendered (not redirected to) so the plaintext exists only in this response.
            response = render(
                request,
                "console/key_created.html",
                org_template_context(
                    ctx,
                    key=created.api_key,
                    plaintext=created.plaintext,
                    gateway_url=request.build_absolute_uri("/v1"),
                ),
            )
            response["Cache-Control"] = "no-store"
            return response
    return render(request, "console/key_form.html", org_template_context(ctx, form=form))


@org_view("keys.manage")
def key_revoke(request: AuthenticatedHttpRequest, ctx: OrgContext, pk: int) -> HttpResponse:
    key = selectors.organization_api_key(organization=ctx.organization, pk=pk)
    if key is None:
        raise Http404("No such key")
    if request.method == "POST":
        try:
            console_api_key_revoke(actor=request.user, api_key=key)
        except ServiceError as exc:
            messages.error(request, service_message(exc))
        else:
            messages.success(
                request, f"The key “{key.name}” is revoked; the gateway refuses it from now on."
            )
        return redirect("console:keys", ctx.organization.slug)
    return render(request, "console/key_revoke.html", org_template_context(ctx, key=key))
