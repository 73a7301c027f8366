"""The management API (``/api/v1/``): API keys, usage, balance and transactions of an
organisation; endpoints and statements of a vendor. Session and bearer-key access, roles,
DRF-shaped errors, and a schema that describes it all."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from django.utils import timezone
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from billing.money import usd_to_nanos
from billing.services import credit_deduct, credit_grant
from billing.usage import EPOCH, record_events
from marketplace.data_policy import api_key_data_policy_update
from marketplace.models import ApiKey, AuditLogEntry, Membership
from marketplace.services import api_key_create, console_api_key_create, console_organization_create
from tests import factories
from vendors.models import VendorMembership
from vendors.services import portal_vendor_register

pytestmark = pytest.mark.django_db

_ids = itertools.count(1)


@pytest.fixture
def org_owner():  # type: ignore[no-untyped-def]
    user = factories.user()
    org = console_organization_create(actor=user, name="Api Co")
    return user, org


def _session(user) -> APIClient:  # type: ignore[no-untyped-def]
    client = APIClient()
    client.force_login(user)
    return client


def _bearer(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def _usage(org, *, key=None, endpoint=None, cost=0, days_ago=0):  # type: ignore[no-untyped-def]
    at = timezone.now() - timedelta(days=days_ago)
    record_events(
        [
            {
                "rid": f"gen-api-{next(_ids)}",
                "org": org.pk,
                "key": key.pk if key else None,
                "ep": endpoint.pk if endpoint else None,
                "vendor": endpoint.vendor_id if endpoint else None,
                "model": "tag:chat",
                "pt": 10,
                "ct": 5,
                "pin": 1,
                "pout": 2,
                "cost": cost,
                "ms": 42,
                "at": int((at - EPOCH).total_seconds() * 1000),
            }
        ]
    )


# --- keys --------------------------------------------------------------------------------------


def test_it_creates_a_key_shown_once_that_then_authenticates(org_owner):
    user, org = org_owner
    client = _session(user)
    response = client.post(
        f"/api/v1/organizations/{org.slug}/keys/",
        {"name": "ci", "scopes": ["chat"], "credit_limit_nanos": 5, "rate_limit_rpm": 60},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["key"].startswith(f"sy-{body['prefix']}-")
    assert body["scopes"] == ["chat"] and body["credit_limit_nanos"] == 5 and body["active"]
    assert AuditLogEntry.objects.filter(action="api_key.create", organization=org).exists()

    # The plaintext is never listed again; the new key reads the organisation's keys.
    listed = _bearer(body["key"]).get(f"/api/v1/organizations/{org.slug}/keys/")
    assert listed.status_code == 200
    assert [k["prefix"] for k in listed.json()] == [body["prefix"]]
    assert "key" not in listed.json()[0] and body["key"] not in listed.content.decode()

    # Whether a key keeps prompts and completions in its traces is listed (off unless an
    # owner or admin opted it in).
    assert body["log_content"] is False
    api_key_data_policy_update(
        actor=user,
        api_key=ApiKey.objects.get(prefix=body["prefix"]),
        privacy_policy="",
        cache_ttl=None,
        cache_similarity=None,
        log_content=True,
    )
    relisted = _bearer(body["key"]).get(f"/api/v1/organizations/{org.slug}/keys/")
    assert relisted.json()[0]["log_content"] is True


def test_it_refuses_bad_key_input_with_field_errors(org_owner):
    user, org = org_owner
    response = _session(user).post(
        f"/api/v1/organizations/{org.slug}/keys/",
        {"name": "", "scopes": ["root"], "rate_limit_rpm": 0},
        format="json",
    )
    assert response.status_code == 400
    assert set(response.json()) == {"name", "scopes", "rate_limit_rpm"}
    past = _session(user).post(
        f"/api/v1/organizations/{org.slug}/keys/",
        {"name": "late", "expires_at": "2001-01-01T00:00:00Z"},
        format="json",
    )
    assert past.status_code == 400 and "future" in past.json()["detail"]
    assert not ApiKey.objects.filter(organization=org).exists()


def test_it_revokes_a_key_and_the_key_is_refused_from_then_on(org_owner):
    user, org = org_owner
    created = console_api_key_create(actor=user, organization=org, name="old")
    client = _bearer(created.plaintext)
    path = f"/api/v1/organizations/{org.slug}/keys/{created.api_key.pk}/revoke/"
    response = client.post(path)
    assert response.status_code == 200 and response.json()["revoked_at"] is not None
    again = client.post(path)
    assert again.status_code == 401 and again.json() == {
        "detail": "this API key is revoked or expired"
    }
    assert _session(user).post(path).status_code == 200  # idempotent


def test_it_enforces_roles_like_the_console(org_owner):
    user, org = org_owner
    biller = factories.user()
    Membership.objects.create(organization=org, user=biller, role=Membership.Role.BILLING)
    developer = factories.user()
    Membership.objects.create(organization=org, user=developer, role=Membership.Role.DEVELOPER)
    keys = f"/api/v1/organizations/{org.slug}/keys/"

    assert _session(biller).post(keys, {"name": "x"}, format="json").status_code == 403
    assert _session(developer).post(keys, {"name": "x"}, format="json").status_code == 201
    assert _session(developer).get(f"/api/v1/organizations/{org.slug}/balance/").status_code == 403
    assert _session(biller).get(f"/api/v1/organizations/{org.slug}/balance/").status_code == 200

    # A key acts with its creator's role; one with no member behind it only reads.
    biller_key = console_api_key_create(actor=user, organization=org, name="b").api_key
    biller_key.created_by = biller
    biller_key.save(update_fields=["created_by"])
    orphan = api_key_create(organization=org, name="ops-made").plaintext
    assert _bearer(orphan).get(keys).status_code == 200
    assert _bearer(orphan).post(keys, {"name": "y"}, format="json").status_code == 403
    assert ApiKey.objects.filter(organization=org, name__in=["y"]).count() == 0


def test_it_answers_401_with_a_challenge_without_credentials(org_owner):
    _, org = org_owner
    for client in (APIClient(), _bearer("sy-nope-notakey"), _bearer("x" * 500)):
        response = client.get(f"/api/v1/organizations/{org.slug}/keys/")
        assert response.status_code == 401
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert set(response.json()) == {"detail"}


def test_a_key_reaches_only_its_own_organisation(org_owner):
    user, org = org_owner
    other = factories.customer()
    for path in ("keys/", "usage/", "balance/", "transactions/"):
        response = _bearer(other.key).get(f"/api/v1/organizations/{org.slug}/{path}")
        assert response.status_code == 404, path
    # ...even when the key's creator is a member of that other organisation too.
    created = console_api_key_create(actor=user, organization=org, name="mine")
    theirs = console_organization_create(actor=user, name="Other Co")
    response = _bearer(created.plaintext).get(f"/api/v1/organizations/{theirs.slug}/keys/")
    assert response.status_code == 404


def test_it_answers_a_drf_shaped_404_for_any_unknown_api_path(org_owner):
    """Found by schemathesis: a slug with characters a slug cannot have (or an unknown
    path) was answered with the HTML 404 page, which no API client can read."""
    user, _ = org_owner
    client = _session(user)
    for path in (
        "/api/v1/organizations/%0B%F1%B1%B8%AE/keys/",
        "/api/v1/organizations/api-co/keys/1%2C2/revoke/",
        "/api/v1/nothing-here/",
    ):
        for method in ("get", "post", "delete"):
            response = getattr(client, method)(path)
            assert response.status_code == 404, (method, path)
            assert response["Content-Type"] == "application/json"
            assert response.json() == {"detail": "Not found."}


# --- money and usage ---------------------------------------------------------------------------


def test_it_shows_the_balance_and_the_transactions(org_owner):
    user, org = org_owner
    credit_grant(organization=org, amount=usd_to_nanos("3"), reason="welcome")
    credit_deduct(organization=org, amount=250, reason="correction")
    client = _session(user)
    balance = client.get(f"/api/v1/organizations/{org.slug}/balance/").json()
    assert balance == {
        "balance_nanos": usd_to_nanos("3") - 250,
        "balance_usd": "2.999999750",
        "billing_mode": "prepaid",
    }
    page = client.get(f"/api/v1/organizations/{org.slug}/transactions/?limit=1").json()
    assert page["count"] == 2 and page["next"]
    newest = page["results"][0]
    assert newest["kind"] == "deduction" and newest["amount_nanos"] == -250
    assert newest["balance_after_nanos"] == balance["balance_nanos"]


def test_it_lists_usage_records_filtered_and_paginated(org_owner, upstream):
    user, org = org_owner
    key_a = api_key_create(organization=org, name="a").api_key
    key_b = api_key_create(organization=org, name="b").api_key
    endpoint = factories.endpoint(base_url=upstream.base_url)
    _usage(org, key=key_a, endpoint=endpoint, days_ago=0)
    _usage(org, key=key_a, days_ago=3)
    _usage(org, key=key_b, days_ago=0)
    _usage(factories.organization(), days_ago=0)  # another organisation's
    client = _session(user)
    base = f"/api/v1/organizations/{org.slug}/usage/"

    everything = client.get(base).json()
    assert everything["count"] == 3
    by_key = client.get(base, {"key": key_a.pk}).json()
    assert by_key["count"] == 2 and {r["api_key"] for r in by_key["results"]} == {key_a.pk}
    today = timezone.now().date().isoformat()
    recent = client.get(base, {"key": key_a.pk, "start": today}).json()
    assert recent["count"] == 1 and recent["results"][0]["endpoint"] == endpoint.full_slug
    by_endpoint = client.get(base, {"endpoint": endpoint.full_slug}).json()
    assert by_endpoint["count"] == 1
    paged = client.get(base, {"limit": 2}).json()
    assert len(paged["results"]) == 2 and paged["next"]

    bad = client.get(base, {"start": "2026-02-30", "end": "yesterday", "key": "-1"})
    assert bad.status_code == 400 and set(bad.json()) == {"start", "end", "key"}
    reversed_range = client.get(base, {"start": "2026-03-02", "end": "2026-03-01"})
    assert reversed_range.status_code == 400 and "end" in reversed_range.json()


# --- vendors -----------------------------------------------------------------------------------


def test_a_vendor_member_sees_endpoints_with_the_price_quoted_now(upstream):
    from marketplace.redis_client import sync_client
    from vendors.pricing import LIVE_UTILISATION_FIELD, live_key

    member = factories.user()
    vendor = portal_vendor_register(actor=member, name="Api Vendor")
    endpoint = factories.endpoint(
        base_url=upstream.base_url,
        vendor_obj=vendor,
        price_input_usd="1",
        price_output_usd="2",
        surge_curve=[[0.0, 1.0], [1.0, 2.0]],
    )
    sync_client().hset(live_key(endpoint.pk), LIVE_UTILISATION_FIELD, "0.5")
    client = _session(member)
    listed = client.get(f"/api/v1/vendors/{vendor.slug}/endpoints/")
    assert listed.status_code == 200
    (row,) = listed.json()
    assert row["full_slug"] == endpoint.full_slug and row["tags"] == ["chat"]
    assert row["base_price"] == {"input_nanos": 1_000_000_000, "output_nanos": 2_000_000_000}
    assert row["current_price"] == {
        "utilisation": 0.5,
        "multiplier": 1.5,
        "input_nanos": 1_500_000_000,
        "output_nanos": 3_000_000_000,
    }
    assert row["quality"]["*"] == 0.5
    detail = client.get(f"/api/v1/vendors/{vendor.slug}/endpoints/{endpoint.slug}/")
    assert detail.json() == row
    missing = client.get(f"/api/v1/vendors/{vendor.slug}/endpoints/nope/")
    assert missing.status_code == 404 and set(missing.json()) == {"detail"}


def test_a_vendor_statement_covers_a_period(upstream):
    member = factories.user()
    vendor = portal_vendor_register(actor=member, name="Paid Vendor")
    endpoint = factories.endpoint(base_url=upstream.base_url, vendor_obj=vendor)
    customer = factories.organization()
    _usage(customer, endpoint=endpoint, cost=1_000_000)
    client = _session(member)
    today = timezone.now().date().isoformat()
    response = client.get(f"/api/v1/vendors/{vendor.slug}/statements/", {"start": today})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["opening_balance_nanos"] == 0
    (row,) = body["rows"]
    assert row["type"] == "usage" and row["requests"] == 1 and row["gross_nanos"] == 1_000_000
    assert body["closing_balance_nanos"] == row["net_nanos"] > 0

    developer = factories.user()
    VendorMembership.objects.create(vendor=vendor, user=developer, role="developer")
    statements = f"/api/v1/vendors/{vendor.slug}/statements/"
    assert _session(developer).get(statements).status_code == 403
    too_long = client.get(statements, {"start": "2020-01-01", "end": "2026-01-01"})
    assert too_long.status_code == 400 and "start" in too_long.json()


def test_api_keys_open_no_vendor(upstream):
    member = factories.user()
    vendor = portal_vendor_register(actor=member, name="Keyless Vendor")
    org = console_organization_create(actor=member, name="Member Co")
    key = console_api_key_create(actor=member, organization=org, name="k").plaintext
    assert _bearer(key).get(f"/api/v1/vendors/{vendor.slug}/endpoints/").status_code == 404


# --- the schema --------------------------------------------------------------------------------


def test_the_schema_describes_every_management_route():
    response = APIClient().get("/api/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()
    validate_schema(schema)  # against the OpenAPI 3 meta-schema
    assert set(schema["paths"]) == {
        "/api/v1/organizations/{org_slug}/keys/",
        "/api/v1/organizations/{org_slug}/keys/{id}/revoke/",
        "/api/v1/organizations/{org_slug}/usage/",
        "/api/v1/organizations/{org_slug}/routing-policy/",
        "/api/v1/organizations/{org_slug}/balance/",
        "/api/v1/organizations/{org_slug}/transactions/",
        "/api/v1/vendors/{vendor_slug}/endpoints/",
        "/api/v1/vendors/{vendor_slug}/endpoints/{endpoint_slug}/",
        "/api/v1/vendors/{vendor_slug}/statements/",
    }
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


def test_the_schema_generates_without_a_single_warning(tmp_path):
    """drf-spectacular warns when it has to guess (an unannotated field, a name clash):
    the schema stays complete only while there is nothing to guess."""
    from django.core.management import call_command

    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    assert "/api/v1/organizations/{org_slug}/usage/" in target.read_text()


# --- routing policy ----------------------------------------------------------------------------


def test_it_reads_and_sets_the_routing_policy_for_owners_only(org_owner):
    user, org = org_owner
    developer = factories.user()
    Membership.objects.create(organization=org, user=developer, role=Membership.Role.DEVELOPER)
    url = f"/api/v1/organizations/{org.slug}/routing-policy/"
    policy = {"ignore": ["acme"], "region": ["eu"]}

    put = _session(user).put(url, {"provider": policy}, format="json")
    bad = _session(user).put(url, {"provider": {"sort": "cheapest"}}, format="json")
    refused = _session(developer).put(url, {"provider": {}}, format="json")
    seen = _session(developer).get(url)

    assert put.status_code == 200 and put.json() == {"provider": policy}
    assert bad.status_code == 400 and "provider.sort" in bad.json()["detail"]
    assert refused.status_code == 403
    assert seen.status_code == 200 and seen.json() == {"provider": policy}
    assert AuditLogEntry.objects.filter(action="organization.routing_defaults_update").count() == 1
