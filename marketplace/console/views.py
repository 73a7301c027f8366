"""Console pages: choosing or creating an organisation, its overview, members and invitations."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from billing.selectors import organization_balance_by_id
from marketplace import selectors
from marketplace.console.access import (
    AuthenticatedHttpRequest,
    OrgContext,
    org_template_context,
    org_view,
)
from marketplace.console.forms import InviteForm, OrganizationForm, RoleForm, UsageRangeForm
from marketplace.models import Membership
from marketplace.services import (
    ServiceError,
    console_organization_create,
    invitation_accept,
    invitation_create,
    invitation_revoke,
    membership_remove,
    membership_set_role,
)
from vendors.selectors import vendor_memberships


def service_message(exc: Exception) -> str:
    """A service's reason as a sentence for the page."""
    text = str(exc).strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else f"{text}."


@login_required
def index(request: AuthenticatedHttpRequest) -> HttpResponse:
    """The organisations of the user; a user without one is asked to create one (or to
    register as a vendor), and sees the invitations addressed to them."""
    memberships = selectors.user_memberships(user=request.user)
    invitations = selectors.invitations_for_user(user=request.user)
    if len(memberships) == 1 and not invitations and "all" not in request.GET:
        return redirect("console:overview", memberships[0].organization.slug)
    return render(
        request,
        "console/index.html",
        {
            "memberships": memberships,
            "invitations": invitations,
            "vendor_memberships": vendor_memberships(user=request.user),
            "form": OrganizationForm(),
        },
    )


@login_required
def organization_create(request: AuthenticatedHttpRequest) -> HttpResponse:
    form = OrganizationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            organization = console_organization_create(
                actor=request.user, name=form.cleaned_data["name"]
            )
        except ServiceError as exc:
            form.add_error("name", service_message(exc))
        else:
            messages.success(request, f"{organization.name} is ready. Create an API key next.")
            return redirect("console:overview", organization.slug)
    return render(request, "console/organization_form.html", {"form": form})


@org_view("org.view")
def overview(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    start, end = UsageRangeForm.default_range()
    report = selectors.usage_report(organization=ctx.organization, start=start, end=end)
    keys = selectors.organization_api_keys(organization=ctx.organization)
    balance = organization_balance_by_id(ctx.organization.pk) if ctx.can["billing_view"] else None
    return render(
        request,
        "console/overview.html",
        org_template_context(
            ctx,
            report=report,
            active_keys=sum(1 for key in keys if key.is_active),
            balance=balance,
            gateway_url=request.build_absolute_uri("/v1"),
        ),
    )


def _members_page(
    request: AuthenticatedHttpRequest, ctx: OrgContext, invite_form: InviteForm | None = None
) -> HttpResponse:
    members = selectors.organization_members(organization=ctx.organization)
    can_grant_owner = ctx.role == Membership.Role.OWNER
    for member in members:
        member.role_form = RoleForm(  # type: ignore[attr-defined]
            initial={"role": member.role}, auto_id=f"id_m{member.pk}_%s"
        )
    return render(
        request,
        "console/members.html",
        org_template_context(
            ctx,
            members=members,
            invitations=selectors.organization_invitations_open(organization=ctx.organization)
            if ctx.can["members_manage"]
            else [],
            invite_form=invite_form or InviteForm(can_grant_owner=can_grant_owner),
            can_grant_owner=can_grant_owner,
        ),
    )


@org_view("members.view")
def members(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    if request.method != "POST":
        return _members_page(request, ctx)
    if not ctx.can["members_manage"]:
        raise PermissionDenied("Only owners and admins invite members.")
    form = InviteForm(request.POST, can_grant_owner=ctx.role == Membership.Role.OWNER)
    if form.is_valid():
        try:
            created = invitation_create(
                actor=request.user,
                organization=ctx.organization,
                email=form.cleaned_data["email"],
                role=form.cleaned_data["role"],
                site_url=request.build_absolute_uri("/"),
            )
        except ServiceError as exc:
            form.add_error("email", service_message(exc))
        else:
            messages.success(request, f"Invitation sent to {created.invitation.email}.")
            return redirect("console:members", ctx.organization.slug)
    return _members_page(request, ctx, invite_form=form)


def _member_or_404(ctx: OrgContext, pk: int) -> Membership:
    member = selectors.organization_member(organization=ctx.organization, pk=pk)
    if member is None:
        raise Http404("No such member")
    return member


@require_POST
@org_view("members.manage")
def member_role(request: AuthenticatedHttpRequest, ctx: OrgContext, pk: int) -> HttpResponse:
    member = _member_or_404(ctx, pk)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose one of the roles.")
    else:
        try:
            membership_set_role(
                actor=request.user, membership=member, role=form.cleaned_data["role"]
            )
        except ServiceError as exc:
            messages.error(request, service_message(exc))
        else:
            messages.success(request, f"{member.user.email} is now {member.get_role_display()}.")
    return redirect("console:members", ctx.organization.slug)


@require_POST
@org_view("members.view")
def member_remove(request: AuthenticatedHttpRequest, ctx: OrgContext, pk: int) -> HttpResponse:
    member = _member_or_404(ctx, pk)
    leaving = member.user_id == request.user.pk
    try:
        membership_remove(actor=request.user, membership=member)
    except ServiceError as exc:
        messages.error(request, service_message(exc))
        return redirect("console:members", ctx.organization.slug)
    if leaving:
        messages.success(request, f"You left {ctx.organization.name}.")
        return redirect(reverse("console:index") + "?all")
    messages.success(request, f"{member.user.email} was removed.")
    return redirect("console:members", ctx.organization.slug)


@require_POST
@org_view("members.manage")
def invitation_cancel(request: AuthenticatedHttpRequest, ctx: OrgContext, pk: int) -> HttpResponse:
    invitation = selectors.organization_invitation(organization=ctx.organization, pk=pk)
    if invitation is None:
        raise Http404("No such invitation")
    try:
        invitation_revoke(actor=request.user, invitation=invitation)
    except ServiceError as exc:
        messages.error(request, service_message(exc))
    else:
        messages.success(request, f"The invitation to {invitation.email} was withdrawn.")
    return redirect("console:members", ctx.organization.slug)


@login_required
def invitation_open(request: AuthenticatedHttpRequest, token: str) -> HttpResponse:
    invitation = selectors.invitation_by_token(token)
    if invitation is None:
        raise Http404("No such invitation")
    error = None
    if request.method == "POST":
        try:
            membership = invitation_accept(token=token, user=request.user)
        except ServiceError as exc:
            error = service_message(exc)
        else:
            messages.success(request, f"Welcome to {membership.organization.name}.")
            return redirect("console:overview", membership.organization.slug)
    matches = invitation.email.lower() in selectors.user_emails(request.user)
    return render(
        request,
        "console/invitation.html",
        {"invitation": invitation, "matches": matches, "error": error},
    )


@org_view("audit.view")
def audit(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    page = Paginator(selectors.audit_entries(organization=ctx.organization), 50).get_page(
        request.GET.get("page")
    )
    return render(request, "console/audit.html", org_template_context(ctx, page=page))
