"""The vendor portal's members page and the invitation link: owners and admins invite by
email, change roles and remove members; developers see the team; the invitee accepts on
the emailed link with clear messages for used, withdrawn, expired or misdirected links."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from allauth.account.models import EmailAddress
from django.core import mail
from django.urls import reverse
from django.utils import timezone

from tests import factories
from vendors.members import vendor_invitation_create
from vendors.models import VendorInvitation, VendorMembership
from vendors.services import portal_vendor_register

pytestmark = pytest.mark.django_db
Role = VendorMembership.Role


def verified_user(email: str | None = None):  # type: ignore[no-untyped-def]
    user = factories.user(email=email)
    EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
    return user


@pytest.fixture
def owner(client):  # type: ignore[no-untyped-def]
    """The signed-in owner of a vendor (``client.user``, ``client.vendor``)."""
    user = verified_user("owner@vendor.test")
    client.vendor = portal_vendor_register(actor=user, name="Team Models")
    client.user = user
    client.force_login(user)
    return client


def add_member(vendor, role, email=None):  # type: ignore[no-untyped-def]
    return VendorMembership.objects.create(vendor=vendor, user=verified_user(email), role=role)


def members_url(vendor) -> str:  # type: ignore[no-untyped-def]
    return reverse("portal:members", args=[vendor.slug])


def test_it_lists_members_and_offers_the_invitation_form(owner):
    add_member(owner.vendor, Role.DEVELOPER, "dev@example.test")
    page = owner.get(members_url(owner.vendor)).content.decode()
    assert "dev@example.test" in page and "Developer" in page
    assert "owner@vendor.test <span" in page and "(you)" in page
    assert 'for="id_email"' in page and 'for="id_role"' in page
    assert '<option value="owner"' in page  # an owner may invite owners


def test_the_dashboard_and_the_navigation_link_to_members(owner):
    page = owner.get(reverse("portal:dashboard", args=[owner.vendor.slug])).content.decode()
    assert f'href="{members_url(owner.vendor)}"' in page


def test_it_invites_and_the_invitee_joins_from_the_emailed_link(
    owner, client, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = owner.post(
            members_url(owner.vendor), {"email": "New@Example.test", "role": "developer"}
        )
    assert response.status_code == 302
    page = owner.get(members_url(owner.vendor)).content.decode()
    assert "Invitation sent to new@example.test." in page and "new@example.test" in page
    link = re.search(r"https?://\S+/vendor/invitations/\S+/", mail.outbox[0].body).group(0)
    path = link.split("testserver", 1)[1]

    invitee = verified_user("new@example.test")
    client.force_login(invitee)
    page = client.get(path).content.decode()
    assert "Join Team Models" in page and "Accept and join" in page
    response = client.post(path)

    assert response.status_code == 302
    assert response["Location"] == reverse("portal:dashboard", args=[owner.vendor.slug])
    assert VendorMembership.objects.get(vendor=owner.vendor, user=invitee).role == "developer"
    again = client.post(path).content.decode()
    assert "You are a member of Team Models" in again


def test_a_used_link_tells_someone_else_it_was_used(owner, client):
    created = vendor_invitation_create(
        actor=owner.user, vendor=owner.vendor, email="new@example.test", role="developer"
    )
    client.force_login(verified_user("new@example.test"))
    path = reverse("portal:invitation-accept", args=[created.token])
    client.post(path)
    client.force_login(verified_user("other@example.test"))
    page = client.post(path).content.decode()
    assert "This invitation was used already" in page
    assert "Accept and join" not in page


def test_the_link_explains_expired_withdrawn_and_wrong_user(owner, client):
    created = vendor_invitation_create(
        actor=owner.user, vendor=owner.vendor, email="right@example.test", role="admin"
    )
    path = reverse("portal:invitation-accept", args=[created.token])
    client.force_login(verified_user("wrong@example.test"))
    page = client.get(path).content.decode()
    assert "This invitation is for <strong>right@example.test</strong>" in page
    page = client.post(path).content.decode()
    assert "This invitation is for right@example.test; sign in with that" in page
    assert not VendorMembership.objects.filter(user__email="wrong@example.test").exists()

    client.force_login(verified_user("right@example.test"))
    VendorInvitation.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    assert "This invitation expired on" in client.get(path).content.decode()
    assert "This invitation has expired" in client.post(path).content.decode()

    VendorInvitation.objects.update(revoked_at=timezone.now())
    assert "This invitation was withdrawn" in client.get(path).content.decode()
    assert client.get(reverse("portal:invitation-accept", args=["nope"])).status_code == 404
    assert VendorMembership.objects.filter(vendor=owner.vendor).count() == 1


def test_the_link_needs_a_signed_in_user(owner, client):
    created = vendor_invitation_create(
        actor=owner.user, vendor=owner.vendor, email="right@example.test", role="admin"
    )
    client.logout()
    response = client.get(reverse("portal:invitation-accept", args=[created.token]))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"email": "not-an-email", "role": "developer"}, "Enter a valid email address."),
        ({"email": "", "role": "developer"}, "This field is required."),
        ({"email": "x@example.test", "role": "billing"}, "Select a valid choice."),
        ({"email": "owner@vendor.test", "role": "developer"}, "is a member already."),
    ],
)
def test_it_explains_invalid_invitations(owner, data, message):
    response = owner.post(members_url(owner.vendor), data)
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not VendorInvitation.objects.exists()


def test_an_admin_cannot_invite_or_appoint_owners(owner, client):
    admin = add_member(owner.vendor, Role.ADMIN)
    dev = add_member(owner.vendor, Role.DEVELOPER)
    client.force_login(admin.user)
    page = client.get(members_url(owner.vendor)).content.decode()
    assert '<option value="owner"' not in page
    response = client.post(members_url(owner.vendor), {"email": "b@example.test", "role": "owner"})
    assert "Select a valid choice." in response.content.decode()
    url = reverse("portal:member-role", args=[owner.vendor.slug, dev.pk])
    response = client.post(url, {"role": "owner"}, follow=True)
    assert "Only an owner can grant or change the owner role." in response.content.decode()
    dev.refresh_from_db()
    assert dev.role == Role.DEVELOPER
    assert not VendorInvitation.objects.exists()


def test_a_developer_sees_the_team_but_cannot_manage_it(owner, client):
    dev = add_member(owner.vendor, Role.DEVELOPER)
    other = add_member(owner.vendor, Role.ADMIN)
    client.force_login(dev.user)
    page = client.get(members_url(owner.vendor)).content.decode()
    assert "owner@vendor.test" in page and "Invite someone" not in page
    assert f"Leave {owner.vendor.name}" in page
    response = client.post(members_url(owner.vendor), {"email": "x@example.test", "role": "admin"})
    assert response.status_code == 403
    role_url = reverse("portal:member-role", args=[owner.vendor.slug, other.pk])
    assert client.post(role_url, {"role": "developer"}).status_code == 403
    remove_url = reverse("portal:member-remove", args=[owner.vendor.slug, other.pk])
    assert client.post(remove_url).status_code == 403
    other.refresh_from_db()
    assert other.role == Role.ADMIN
    assert not VendorInvitation.objects.exists()


def test_the_owner_changes_roles_removes_members_and_keeps_the_last_owner(owner):
    dev = add_member(owner.vendor, Role.DEVELOPER, "dev@example.test")
    role_url = reverse("portal:member-role", args=[owner.vendor.slug, dev.pk])
    page = owner.post(role_url, {"role": "admin"}, follow=True).content.decode()
    assert "dev@example.test is now Admin." in page
    dev.refresh_from_db()
    assert dev.role == Role.ADMIN

    remove_url = reverse("portal:member-remove", args=[owner.vendor.slug, dev.pk])
    page = owner.post(remove_url, follow=True).content.decode()
    assert "dev@example.test was removed." in page
    assert not VendorMembership.objects.filter(pk=dev.pk).exists()

    mine = VendorMembership.objects.get(user=owner.user)
    my_role = reverse("portal:member-role", args=[owner.vendor.slug, mine.pk])
    page = owner.post(my_role, {"role": "developer"}, follow=True).content.decode()
    assert "A vendor needs at least one owner; appoint another first." in page
    my_removal = reverse("portal:member-remove", args=[owner.vendor.slug, mine.pk])
    page = owner.post(my_removal, follow=True).content.decode()
    assert "A vendor needs at least one owner" in page
    mine.refresh_from_db()
    assert mine.role == Role.OWNER


def test_a_developer_may_leave(owner, client):
    dev = add_member(owner.vendor, Role.DEVELOPER)
    client.force_login(dev.user)
    response = client.post(reverse("portal:member-remove", args=[owner.vendor.slug, dev.pk]))
    assert response.status_code == 302
    assert not VendorMembership.objects.filter(pk=dev.pk).exists()


def test_it_withdraws_an_invitation(owner):
    owner.post(members_url(owner.vendor), {"email": "n@example.test", "role": "developer"})
    invitation = VendorInvitation.objects.get()
    url = reverse("portal:invitation-withdraw", args=[owner.vendor.slug, invitation.pk])
    page = owner.post(url, follow=True).content.decode()
    assert "The invitation to n@example.test was withdrawn." in page
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None


def test_nobody_reaches_another_vendors_team(owner):
    other_owner = verified_user()
    other = portal_vendor_register(actor=other_owner, name="Other Models")
    theirs = add_member(other, Role.DEVELOPER)
    invitation = vendor_invitation_create(
        actor=other_owner, vendor=other, email="z@example.test", role="developer"
    ).invitation
    assert owner.get(members_url(other)).status_code == 404
    remove = reverse("portal:member-remove", args=[owner.vendor.slug, theirs.pk])
    assert owner.post(remove).status_code == 404
    role = reverse("portal:member-role", args=[owner.vendor.slug, theirs.pk])
    assert owner.post(role, {"role": "admin"}).status_code == 404
    withdraw = reverse("portal:invitation-withdraw", args=[owner.vendor.slug, invitation.pk])
    assert owner.post(withdraw).status_code == 404
    theirs.refresh_from_db()
    invitation.refresh_from_db()
    assert theirs.role == Role.DEVELOPER and invitation.revoked_at is None


def test_the_portal_index_lists_invitations_for_the_user(owner, client):
    vendor_invitation_create(
        actor=owner.user, vendor=owner.vendor, email="new@example.test", role="admin"
    )
    client.force_login(verified_user("new@example.test"))
    page = client.get(reverse("portal:index")).content.decode()
    assert "<strong>Team Models</strong> invites you to its vendor team as admin" in page


def test_invitations_is_a_reserved_vendor_name(owner):
    response = owner.post(reverse("portal:register"), {"name": "Invitations"})
    assert "is reserved" in response.content.decode()
