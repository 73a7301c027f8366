"""API keys in the console: created with limits and shown once, listed without the secret,
revoked (the gateway is told), and only within the user's own organisation and role."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from marketplace import invalidation
from marketplace.keys import hash_key
from marketplace.models import ApiKey, AuditLogEntry, Membership
from marketplace.redis_client import sync_client
from marketplace.services import api_key_create, console_organization_create
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner(client):  # type: ignore[no-untyped-def]
    user = factories.user()
    org = console_organization_create(actor=user, name="Key Owners")
    client.force_login(user)
    client.user, client.org = user, org
    return client


def member_client(client, org, role):  # type: ignore[no-untyped-def]
    user = factories.user()
    Membership.objects.create(organization=org, user=user, role=role)
    client.force_login(user)
    return client


def published(subscriber, wait: float = 2.0) -> list[str]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + wait
    seen: list[str] = []
    while time.monotonic() < deadline and not seen:
        message = subscriber.get_message(timeout=0.2)
        if message is not None:
            seen.append(message["data"].decode())
    return seen


def key_form(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "backend",
        "scopes": ["chat", "embeddings"],
        "credit_limit_usd": "12.50",
        "credit_limit_period": "monthly",
        "rate_limit_rpm": "120",
        "expires_on": (timezone.now().date() + timedelta(days=30)).isoformat(),
    }
    data.update(overrides)
    return data


def test_it_creates_a_key_with_limits_and_shows_it_once(owner):
    url = reverse("console:key-create", args=[owner.org.slug])
    assert 'for="id_credit_limit_usd"' in owner.get(url).content.decode()

    response = owner.post(url, key_form())

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    page = response.content.decode()
    plaintext = re.search(r'id="new-key" value="([^"]+)"', page).group(1)
    key = ApiKey.objects.get(organization=owner.org)
    assert key.key_hash == hash_key(plaintext)
    assert key.name == "backend" and key.scopes == ["chat", "embeddings"]
    assert key.credit_limit == 12_500_000_000 and key.credit_limit_period == "monthly"
    assert key.rate_limit_rpm == 120
    assert key.expires_at.date() == timezone.now().date() + timedelta(days=30)
    assert key.created_by == owner.user
    assert 'data-copy-target="new-key"' in page

    listing = owner.get(reverse("console:keys", args=[owner.org.slug])).content.decode()
    assert plaintext not in listing
    assert f"sy-{key.prefix}-" in listing and "$12.50 monthly" in listing
    assert "never" in listing  # last used

    entry = AuditLogEntry.objects.get(action="api_key.create")
    assert entry.details["prefix"] == key.prefix and plaintext not in str(entry.details)


def test_it_creates_a_key_without_limits(owner):
    response = owner.post(
        reverse("console:key-create", args=[owner.org.slug]),
        {"name": "plain", "credit_limit_period": "never"},
    )
    assert response.status_code == 200
    key = ApiKey.objects.get()
    assert key.credit_limit is None and key.rate_limit_rpm is None and key.expires_at is None
    assert key.scopes == []


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"name": ""}, "name", "This field is required."),
        ({"credit_limit_usd": "-1"}, "credit_limit_usd", "greater than or equal to 0.01"),
        ({"credit_limit_usd": "abc"}, "credit_limit_usd", "Enter a number."),
        ({"credit_limit_usd": ""}, "credit_limit_period", "Set a credit limit to choose"),
        ({"rate_limit_rpm": "0"}, "rate_limit_rpm", "greater than or equal to 1"),
        (
            {"expires_on": timezone.now().date().isoformat()},
            "expires_on",
            "Choose a day after today.",
        ),
        ({"scopes": ["root"]}, "scopes", "Select a valid choice."),
    ],
)
def test_it_explains_each_invalid_key_field(owner, overrides, field, message):
    response = owner.post(
        reverse("console:key-create", args=[owner.org.slug]), key_form(**overrides)
    )

    assert response.status_code == 200
    page = response.content.decode()
    assert message in page
    assert f'id="id_{field}_error"' in page
    assert not ApiKey.objects.exists()


def test_it_revokes_a_key_and_tells_the_gateways(owner, django_capture_on_commit_callbacks):
    created = api_key_create(organization=owner.org, name="old")
    subscriber = sync_client().pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(invalidation.CHANNEL)
    url = reverse("console:key-revoke", args=[owner.org.slug, created.api_key.pk])
    assert "Revoke the key" in owner.get(url).content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        response = owner.post(url)

    assert response.status_code == 302
    created.api_key.refresh_from_db()
    assert created.api_key.revoked_at is not None
    assert invalidation.key_message(created.api_key.key_hash) in published(subscriber)
    assert AuditLogEntry.objects.filter(action="api_key.revoke").count() == 1
    listing = owner.get(reverse("console:keys", args=[owner.org.slug])).content.decode()
    assert "Revoked" in listing


def test_it_cannot_see_or_revoke_another_organisations_key(owner):
    other = factories.organization()
    theirs = api_key_create(organization=other, name="theirs").api_key
    url = reverse("console:key-revoke", args=[owner.org.slug, theirs.pk])

    assert owner.get(url).status_code == 404
    assert owner.post(url).status_code == 404
    other_url = reverse("console:key-revoke", args=[other.slug, theirs.pk])
    assert owner.post(other_url).status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    listing = owner.get(reverse("console:keys", args=[owner.org.slug])).content.decode()
    assert theirs.prefix not in listing
    assert owner.get(reverse("console:keys", args=[other.slug])).status_code == 404


def test_a_billing_member_sees_keys_but_cannot_create_or_revoke_them(owner, client):
    existing = api_key_create(organization=owner.org, name="prod").api_key
    billing = member_client(client, owner.org, Membership.Role.BILLING)

    listing = billing.get(reverse("console:keys", args=[owner.org.slug]))
    assert listing.status_code == 200 and "prod" in listing.content.decode()
    assert "Create an API key" not in listing.content.decode()
    create_url = reverse("console:key-create", args=[owner.org.slug])
    assert billing.get(create_url).status_code == 403
    assert billing.post(create_url, key_form()).status_code == 403
    revoke_url = reverse("console:key-revoke", args=[owner.org.slug, existing.pk])
    assert billing.post(revoke_url).status_code == 403
    assert ApiKey.objects.filter(revoked_at__isnull=True).count() == 1


def test_a_developer_creates_keys(owner, client):
    developer = member_client(client, owner.org, Membership.Role.DEVELOPER)
    response = developer.post(reverse("console:key-create", args=[owner.org.slug]), key_form())
    assert response.status_code == 200
    assert ApiKey.objects.filter(organization=owner.org).count() == 1


def test_it_marks_expired_keys(owner):
    key = api_key_create(organization=owner.org, name="soon").api_key
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(days=1))
    listing = owner.get(reverse("console:keys", args=[owner.org.slug])).content.decode()
    assert "Expired" in listing
