"""Write operations on a vendor's team: invitations by email, roles, removal.

The twin of the customer side's members and invitations (``marketplace/services.py``),
with the same rules and the same pieces: the token scheme and its hash, the verified-email
check, the seven-day lifetime and the audit log. Only owners invite or appoint owners; a
vendor always keeps at least one owner (owners are locked in a fixed order first, so two
owners demoting each other at once cannot leave none).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import transaction
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone

from marketplace.selectors import invitation_token_hash, user_emails
from marketplace.services import INVITATION_TTL, audit_record
from vendors.models import Vendor, VendorInvitation, VendorMembership
from vendors.selectors import vendor_role_allows
from vendors.services import PortalPermissionError, VendorError

Role = VendorMembership.Role


@dataclass(frozen=True)
class CreatedVendorInvitation:
    invitation: VendorInvitation
    token: str  # in the emailed link only; the database keeps its hash


def _require(actor: User, vendor: Vendor, permission: str) -> VendorMembership:
    membership = VendorMembership.objects.filter(vendor=vendor, user=actor).first()
    if membership is None or not vendor_role_allows(membership.role, permission):
        raise PortalPermissionError("your role at this vendor does not allow that")
    return membership


def _normalised_email(email: str) -> str:
    email = email.strip().lower()
    try:
        validate_email(email)
    except ValidationError:
        raise VendorError(f"{email!r} is not an email address") from None
    return email


def _send(invitation: VendorInvitation, link: str) -> None:
    context = {"invitation": invitation, "link": link}
    send_mail(
        subject=render_to_string("email/vendor_invitation_subject.txt", context).strip(),
        message=render_to_string("email/vendor_invitation_message.txt", context),
        from_email=None,
        recipient_list=[invitation.email],
    )


@transaction.atomic
def vendor_invitation_create(
    *, actor: User, vendor: Vendor, email: str, role: str, site_url: str | None = None
) -> CreatedVendorInvitation:
    """Invite ``email`` to ``vendor`` with ``role`` and email the link after commit.

    Only owners invite owners. An open invitation to the same address is replaced (the old
    link stops working); an address that is already a member is refused.
    """
    inviter = _require(actor, vendor, "members.manage")
    email = _normalised_email(email)
    if role not in Role.values:
        raise VendorError(f"unknown role {role!r}")
    if role == Role.OWNER and inviter.role != Role.OWNER:
        raise PortalPermissionError("only an owner can invite another owner")
    if VendorMembership.objects.filter(vendor=vendor, user__email__iexact=email).exists():
        raise VendorError(f"{email} is a member already")
    now = timezone.now()
    VendorInvitation.objects.filter(
        vendor=vendor, email__iexact=email, accepted_at__isnull=True, revoked_at__isnull=True
    ).update(revoked_at=now)
    token = secrets.token_urlsafe(32)
    invitation = VendorInvitation.objects.create(
        vendor=vendor,
        email=email,
        role=role,
        token_hash=invitation_token_hash(token),
        invited_by=actor,
        created_at=now,
        expires_at=now + INVITATION_TTL,
    )
    audit_record(
        actor=actor,
        action="vendor_invitation.create",
        target=invitation,
        details={"vendor": vendor.slug, "email": email, "role": role},
    )
    base = (site_url or settings.SITE_URL).rstrip("/")
    link = base + reverse("portal:invitation-accept", args=[token])
    transaction.on_commit(lambda: _send(invitation, link))
    return CreatedVendorInvitation(invitation=invitation, token=token)


@transaction.atomic
def vendor_invitation_accept(*, token: str, user: User) -> VendorMembership:
    """Join the vendor of an open invitation addressed to one of ``user``'s (verified)
    email addresses. A user who is a member already keeps their role. The token works
    once: a used, withdrawn or expired invitation is refused."""
    invitation = (
        VendorInvitation.objects.select_for_update()
        .filter(token_hash=invitation_token_hash(token))
        .select_related("vendor")
        .first()
    )
    if invitation is None:
        raise VendorError("this invitation is not valid; ask for a new one")
    if invitation.accepted_at is not None:
        raise VendorError("this invitation was used already; each link works once")
    if invitation.revoked_at is not None:
        raise VendorError("this invitation was withdrawn; ask for a new one")
    if not invitation.is_open:
        raise VendorError("this invitation has expired; ask for a new one")
    if invitation.email.lower() not in user_emails(user):
        raise PortalPermissionError(
            f"this invitation is for {invitation.email}; sign in with that (verified) address"
        )
    membership, created = VendorMembership.objects.get_or_create(
        vendor=invitation.vendor, user=user, defaults={"role": invitation.role}
    )
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    audit_record(
        actor=user,
        action="vendor_invitation.accept",
        target=invitation,
        details={
            "vendor": invitation.vendor.slug,
            "email": invitation.email,
            "role": membership.role,
            "joined": created,
        },
    )
    return membership


@transaction.atomic
def vendor_invitation_revoke(*, actor: User, invitation: VendorInvitation) -> VendorInvitation:
    """Withdraw an open invitation (idempotent: a used or withdrawn one is left alone)."""
    _require(actor, invitation.vendor, "members.manage")
    locked = VendorInvitation.objects.select_for_update().get(pk=invitation.pk)
    if locked.accepted_at is None and locked.revoked_at is None:
        locked.revoked_at = timezone.now()
        locked.save(update_fields=["revoked_at"])
        audit_record(
            actor=actor,
            action="vendor_invitation.revoke",
            target=locked,
            details={"vendor": invitation.vendor.slug, "email": locked.email},
        )
    return locked


def _owners_locked(vendor: Vendor) -> list[VendorMembership]:
    """The vendor's owner memberships, locked in a fixed order (no lost last owner)."""
    return list(
        VendorMembership.objects.select_for_update()
        .filter(vendor=vendor, role=Role.OWNER)
        .order_by("pk")
    )


@transaction.atomic
def vendor_membership_set_role(
    *, actor: User, membership: VendorMembership, role: str
) -> VendorMembership:
    """Change a member's role. Only owners grant or take away the owner role, and a vendor
    always keeps at least one owner."""
    acting = _require(actor, membership.vendor, "members.manage")
    if role not in Role.values:
        raise VendorError(f"unknown role {role!r}")
    owners = _owners_locked(membership.vendor)
    locked = VendorMembership.objects.select_for_update().get(pk=membership.pk)
    if locked.role == role:
        return locked
    if Role.OWNER in (role, locked.role) and acting.role != Role.OWNER:
        raise PortalPermissionError("only an owner can grant or change the owner role")
    if locked.role == Role.OWNER and len(owners) == 1:
        raise VendorError("a vendor needs at least one owner; appoint another first")
    previous = locked.role
    locked.role = role
    locked.save(update_fields=["role"])
    audit_record(
        actor=actor,
        action="vendor_membership.role",
        target=locked,
        details={
            "vendor": membership.vendor.slug,
            "user": locked.user.email,
            "from": previous,
            "to": role,
        },
    )
    return locked


@transaction.atomic
def vendor_membership_remove(*, actor: User, membership: VendorMembership) -> None:
    """Remove a member (or let a member leave). The last owner cannot leave."""
    is_self = membership.user_id == getattr(actor, "pk", None)
    acting = membership if is_self else _require(actor, membership.vendor, "members.manage")
    owners = _owners_locked(membership.vendor)
    locked = VendorMembership.objects.select_for_update().filter(pk=membership.pk).first()
    if locked is None:
        return
    if locked.role == Role.OWNER:
        if acting.role != Role.OWNER:
            raise PortalPermissionError("only an owner can remove an owner")
        if len(owners) == 1:
            raise VendorError("a vendor needs at least one owner; appoint another first")
    audit_record(
        actor=actor,
        action="vendor_membership.remove",
        target=locked,
        details={"vendor": membership.vendor.slug, "user": locked.user.email, "role": locked.role},
    )
    locked.delete()
