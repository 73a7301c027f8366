"""A vendor's team, through its services: invitations by email (single-use hashed tokens
that expire), roles (only owners make owners) and removal (a vendor keeps an owner)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from allauth.account.models import EmailAddress
from django.core import mail
from django.utils import timezone

from marketplace.models import AuditLogEntry
from marketplace.selectors import invitation_token_hash
from tests import factories
from vendors.members import (
    vendor_invitation_accept,
    vendor_invitation_create,
    vendor_invitation_revoke,
    vendor_membership_remove,
    vendor_membership_set_role,
)
from vendors.models import VendorInvitation, VendorMembership
from vendors.services import PortalPermissionError, VendorError, portal_vendor_register

pytestmark = pytest.mark.django_db
Role = VendorMembership.Role


def verified_user(email: str | None = None):  # type: ignore[no-untyped-def]
    user = factories.user(email=email)
    EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
    return user


@pytest.fixture
def team():  # type: ignore[no-untyped-def]
    """A vendor with its owner (who registered it)."""
    owner = verified_user("owner@vendor.test")
    vendor = portal_vendor_register(actor=owner, name="Team Models")
    return vendor, owner


def member(vendor, role, email=None):  # type: ignore[no-untyped-def]
    return VendorMembership.objects.create(vendor=vendor, user=verified_user(email), role=role)


def test_it_invites_by_email_with_a_hashed_single_use_token(
    team, django_capture_on_commit_callbacks
):
    vendor, owner = team
    with django_capture_on_commit_callbacks(execute=True):
        created = vendor_invitation_create(
            actor=owner, vendor=vendor, email=" Dev@Example.TEST ", role=Role.DEVELOPER
        )

    invitation = VendorInvitation.objects.get()
    assert invitation.email == "dev@example.test" and invitation.role == Role.DEVELOPER
    assert invitation.token_hash == invitation_token_hash(created.token)
    assert created.token not in invitation.token_hash
    assert invitation.expires_at - invitation.created_at == timedelta(days=7)
    (message,) = mail.outbox
    assert message.to == ["dev@example.test"]
    assert "Team Models" in message.subject
    assert f"/vendor/invitations/{created.token}/" in message.body
    entry = AuditLogEntry.objects.get(action="vendor_invitation.create")
    assert entry.actor == owner and entry.details["email"] == "dev@example.test"
    assert created.token not in str(entry.details)


def test_the_invitee_joins_once_and_a_replayed_token_is_refused(team):
    vendor, owner = team
    created = vendor_invitation_create(
        actor=owner, vendor=vendor, email="dev@example.test", role=Role.ADMIN
    )
    invitee = verified_user("dev@example.test")

    membership = vendor_invitation_accept(token=created.token, user=invitee)

    assert (membership.vendor, membership.user, membership.role) == (vendor, invitee, Role.ADMIN)
    with pytest.raises(VendorError, match="used already"):
        vendor_invitation_accept(token=created.token, user=invitee)
    other = verified_user("dev2@example.test")
    EmailAddress.objects.create(user=other, email="dev@example.test", verified=False)
    with pytest.raises(VendorError, match="used already"):
        vendor_invitation_accept(token=created.token, user=other)
    assert not VendorMembership.objects.filter(user=other).exists()
    assert AuditLogEntry.objects.filter(action="vendor_invitation.accept").count() == 1


def test_an_expired_invitation_is_refused(team):
    vendor, owner = team
    created = vendor_invitation_create(
        actor=owner, vendor=vendor, email="late@example.test", role=Role.DEVELOPER
    )
    VendorInvitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(VendorError, match="expired"):
        vendor_invitation_accept(token=created.token, user=verified_user("late@example.test"))
    assert VendorMembership.objects.filter(vendor=vendor).count() == 1


def test_it_refuses_the_wrong_user_and_an_unverified_address(team):
    vendor, owner = team
    created = vendor_invitation_create(
        actor=owner, vendor=vendor, email="right@example.test", role=Role.DEVELOPER
    )
    with pytest.raises(PortalPermissionError, match=r"for right@example\.test"):
        vendor_invitation_accept(token=created.token, user=verified_user("wrong@example.test"))
    unverified = factories.user("right@example.test")
    EmailAddress.objects.create(user=unverified, email=unverified.email, verified=False)
    with pytest.raises(PortalPermissionError):
        vendor_invitation_accept(token=created.token, user=unverified)
    assert VendorInvitation.objects.get().accepted_at is None
    with pytest.raises(VendorError, match="not valid"):
        vendor_invitation_accept(token="not-a-token", user=unverified)


def test_a_withdrawn_or_replaced_invitation_stops_working(team):
    vendor, owner = team
    first = vendor_invitation_create(
        actor=owner, vendor=vendor, email="dev@example.test", role=Role.DEVELOPER
    )
    second = vendor_invitation_create(
        actor=owner, vendor=vendor, email="dev@example.test", role=Role.ADMIN
    )
    invitee = verified_user("dev@example.test")
    with pytest.raises(VendorError, match="withdrawn"):
        vendor_invitation_accept(token=first.token, user=invitee)

    vendor_invitation_revoke(actor=owner, invitation=second.invitation)
    vendor_invitation_revoke(actor=owner, invitation=second.invitation)  # idempotent
    with pytest.raises(VendorError, match="withdrawn"):
        vendor_invitation_accept(token=second.token, user=invitee)
    assert AuditLogEntry.objects.filter(action="vendor_invitation.revoke").count() == 1


def test_only_owners_and_admins_invite_and_only_owners_invite_owners(team):
    vendor, owner = team
    admin = member(vendor, Role.ADMIN)
    developer = member(vendor, Role.DEVELOPER)
    with pytest.raises(PortalPermissionError):
        vendor_invitation_create(
            actor=developer.user, vendor=vendor, email="x@example.test", role=Role.DEVELOPER
        )
    with pytest.raises(PortalPermissionError, match="only an owner"):
        vendor_invitation_create(
            actor=admin.user, vendor=vendor, email="x@example.test", role=Role.OWNER
        )
    stranger = verified_user()
    with pytest.raises(PortalPermissionError):
        vendor_invitation_create(
            actor=stranger, vendor=vendor, email="x@example.test", role=Role.DEVELOPER
        )
    assert not VendorInvitation.objects.exists()
    vendor_invitation_create(
        actor=admin.user, vendor=vendor, email="x@example.test", role=Role.ADMIN
    )
    vendor_invitation_create(actor=owner, vendor=vendor, email="y@example.test", role=Role.OWNER)
    assert VendorInvitation.objects.count() == 2


def test_it_refuses_a_member_a_bad_address_and_an_unknown_role(team):
    vendor, owner = team
    with pytest.raises(VendorError, match="member already"):
        vendor_invitation_create(
            actor=owner, vendor=vendor, email="OWNER@vendor.test", role=Role.ADMIN
        )
    with pytest.raises(VendorError, match="not an email address"):
        vendor_invitation_create(actor=owner, vendor=vendor, email="nobody", role=Role.ADMIN)
    with pytest.raises(VendorError, match="unknown role"):
        vendor_invitation_create(actor=owner, vendor=vendor, email="x@example.test", role="billing")
    assert not VendorInvitation.objects.exists()


def test_a_vendor_keeps_its_last_owner(team):
    vendor, owner = team
    mine = VendorMembership.objects.get(vendor=vendor, user=owner)
    with pytest.raises(VendorError, match="at least one owner"):
        vendor_membership_set_role(actor=owner, membership=mine, role=Role.ADMIN)
    with pytest.raises(VendorError, match="at least one owner"):
        vendor_membership_remove(actor=owner, membership=mine)
    mine.refresh_from_db()
    assert mine.role == Role.OWNER

    second = member(vendor, Role.DEVELOPER)
    vendor_membership_set_role(actor=owner, membership=second, role=Role.OWNER)
    vendor_membership_set_role(actor=owner, membership=mine, role=Role.ADMIN)
    assert set(VendorMembership.objects.values_list("role", flat=True)) == {"owner", "admin"}


def test_only_owners_grant_change_or_remove_the_owner_role(team):
    vendor, owner = team
    admin = member(vendor, Role.ADMIN)
    developer = member(vendor, Role.DEVELOPER)
    mine = VendorMembership.objects.get(vendor=vendor, user=owner)
    with pytest.raises(PortalPermissionError):
        vendor_membership_set_role(actor=admin.user, membership=developer, role=Role.OWNER)
    with pytest.raises(PortalPermissionError):
        vendor_membership_set_role(actor=admin.user, membership=mine, role=Role.DEVELOPER)
    with pytest.raises(PortalPermissionError):
        vendor_membership_remove(actor=admin.user, membership=mine)
    with pytest.raises(PortalPermissionError):
        vendor_membership_set_role(actor=developer.user, membership=admin, role=Role.DEVELOPER)
    with pytest.raises(PortalPermissionError):
        vendor_membership_remove(actor=developer.user, membership=admin)

    vendor_membership_set_role(actor=admin.user, membership=developer, role=Role.ADMIN)
    vendor_membership_remove(actor=admin.user, membership=developer)
    assert not VendorMembership.objects.filter(pk=developer.pk).exists()
    actions = list(AuditLogEntry.objects.values_list("action", flat=True))
    assert "vendor_membership.role" in actions and "vendor_membership.remove" in actions


def test_a_member_may_leave_and_an_outsider_cannot_touch_the_team(team):
    vendor, _ = team
    developer = member(vendor, Role.DEVELOPER)
    other_owner = verified_user()
    other = portal_vendor_register(actor=other_owner, name="Other Models")
    with pytest.raises(PortalPermissionError):
        vendor_membership_remove(actor=other_owner, membership=developer)
    vendor_membership_remove(actor=developer.user, membership=developer)
    assert not VendorMembership.objects.filter(pk=developer.pk).exists()
    assert VendorMembership.objects.filter(vendor=other).count() == 1
