"""The management API (``/api/v1/``): API keys, usage, balance and transactions of an
organisation; endpoints and statements of a vendor. Session and bearer-key access, roles,
DRF-shaped errors, and a schema that describes it all."""

from __future__ import annotations

import itertools
import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from billing.money import usd_to_nanos
from billing.services import credit_deduct, credit_grant
from billing.usage import EPOCH, record_events
from marketplace import invalidation
from marketplace.data_policy import api_key_data_policy_update
from marketplace.models import ApiKey, AuditLogEntry, Membership
from marketplace.redis_client import sync_client
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
        "/api/v1/organizations/{org_slug}/keys/{id}/data-policy/",
        "/api/v1/organizations/{org_slug}/usage/",
        "/api/v1/organizations/{org_slug}/routing-policy/",
        "/api/v1/organizations/{org_slug}/data-policy/",
        "/api/v1/organizations/{org_slug}/balance/",
        "/api/v1/organizations/{org_slug}/transactions/",
        "/api/v1/vendors/{vendor_slug}/endpoints/",
        "/api/v1/vendors/{vendor_slug}/endpoints/{endpoint_slug}/",
        "/api/v1/vendors/{vendor_slug}/statements/",
    }
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    operations = {
        operation["operationId"]
        for methods in schema["paths"].values()
        for operation in methods.values()
    }
    assert {
        "organization_keys_data_policy_get",
        "organization_keys_data_policy_set",
        "organization_data_policy_get",
        "organization_data_policy_set",
    } <= operations


def test_the_schema_documents_the_data_policy_values():
    """The allowed values and ranges of the console's forms, for clients to see."""
    components = APIClient().get("/api/schema/?format=json").json()["components"]["schemas"]
    assert components["PrivacyPolicyEnum"]["enum"] == ["off", "redact", "trusted_only"]
    key = components["KeyDataPolicyUpdateRequest"]
    assert {"$ref": "#/components/schemas/BlankEnum"} in key["properties"]["privacy_policy"][
        "oneOf"
    ]
    assert key["properties"]["cache_ttl"] | {"description": ""} == {
        "type": "integer",
        "minimum": 0,
        "maximum": 30 * 24 * 3600,
        "nullable": True,
        "description": "",
    }
    similarity = key["properties"]["cache_similarity"]
    assert (similarity["minimum"], similarity["maximum"], similarity["nullable"]) == (
        500,
        1000,
        True,
    )
    assert set(key["required"]) == {"privacy_policy", "cache_ttl", "cache_similarity"}
    assert "log_content" in components["KeyDataPolicy"]["required"]
    org = components["OrganizationDataPolicyRequest"]
    assert org["properties"]["trusted_regions"]["maxLength"] == 200
    assert "nullable" not in org["properties"]["cache_ttl"]
    assert set(org["required"]) == {
        "privacy_policy",
        "cache_ttl",
        "cache_similarity",
        "trusted_regions",
    }


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


# --- data policy: privacy guard and response cache ---------------------------------------------


def _published(subscriber, wait: float = 1.0) -> list[str]:  # type: ignore[no-untyped-def]
    """Every invalidation message until the channel has been quiet for ``wait`` seconds."""
    seen: list[str] = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        message = subscriber.get_message(timeout=0.1)
        if message is not None:
            seen.append(message["data"].decode())
            deadline = time.monotonic() + wait
    return seen


@pytest.fixture
def invalidations():  # type: ignore[no-untyped-def]
    subscriber = sync_client().pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(invalidation.CHANNEL)
    yield subscriber
    subscriber.close()


def _key_policy(key: ApiKey) -> tuple[object, ...]:
    key.refresh_from_db()
    return (key.privacy_policy, key.cache_ttl, key.cache_similarity, key.log_content)


def _org_policy(org) -> tuple[object, ...]:  # type: ignore[no-untyped-def]
    org.refresh_from_db()
    return (org.privacy_policy, org.cache_ttl, org.cache_similarity, org.trusted_regions)


KEY_POLICY = {"privacy_policy": "redact", "cache_ttl": 600, "cache_similarity": 920}


def test_an_owner_sets_a_keys_data_policy_and_the_gateways_forget_the_key(
    org_owner, invalidations, django_capture_on_commit_callbacks
):
    user, org = org_owner
    key = console_api_key_create(actor=user, organization=org, name="batch").api_key
    url = f"/api/v1/organizations/{org.slug}/keys/{key.pk}/data-policy/"
    inherited = _session(user).get(url)
    assert inherited.status_code == 200 and inherited.json() == {
        "privacy_policy": "",
        "cache_ttl": None,
        "cache_similarity": None,
        "log_content": False,
    }

    with django_capture_on_commit_callbacks(execute=True):
        put = _session(user).put(url, {**KEY_POLICY, "log_content": True}, format="json")

    assert put.status_code == 200, put.content
    assert put.json() == {**KEY_POLICY, "log_content": True}
    assert _key_policy(key) == ("redact", 600, 920, True)
    assert invalidation.key_message(key.key_hash) in _published(invalidations)
    entry = AuditLogEntry.objects.get(action="api_key.data_policy_update", organization=org)
    assert entry.actor == user and entry.details == {**KEY_POLICY, "log_content": True}
    # Read back by anyone who may list keys, here the key itself (its creator's role).
    assert _bearer_for(key, user).get(url).json() == put.json()
    listed = _session(user).get(f"/api/v1/organizations/{org.slug}/keys/").json()
    assert {row["id"]: row["log_content"] for row in listed}[key.pk] is True

    # "" and null go back to the organisation's settings.
    back = {"privacy_policy": "", "cache_ttl": None, "cache_similarity": None}
    assert _session(user).put(url, back, format="json").status_code == 200
    assert _key_policy(key) == ("", None, None, True)


def _bearer_for(key: ApiKey, creator) -> APIClient:  # type: ignore[no-untyped-def]
    """A bearer client for a new key of ``key``'s organisation made by ``creator``."""
    made = console_api_key_create(actor=creator, organization=key.organization, name="reader")
    return _bearer(made.plaintext)


def test_log_content_is_left_as_it_is_unless_the_body_names_it(org_owner):
    user, org = org_owner
    key = api_key_create(organization=org, name="debugging").api_key
    url = f"/api/v1/organizations/{org.slug}/keys/{key.pk}/data-policy/"
    client = _session(user)

    assert client.put(url, {**KEY_POLICY, "log_content": True}, format="json").status_code == 200
    omitted = client.put(url, {**KEY_POLICY, "cache_ttl": 60}, format="json")
    assert omitted.status_code == 200 and omitted.json()["log_content"] is True
    assert _key_policy(key) == ("redact", 60, 920, True)

    off = client.put(url, {**KEY_POLICY, "log_content": False}, format="json")
    assert off.status_code == 200 and off.json()["log_content"] is False
    assert client.put(url, KEY_POLICY, format="json").json()["log_content"] is False
    assert _key_policy(key) == ("redact", 600, 920, False)
    logged = AuditLogEntry.objects.filter(action="api_key.data_policy_update").order_by("pk")
    assert [e.details["log_content"] for e in logged] == [True, True, False, False]


def test_a_member_who_is_not_an_owner_or_admin_may_read_but_not_set_data_policies(org_owner):
    _, org = org_owner
    key = api_key_create(organization=org, name="k").api_key
    key_url = f"/api/v1/organizations/{org.slug}/keys/{key.pk}/data-policy/"
    org_url = f"/api/v1/organizations/{org.slug}/data-policy/"
    org_policy = {**KEY_POLICY, "trusted_regions": ""}
    admin = factories.user()
    Membership.objects.create(organization=org, user=admin, role=Membership.Role.ADMIN)
    for role in (Membership.Role.DEVELOPER, Membership.Role.BILLING):
        member = factories.user()
        Membership.objects.create(organization=org, user=member, role=role)
        client = _session(member)
        assert client.get(key_url).status_code == 200, role
        assert client.get(org_url).status_code == 200, role
        refused = client.put(key_url, {**KEY_POLICY, "log_content": True}, format="json")
        assert refused.status_code == 403 and set(refused.json()) == {"detail"}, role
        assert client.put(org_url, org_policy, format="json").status_code == 403, role
        # ...with the member's own API key too (a key acts with its creator's role).
        own = api_key_create(organization=org, name=f"{role}'s", created_by=member)
        assert _bearer(own.plaintext).put(key_url, KEY_POLICY, format="json").status_code == 403

    assert _key_policy(key) == ("", None, None, False)
    assert _org_policy(org) == ("off", 0, None, "")
    assert not AuditLogEntry.objects.filter(action__endswith=".data_policy_update").exists()
    # An admin may, like an owner.
    assert _session(admin).put(key_url, KEY_POLICY, format="json").status_code == 200
    assert _session(admin).put(org_url, org_policy, format="json").status_code == 200


def test_another_organisations_key_or_an_unknown_one_is_a_404(org_owner):
    user, org = org_owner
    theirs = api_key_create(organization=factories.organization(), name="theirs").api_key
    client = _session(user)
    for pk in (theirs.pk, theirs.pk + 1000, 2**63):
        url = f"/api/v1/organizations/{org.slug}/keys/{pk}/data-policy/"
        assert client.get(url).status_code == 404, pk
        response = client.put(url, {**KEY_POLICY, "log_content": True}, format="json")
        assert response.status_code == 404 and set(response.json()) == {"detail"}, pk
    assert _key_policy(theirs) == ("", None, None, False)
    # The key named under its own organisation's slug: the caller is a stranger there.
    url = f"/api/v1/organizations/{theirs.organization.slug}/keys/{theirs.pk}/data-policy/"
    assert client.put(url, KEY_POLICY, format="json").status_code == 404
    assert _key_policy(theirs) == ("", None, None, False)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**KEY_POLICY, "privacy_policy": "paranoid"}, "privacy_policy"),
        ({**KEY_POLICY, "privacy_policy": None}, "privacy_policy"),
        ({**KEY_POLICY, "privacy_policy": ["redact"]}, "privacy_policy"),
        ({**KEY_POLICY, "cache_ttl": -1}, "cache_ttl"),
        ({**KEY_POLICY, "cache_ttl": 30 * 24 * 3600 + 1}, "cache_ttl"),
        ({**KEY_POLICY, "cache_ttl": "soon"}, "cache_ttl"),
        ({**KEY_POLICY, "cache_ttl": 1.5}, "cache_ttl"),
        ({**KEY_POLICY, "cache_similarity": 499}, "cache_similarity"),
        ({**KEY_POLICY, "cache_similarity": 1001}, "cache_similarity"),
        ({**KEY_POLICY, "cache_similarity": 0.92}, "cache_similarity"),
        ({**KEY_POLICY, "cache_similarity": [920]}, "cache_similarity"),
        ({**KEY_POLICY, "log_content": "maybe"}, "log_content"),
        ({**KEY_POLICY, "log_content": None}, "log_content"),
        ({"privacy_policy": "redact", "cache_ttl": 600}, "cache_similarity"),
        ([KEY_POLICY], "non_field_errors"),
        ("redact", "non_field_errors"),
        (None, "non_field_errors"),
    ],
)
def test_bad_key_data_policies_are_400s_that_change_nothing(
    org_owner, invalidations, django_capture_on_commit_callbacks, body, field
):
    user, org = org_owner
    key = api_key_create(organization=org, name="k").api_key
    url = f"/api/v1/organizations/{org.slug}/keys/{key.pk}/data-policy/"

    with django_capture_on_commit_callbacks(execute=True):
        response = _session(user).put(url, json.dumps(body), content_type="application/json")

    assert response.status_code == 400, response.content
    assert list(response.json()) == [field]
    assert _key_policy(key) == ("", None, None, False)
    assert not AuditLogEntry.objects.filter(action="api_key.data_policy_update").exists()
    assert _published(invalidations, wait=0.3) == []


def test_a_key_with_no_member_behind_it_reads_but_cannot_set_data_policies(org_owner):
    _, org = org_owner
    orphan = api_key_create(organization=org, name="ops-made")  # no creator: read-only
    client = _bearer(orphan.plaintext)
    key_url = f"/api/v1/organizations/{org.slug}/keys/{orphan.api_key.pk}/data-policy/"
    org_url = f"/api/v1/organizations/{org.slug}/data-policy/"

    assert client.get(key_url).status_code == 200
    assert client.get(org_url).status_code == 200
    refused = client.put(key_url, {**KEY_POLICY, "log_content": True}, format="json")
    assert refused.status_code == 403 and set(refused.json()) == {"detail"}
    org_policy = {**KEY_POLICY, "trusted_regions": "eu"}
    assert client.put(org_url, org_policy, format="json").status_code == 403

    # A key whose creator has left the organisation is read-only too.
    leaver = factories.owner(org)
    made = console_api_key_create(actor=leaver, organization=org, name="leaver's")
    Membership.objects.filter(organization=org, user=leaver).delete()
    left = _bearer(made.plaintext).put(key_url, KEY_POLICY, format="json")
    assert left.status_code == 403 and set(left.json()) == {"detail"}

    assert _key_policy(orphan.api_key) == ("", None, None, False)
    assert _org_policy(org) == ("off", 0, None, "")
    assert not AuditLogEntry.objects.filter(action__endswith=".data_policy_update").exists()


def test_an_owner_sets_the_organisations_data_policy_and_every_key_is_forgotten(
    org_owner, invalidations, django_capture_on_commit_callbacks
):
    user, org = org_owner
    keys = [api_key_create(organization=org, name=n).api_key for n in ("a", "b")]
    url = f"/api/v1/organizations/{org.slug}/data-policy/"
    assert _session(user).get(url).json() == {
        "privacy_policy": "off",
        "cache_ttl": 0,
        "cache_similarity": None,
        "trusted_regions": "",
    }
    policy = {
        "privacy_policy": "trusted_only",
        "cache_ttl": 3600,
        "cache_similarity": 950,
        "trusted_regions": "EU, us-east eu",
    }

    with django_capture_on_commit_callbacks(execute=True):
        put = _bearer_for(keys[0], user).put(url, policy, format="json")  # the owner's key

    assert put.status_code == 200, put.content
    assert put.json() == {**policy, "trusted_regions": "eu,us-east"}
    assert _org_policy(org) == ("trusted_only", 3600, 950, "eu,us-east")
    published = _published(invalidations)
    assert {invalidation.key_message(k.key_hash) for k in keys} <= set(published)
    entry = AuditLogEntry.objects.get(action="organization.data_policy_update", organization=org)
    assert entry.actor == user
    assert entry.details["trusted_regions"] == {"from": "", "to": "eu,us-east"}
    assert _session(user).get(url).json() == put.json()

    # Any member reads it; an empty list of regions and no semantic cache are allowed.
    developer = factories.user()
    Membership.objects.create(organization=org, user=developer, role=Membership.Role.DEVELOPER)
    assert _session(developer).get(url).json() == put.json()
    cleared = {**policy, "cache_similarity": None, "trusted_regions": ""}
    assert _session(user).put(url, cleared, format="json").json() == cleared


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"privacy_policy": ""}, "privacy_policy"),
        ({"privacy_policy": "everything"}, "privacy_policy"),
        ({"cache_ttl": None}, "cache_ttl"),
        ({"cache_ttl": -5}, "cache_ttl"),
        ({"cache_ttl": 10**12}, "cache_ttl"),
        ({"cache_similarity": 1200}, "cache_similarity"),
        ({"cache_similarity": "high"}, "cache_similarity"),
        ({"trusted_regions": ["eu"]}, "trusted_regions"),
        ({"trusted_regions": "x" * 201}, "trusted_regions"),
        # A rule the service enforces is a 400 with its own message.
        ({"trusted_regions": "eu; drop"}, "detail"),
        ({"trusted_regions": None}, "trusted_regions"),
    ],
)
def test_bad_organisation_data_policies_are_400s_that_change_nothing(org_owner, change, field):
    user, org = org_owner
    url = f"/api/v1/organizations/{org.slug}/data-policy/"
    policy = {**KEY_POLICY, "trusted_regions": "eu", **change}

    response = _session(user).put(url, policy, format="json")

    assert response.status_code == 400, response.content
    assert list(response.json()) == [field]
    if field == "detail":
        assert response.json() == {"detail": "not a region code: eu;"}
    assert _org_policy(org) == ("off", 0, None, "")
    assert not AuditLogEntry.objects.filter(action="organization.data_policy_update").exists()


def test_a_non_object_organisation_data_policy_is_a_400(org_owner):
    user, org = org_owner
    url = f"/api/v1/organizations/{org.slug}/data-policy/"
    for body in ([], "trusted_only", 42):
        response = _session(user).put(url, json.dumps(body), content_type="application/json")
        assert response.status_code == 400 and list(response.json()) == ["non_field_errors"]
    missing = _session(user).put(url, {}, format="json")
    assert missing.status_code == 400
    assert set(missing.json()) == {
        "privacy_policy",
        "cache_ttl",
        "cache_similarity",
        "trusted_regions",
    }
    assert _org_policy(org) == ("off", 0, None, "")
