"""The console's entry: a signed-in user without an organisation creates one (or goes to
the vendor portal); every change is in the audit log."""

from __future__ import annotations

import pytest
from django.urls import reverse

from marketplace.models import AuditLogEntry, Membership, Organization
from marketplace.services import console_organization_create
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def user_client(client):  # type: ignore[no-untyped-def]
    user = factories.user()
    client.force_login(user)
    client.user = user
    return client


def test_it_sends_anonymous_visitors_to_log_in(client):
    response = client.get(reverse("console:index"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("account_login"))


def test_it_asks_a_user_without_organisation_to_create_one_or_become_a_vendor(user_client):
    response = user_client.get(reverse("console:index"))

    assert response.status_code == 200
    page = response.content.decode()
    assert "You are not in an organisation yet" in page
    assert 'for="id_name"' in page  # the organisation name has a label
    assert reverse("portal:register") in page


def test_it_offers_both_paths_on_the_home_page(user_client):
    page = user_client.get("/").content.decode()
    assert reverse("console:organization-create") in page
    assert reverse("portal:register") in page


def test_it_creates_an_organisation_owned_by_the_user_and_logs_it(user_client):
    response = user_client.post(reverse("console:organization-create"), {"name": "Acme Labs"})

    org = Organization.objects.get(slug="acme-labs")
    assert response.status_code == 302
    assert response["Location"] == reverse("console:overview", args=[org.slug])
    assert Membership.objects.get(organization=org).role == Membership.Role.OWNER
    entry = AuditLogEntry.objects.get(action="organization.create")
    assert entry.actor == user_client.user and entry.organization == org
    assert entry.target_type == "marketplace.organization" and entry.target_id == str(org.pk)


def test_it_goes_straight_to_the_only_organisation(user_client):
    org = console_organization_create(actor=user_client.user, name="Solo")
    response = user_client.get(reverse("console:index"))
    assert response["Location"] == reverse("console:overview", args=[org.slug])
    assert user_client.get(reverse("console:index") + "?all").status_code == 200


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "This field is required."),
        ("New", "is reserved; choose another name."),
        ("!!!", "gives no usable slug"),
    ],
)
def test_it_shows_why_an_organisation_cannot_be_created(user_client, name, message):
    response = user_client.post(reverse("console:organization-create"), {"name": name})

    assert response.status_code == 200
    page = response.content.decode()
    assert message in page
    assert 'aria-invalid="true"' in page
    assert not Organization.objects.exists()


def test_it_refuses_a_taken_name_on_the_field(user_client):
    factories.organization(name="Taken")
    Organization.objects.filter(name="Taken").update(slug="taken")
    response = user_client.post(reverse("console:organization-create"), {"name": "Taken"})
    assert "exists already" in response.content.decode()


def test_it_hides_an_organisation_from_non_members(user_client):
    other = factories.organization()
    for name in ("overview", "keys", "usage", "credits", "members", "audit"):
        response = user_client.get(reverse(f"console:{name}", args=[other.slug]))
        assert response.status_code == 404, name


def test_it_shows_the_overview_with_the_balance_to_an_owner(user_client):
    org = console_organization_create(actor=user_client.user, name="Rich")
    from billing.money import usd_to_nanos
    from billing.services import credit_grant

    credit_grant(organization=org, amount=usd_to_nanos("5"), reason="welcome")
    page = user_client.get(reverse("console:overview", args=[org.slug])).content.decode()
    assert "$5.000000" in page
    assert "/v1" in page
