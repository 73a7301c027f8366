"""Members and invitations: owners and admins invite by email, roles change under rules
(only owners make owners; an organisation keeps an owner), developers cannot manage."""

from __future__ import annotations

import re

import pytest
from allauth.account.models import EmailAddress
from django.core import mail
from django.urls import reverse

from marketplace.models import AuditLogEntry, Invitation, Membership
from marketplace.services import console_organization_create, invitation_create
from tests import factories

pytestmark = pytest.mark.django_db


def verified_user(email: str | None = None):  # type: ignore[no-untyped-def]
    user = factories.user(email=email)
    EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
    return user


@pytest.fixture
def org_owner(client):  # type: ignore[no-untyped-def]
    user = verified_user()
    org = console_organization_create(actor=user, name="Team")
    client.force_login(user)
    client.user, client.org = user, org
    return client


def add_member(org, role, email=None):  # type: ignore[no-untyped-def]
    user = verified_user(email)
    return Membership.objects.create(organization=org, user=user, role=role)


def invite(c, email="new@example.test", role="developer"):  # type: ignore[no-untyped-def]
    with_link = reverse("console:members", args=[c.org.slug])
    return c.post(with_link, {"email": email, "role": role})


def test_it_lists_members_with_their_roles(org_owner):
    add_member(org_owner.org, Membership.Role.BILLING, "bill@example.test")
    page = org_owner.get(reverse("console:members", args=[org_owner.org.slug])).content.decode()
    assert "bill@example.test" in page and "Billing" in page
    assert f"{org_owner.user.email} <span" in page and "(you)" in page
    assert 'for="id_email"' in page and 'for="id_role"' in page


def test_it_invites_by_email_and_the_invitee_joins(
    org_owner, client, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = invite(org_owner, "New@Example.test", "admin")

    assert response.status_code == 302
    invitation = Invitation.objects.get()
    assert invitation.email == "new@example.test" and invitation.role == "admin"
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["new@example.test"]
    link = re.search(r"https?://\S+/console/invitations/\S+/", mail.outbox[0].body).group(0)
    token = link.rstrip("/").rsplit("/", 1)[1]
    assert token not in invitation.token_hash

    invitee = verified_user("new@example.test")
    client.force_login(invitee)
    path = reverse("console:invitation-accept", args=[token])
    assert "Accept and join" in client.get(path).content.decode()
    response = client.post(path)

    assert response.status_code == 302
    assert Membership.objects.get(organization=org_owner.org, user=invitee).role == "admin"
    assert client.post(path).status_code == 200  # used: refused with a message
    actions = set(AuditLogEntry.objects.values_list("action", flat=True))
    assert {"invitation.create", "invitation.accept"} <= actions


def test_it_refuses_an_invitation_to_someone_else(org_owner, client):
    created = invitation_create(
        actor=org_owner.user, organization=org_owner.org, email="right@example.test", role="admin"
    )
    wrong = verified_user("wrong@example.test")
    client.force_login(wrong)
    path = reverse("console:invitation-accept", args=[created.token])

    assert "but you are signed in as wrong@example.test" in client.get(path).content.decode()
    response = client.post(path)

    assert "This invitation is for right@example.test" in response.content.decode()
    assert not Membership.objects.filter(user=wrong).exists()


def test_it_does_not_count_an_unverified_address(org_owner, client):
    created = invitation_create(
        actor=org_owner.user, organization=org_owner.org, email="late@example.test", role="admin"
    )
    unverified = factories.user("late@example.test")
    EmailAddress.objects.create(user=unverified, email=unverified.email, verified=False)
    client.force_login(unverified)
    client.post(reverse("console:invitation-accept", args=[created.token]))
    assert not Membership.objects.filter(user=unverified).exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"email": "not-an-email", "role": "developer"}, "Enter a valid email address."),
        ({"email": "", "role": "developer"}, "This field is required."),
        ({"email": "x@example.test", "role": "emperor"}, "Select a valid choice."),
    ],
)
def test_it_explains_invalid_invitations(org_owner, data, message):
    response = org_owner.post(reverse("console:members", args=[org_owner.org.slug]), data)
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not Invitation.objects.exists()


def test_it_refuses_to_invite_a_member(org_owner):
    response = invite(org_owner, org_owner.user.email)
    assert "is a member already" in response.content.decode()


def test_an_admin_cannot_invite_or_appoint_owners(org_owner, client):
    admin = add_member(org_owner.org, Membership.Role.ADMIN)
    client.force_login(admin.user)
    client.org = org_owner.org
    response = invite(client, "boss@example.test", "owner")
    assert "Select a valid choice." in response.content.decode()
    dev = add_member(org_owner.org, Membership.Role.DEVELOPER)
    client.post(
        reverse("console:member-role", args=[org_owner.org.slug, dev.pk]), {"role": "owner"}
    )
    dev.refresh_from_db()
    assert dev.role == Membership.Role.DEVELOPER


def test_a_developer_cannot_manage_members(org_owner, client):
    dev = add_member(org_owner.org, Membership.Role.DEVELOPER)
    other = add_member(org_owner.org, Membership.Role.BILLING)
    client.force_login(dev.user)
    client.org = org_owner.org
    page = client.get(reverse("console:members", args=[org_owner.org.slug])).content.decode()
    assert "Invite someone" not in page
    assert invite(client).status_code == 403
    role_url = reverse("console:member-role", args=[org_owner.org.slug, other.pk])
    assert client.post(role_url, {"role": "admin"}).status_code == 403
    remove_url = reverse("console:member-remove", args=[org_owner.org.slug, other.pk])
    client.post(remove_url)
    assert Membership.objects.filter(pk=other.pk).exists()
    assert not Invitation.objects.exists()


def test_an_organisation_keeps_its_last_owner(org_owner):
    me = Membership.objects.get(user=org_owner.user)
    role_url = reverse("console:member-role", args=[org_owner.org.slug, me.pk])
    response = org_owner.post(role_url, {"role": "admin"}, follow=True)
    assert "at least one owner" in response.content.decode()
    me.refresh_from_db()
    assert me.role == Membership.Role.OWNER

    remove_url = reverse("console:member-remove", args=[org_owner.org.slug, me.pk])
    response = org_owner.post(remove_url, follow=True)
    assert "at least one owner" in response.content.decode()


def test_an_owner_changes_roles_and_removes_members(org_owner):
    dev = add_member(org_owner.org, Membership.Role.DEVELOPER)
    role_url = reverse("console:member-role", args=[org_owner.org.slug, dev.pk])
    org_owner.post(role_url, {"role": "owner"})
    dev.refresh_from_db()
    assert dev.role == Membership.Role.OWNER

    remove_url = reverse("console:member-remove", args=[org_owner.org.slug, dev.pk])
    org_owner.post(remove_url)
    assert not Membership.objects.filter(pk=dev.pk).exists()
    logged = list(AuditLogEntry.objects.values_list("action", flat=True))
    assert "membership.role" in logged and "membership.remove" in logged


def test_a_member_cannot_touch_another_organisations_members(org_owner):
    stranger = factories.organization()
    theirs = add_member(stranger, Membership.Role.DEVELOPER)
    url = reverse("console:member-remove", args=[org_owner.org.slug, theirs.pk])
    assert org_owner.post(url).status_code == 404
    assert Membership.objects.filter(pk=theirs.pk).exists()


def test_it_withdraws_an_invitation(org_owner):
    invite(org_owner)
    invitation = Invitation.objects.get()
    url = reverse("console:invitation-withdraw", args=[org_owner.org.slug, invitation.pk])
    org_owner.post(url)
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None


def test_a_member_may_leave(org_owner, client):
    dev = add_member(org_owner.org, Membership.Role.DEVELOPER)
    client.force_login(dev.user)
    url = reverse("console:member-remove", args=[org_owner.org.slug, dev.pk])
    response = client.post(url)
    assert response.status_code == 302
    assert not Membership.objects.filter(pk=dev.pk).exists()
