"""Console page of the organisation's privacy guard and response-cache settings."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import redirect, render

from marketplace.console.access import (
    AuthenticatedHttpRequest,
    OrgContext,
    org_template_context,
    org_view,
)
from marketplace.console.forms import DataPolicyForm
from marketplace.console.views import service_message
from marketplace.data_policy import organization_data_policy_update
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
