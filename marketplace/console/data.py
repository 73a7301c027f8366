"""Console pages of the privacy guard and response-cache settings (the organisation's and
one key's overrides) and of the organisation's routing policy."""

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
from marketplace.console.forms import DataPolicyForm, KeyDataPolicyForm, RoutingPolicyForm
from marketplace.console.views import service_message
from marketplace.data_policy import (
    api_key_data_policy_update,
    organization_data_policy_update,
    organization_routing_defaults_update,
)
from marketplace.services import ServiceError


@org_view("members.manage")
def data_policy(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    """Privacy policy and cache defaults (owners and admins)."""
    form = DataPolicyForm(request.POST) if request.method == "POST" else None
    if form is not None and form.is_valid():
        try:
            organization_data_policy_update(
                actor=request.user, organization=ctx.organization, **form.service_arguments()
            )
        except ServiceError as exc:
            form.add_error(None, service_message(exc))
        else:
            messages.success(request, "Privacy and cache settings saved.")
            return redirect("console:data-policy", ctx.organization.slug)
    return render(
        request,
        "console/data_policy.html",
        org_template_context(ctx, form=form or DataPolicyForm.for_organization(ctx.organization)),
    )


@org_view("members.manage")
def key_data_policy(request: AuthenticatedHttpRequest, ctx: OrgContext, pk: int) -> HttpResponse:
    """One key's overrides (owners and admins: a key must not weaken the privacy policy
    without them)."""
    key = selectors.organization_api_key(organization=ctx.organization, pk=pk)
    if key is None:
        raise Http404("No such key")
    form = KeyDataPolicyForm(request.POST) if request.method == "POST" else None
    if form is not None and form.is_valid():
        try:
            api_key_data_policy_update(actor=request.user, api_key=key, **form.service_arguments())
        except ServiceError as exc:
            form.add_error(None, service_message(exc))
        else:
            messages.success(request, f"Privacy and cache settings of “{key.name}” saved.")
            return redirect("console:keys", ctx.organization.slug)
    return render(
        request,
        "console/key_data_policy.html",
        org_template_context(ctx, key=key, form=form or KeyDataPolicyForm.for_key(key)),
    )


@org_view("members.manage")
def routing_policy(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    """The provider policy every request of the organisation is routed under (owners and
    admins)."""
    form = RoutingPolicyForm(request.POST) if request.method == "POST" else None
    if form is not None and form.is_valid():
        try:
            organization_routing_defaults_update(
                actor=request.user,
                organization=ctx.organization,
                provider=form.cleaned_data["provider"],
            )
        except ServiceError as exc:
            form.add_error("provider", service_message(exc))
        else:
            messages.success(request, "Routing policy saved.")
            return redirect("console:routing-policy", ctx.organization.slug)
    return render(
        request,
        "console/routing_policy.html",
        org_template_context(
            ctx, form=form or RoutingPolicyForm.for_organization(ctx.organization)
        ),
    )
