"""Vendor portal: the vendor's members and invitations, and the page an invitee accepts on.

The same pages as the customer console's (``marketplace/console/views.py``), for a vendor's
roles; the rules live in ``vendors.members``.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from marketplace.console.access import AuthenticatedHttpRequest
from marketplace.selectors import user_emails
from vendors import selectors
from vendors.members import (
    vendor_invitation_accept,
    vendor_invitation_create,
    vendor_invitation_revoke,
    vendor_membership_remove,
    vendor_membership_set_role,
)
from vendors.models import VendorMembership
from vendors.portal.forms import VendorInviteForm, VendorRoleForm
from vendors.portal.views import VendorContext, _context, _message, vendor_view
from vendors.services import VendorError


def _members_page(
    request: AuthenticatedHttpRequest,
    ctx: VendorContext,
    invite_form: VendorInviteForm | None = None,
) -> HttpResponse:
    members = selectors.vendor_members(vendor=ctx.vendor)
    can_grant_owner = ctx.membership.role == VendorMembership.Role.OWNER
    manage = ctx.can["members_manage"]
    for member in members:
        member.role_form = VendorRoleForm(  # type: ignore[attr-defined]
            initial={"role": member.role}, auto_id=f"id_m{member.pk}_%s"
        )
        member.manageable = manage and (  # type: ignore[attr-defined]
            member.role != VendorMembership.Role.OWNER or can_grant_owner
        )
    return render(
        request,
        "portal/members.html",
        _context(
            ctx,
            members=members,
            invitations=selectors.vendor_invitations_open(vendor=ctx.vendor) if manage else [],
            invite_form=invite_form or VendorInviteForm(can_grant_owner=can_grant_owner),
            can_grant_owner=can_grant_owner,
        ),
    )


@vendor_view("members.view")
def members(request: AuthenticatedHttpRequest, ctx: VendorContext) -> HttpResponse:
    """The team; owners and admins invite by email here (POST)."""
    if request.method != "POST":
        return _members_page(request, ctx)
    if not ctx.can["members_manage"]:
        raise PermissionDenied("Only owners and admins invite members.")
    form = VendorInviteForm(
        request.POST, can_grant_owner=ctx.membership.role == VendorMembership.Role.OWNER
    )
    if form.is_valid():
        try:
            created = vendor_invitation_create(
                actor=request.user,
                vendor=ctx.vendor,
                email=form.cleaned_data["email"],
                role=form.cleaned_data["role"],
                site_url=request.build_absolute_uri("/"),
            )
        except VendorError as exc:
            form.add_error("email", _message(exc))
        else:
            messages.success(request, f"Invitation sent to {created.invitation.email}.")
            return redirect("portal:members", ctx.vendor.slug)
    return _members_page(request, ctx, invite_form=form)


def _member_or_404(ctx: VendorContext, pk: int) -> VendorMembership:
    member = selectors.vendor_member(vendor=ctx.vendor, pk=pk)
    if member is None:
        raise Http404("No such member")
    return member


@require_POST
@vendor_view("members.manage")
def member_role(request: AuthenticatedHttpRequest, ctx: VendorContext, pk: int) -> HttpResponse:
    member = _member_or_404(ctx, pk)
    form = VendorRoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose one of the roles.")
    else:
        try:
            updated = vendor_membership_set_role(
                actor=request.user, membership=member, role=form.cleaned_data["role"]
            )
        except VendorError as exc:
            messages.error(request, _message(exc))
        else:
            messages.success(request, f"{member.user.email} is now {updated.get_role_display()}.")
    return redirect("portal:members", ctx.vendor.slug)


@require_POST
@vendor_view("members.view")
def member_remove(request: AuthenticatedHttpRequest, ctx: VendorContext, pk: int) -> HttpResponse:
    """Remove a member (owners and admins), or leave (anyone, for themselves)."""
    member = _member_or_404(ctx, pk)
    leaving = member.user_id == request.user.pk
    if not leaving and not ctx.can["members_manage"]:
        raise PermissionDenied("Only owners and admins remove members.")
    try:
        vendor_membership_remove(actor=request.user, membership=member)
    except VendorError as exc:
        messages.error(request, _message(exc))
        return redirect("portal:members", ctx.vendor.slug)
    if leaving:
        messages.success(request, f"You left {ctx.vendor.name}.")
        return redirect(reverse("portal:index") + "?all")
    messages.success(request, f"{member.user.email} was removed.")
    return redirect("portal:members", ctx.vendor.slug)


@require_POST
@vendor_view("members.manage")
def invitation_withdraw(
    request: AuthenticatedHttpRequest, ctx: VendorContext, pk: int
) -> HttpResponse:
    invitation = selectors.vendor_invitation(vendor=ctx.vendor, pk=pk)
    if invitation is None:
        raise Http404("No such invitation")
    try:
        vendor_invitation_revoke(actor=request.user, invitation=invitation)
    except VendorError as exc:
        messages.error(request, _message(exc))
    else:
        messages.success(request, f"The invitation to {invitation.email} was withdrawn.")
    return redirect("portal:members", ctx.vendor.slug)


@login_required
def invitation_open(request: AuthenticatedHttpRequest, token: str) -> HttpResponse:
    """The emailed link: shows the invitation, accepts it on POST."""
    invitation = selectors.vendor_invitation_by_token(token)
    if invitation is None:
        raise Http404("No such invitation")
    error = None
    if request.method == "POST":
        try:
            membership = vendor_invitation_accept(token=token, user=request.user)
        except VendorError as exc:
            error = _message(exc)
        else:
            messages.success(request, f"Welcome to {membership.vendor.name}.")
            return redirect("portal:dashboard", membership.vendor.slug)
        invitation.refresh_from_db()
    already = selectors.vendor_membership_for(user=request.user, slug=invitation.vendor.slug)
    return render(
        request,
        "portal/invitation.html",
        {
            "invitation": invitation,
            "matches": invitation.email.lower() in user_emails(request.user),
            "already_member": already is not None,
            "error": error,
        },
    )
