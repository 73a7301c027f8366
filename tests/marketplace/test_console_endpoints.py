"""Private endpoints in the customer console: registered through the page with the vendor
portal's checks, live once the conformance check passes (no admin queue), routable through
the real gateway for the organisation only, never in the catalog, never paid out; owners
and admins manage, developers and billing members read; every change audited."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing.ledger import account_for_vendor
from billing.models import UsageRecord
from billing.settlement import settlement_run
from marketplace.models import AuditLogEntry, Membership
from marketplace.services import api_key_create, console_organization_create
from tests import factories
from tests.conftest import ingest_all
from tests.support.cluster import wait_until
from vendors.crypto import decrypt_secret
from vendors.models import ConformanceReport, Endpoint, Vendor
from vendors.private import private_endpoint_register, private_vendor_ensure


def endpoint_form(base_url: str, **overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "slug": "house-sql",
        "base_url": base_url,
        "upstream_model": "our-sql-7b",
        "secret": "house-s3cret",
        "kind": "chat",
        "tags": "house-sql, Chat",
        "context_length": "4096",
        "capacity": "4",
        "price_input_usd": "0",
        "price_output_usd": "0",
    }
    data.update(overrides)
    return data


def signed_in(user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(user)
    return client


def chat(server, key: str, model: str):  # type: ignore[no-untyped-def]
    with server.client(key) as http:
        return http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )


def model_ids(server, key: str) -> list[str]:  # type: ignore[no-untyped-def]
    with server.client(key) as http:
        return [m["id"] for m in http.get("/v1/models").json()["data"]]


@pytest.fixture
def owner():  # type: ignore[no-untyped-def]
    user = factories.user()
    org = console_organization_create(actor=user, name="House Models")
    from billing.money import usd_to_nanos
    from billing.services import credit_grant

    credit_grant(organization=org, amount=usd_to_nanos("5"), reason="test credit")
    return user, org


def member(org, role: str):  # type: ignore[no-untyped-def]
    user = factories.user()
    Membership.objects.create(organization=org, user=user, role=role)
    return user


@pytest.mark.django_db(transaction=True)
def test_it_registers_an_endpoint_that_is_live_for_the_organisation_only(
    gateway_server, upstream, owner
):
    user, org = owner
    key = api_key_create(organization=org, name="backend").plaintext
    stranger = factories.customer()
    public = factories.endpoint(base_url=upstream.base_url, tags=("chat",))
    browser = signed_in(user)
    # The gateways have loaded their routing table before the endpoint exists.
    assert chat(gateway_server, key, public.full_slug).status_code == 200

    form = browser.get(reverse("console:endpoint-create", args=[org.slug])).content.decode()
    assert 'for="id_base_url"' in form and "private-house-models/name" in form
    response = browser.post(
        reverse("console:endpoint-create", args=[org.slug]),
        endpoint_form(upstream.base_url, price_input_usd="1", price_output_usd="2"),
    )

    endpoint = Endpoint.objects.get(private_to=org)
    assert response.status_code == 302
    assert response["Location"] == reverse("console:endpoint", args=[org.slug, endpoint.pk])
    assert endpoint.full_slug == "private-house-models/house-sql"
    assert endpoint.status == Endpoint.Status.APPROVED  # no admin queue: the check passed
    assert decrypt_secret(endpoint.secret_encrypted) == "house-s3cret"
    assert ConformanceReport.objects.get(endpoint=endpoint).passed
    vendor = endpoint.vendor
    assert vendor.private_to == org and vendor.status == Vendor.Status.APPROVED
    detail = browser.get(response["Location"]).content.decode()
    assert "The conformance check passed" in detail and "Live" in detail
    assert "house-s3cret" not in detail and "set (hidden)" in detail
    listing = browser.get(reverse("console:endpoints", args=[org.slug])).content.decode()
    assert endpoint.full_slug in listing and "127.0.0.1" in listing and "our-sql-7b" in listing

    # Routable for the organisation, by name and by its private tag, through the gateway...
    assert wait_until(lambda: chat(gateway_server, key, endpoint.full_slug).status_code == 200)
    assert chat(gateway_server, key, "tag:house-sql").status_code == 200
    assert endpoint.full_slug in model_ids(gateway_server, key)
    # ...and another organisation cannot see it at all.
    refused = chat(gateway_server, stranger.key, endpoint.full_slug)
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert endpoint.full_slug not in model_ids(gateway_server, stranger.key)
    assert public.full_slug in model_ids(gateway_server, stranger.key)
    catalog = browser.get(reverse("catalog")).content.decode()
    assert public.full_slug in catalog and "house-sql" not in catalog

    # Its price is charged to the organisation; nothing accrues to the private vendor.
    ingest_all()
    records = UsageRecord.objects.filter(endpoint=endpoint)
    assert records and all(r.cost > 0 and r.vendor_share == 0 for r in records)
    assert all(r.platform_fee == r.cost for r in records)

    actions = set(AuditLogEntry.objects.filter(organization=org).values_list("action", flat=True))
    assert {"private_endpoint.register", "private_endpoint.check"} <= actions
    assert not AuditLogEntry.objects.filter(details__icontains="house-s3cret").exists()

    # Disabled: the gateway stops routing to it (the change is published on commit).
    browser.post(reverse("console:endpoint-disable", args=[org.slug, endpoint.pk]))
    assert Endpoint.objects.get(pk=endpoint.pk).status == Endpoint.Status.SUSPENDED
    assert wait_until(lambda: chat(gateway_server, key, endpoint.full_slug).status_code == 404)
    # A passing check puts it back.
    browser.post(reverse("console:endpoint-check", args=[org.slug, endpoint.pk]))
    assert wait_until(lambda: chat(gateway_server, key, endpoint.full_slug).status_code == 200)
    # Deleted: gone from the page, the database and the gateway.
    confirm = browser.get(reverse("console:endpoint-delete", args=[org.slug, endpoint.pk]))
    assert "cannot be undone" in confirm.content.decode()
    gone = browser.post(reverse("console:endpoint-delete", args=[org.slug, endpoint.pk]))
    assert gone["Location"] == reverse("console:endpoints", args=[org.slug])
    assert not Endpoint.objects.filter(pk=endpoint.pk).exists()
    assert wait_until(lambda: chat(gateway_server, key, endpoint.full_slug).status_code == 404)
    actions = set(AuditLogEntry.objects.filter(organization=org).values_list("action", flat=True))
    assert {"private_endpoint.disable", "private_endpoint.delete"} <= actions


@pytest.mark.django_db
def test_it_keeps_an_endpoint_that_fails_the_check_off_the_gateway(upstream, owner):
    user, org = owner
    upstream.script(["wrong-shape"] * 10)

    browser = signed_in(user)
    response = browser.post(
        reverse("console:endpoint-create", args=[org.slug]), endpoint_form(upstream.base_url)
    )

    endpoint = Endpoint.objects.get(private_to=org)
    assert endpoint.status == Endpoint.Status.PENDING
    page = browser.get(response["Location"]).content.decode()
    assert "The conformance check failed" in page and "Waiting for a passing check" in page
    assert "Check and go live" in page

    upstream.reset()
    browser.post(reverse("console:endpoint-check", args=[org.slug, endpoint.pk]))
    assert Endpoint.objects.get(pk=endpoint.pk).status == Endpoint.Status.APPROVED


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    ["http://10.20.30.40/v1", "http://169.254.169.254/latest", "http://127.0.0.1:9/v1"],
)
def test_it_refuses_a_private_or_metadata_url_on_the_url_field(settings, owner, url):
    settings.OUTBOUND_ALLOWED_NETWORKS = []
    user, org = owner

    response = signed_in(user).post(
        reverse("console:endpoint-create", args=[org.slug]), endpoint_form(url)
    )

    page = response.content.decode()
    assert response.status_code == 200
    assert 'id="id_base_url_error"' in page and "The URL is refused" in page
    assert "house-s3cret" not in page
    assert not Endpoint.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"slug": "new"}, "slug", "reserved"),
        ({"capacity": "0"}, "capacity", "greater than or equal to 1"),
        ({"price_input_usd": "-1"}, "price_input_usd", "greater than or equal to 0"),
        ({"tags": "not a tag!"}, "tags", "not a valid capability tag"),
    ],
)
def test_it_explains_each_refused_field(upstream, owner, overrides, field, message):
    user, org = owner
    response = signed_in(user).post(
        reverse("console:endpoint-create", args=[org.slug]),
        endpoint_form(upstream.base_url, **overrides),
    )
    page = response.content.decode()
    assert f'id="id_{field}_error"' in page and message in page
    assert not Endpoint.objects.exists()


@pytest.mark.django_db
def test_owners_and_admins_manage_developers_and_billing_read(upstream, owner):
    user, org = owner
    admin = member(org, "admin")
    endpoint = private_endpoint_register(
        actor=user,
        organization=org,
        slug="ours",
        base_url=upstream.base_url,
        upstream_model="m",
        price_input=0,
        price_output=0,
    )
    for role in ("developer", "billing"):
        reader = signed_in(member(org, role))
        assert reader.get(reverse("console:endpoints", args=[org.slug])).status_code == 200
        page = reader.get(reverse("console:endpoint", args=[org.slug, endpoint.pk]))
        assert page.status_code == 200 and "Delete" not in page.content.decode()
        assert reader.get(reverse("console:endpoint-create", args=[org.slug])).status_code == 403
        for name in ("endpoint-check", "endpoint-disable", "endpoint-delete"):
            url = reverse(f"console:{name}", args=[org.slug, endpoint.pk])
            assert reader.post(url).status_code == 403, (role, name)
    assert Endpoint.objects.get(pk=endpoint.pk).status == Endpoint.Status.PENDING
    assert not ConformanceReport.objects.exists()

    response = signed_in(admin).post(
        reverse("console:endpoint-check", args=[org.slug, endpoint.pk])
    )
    assert response.status_code == 302
    assert Endpoint.objects.get(pk=endpoint.pk).status == Endpoint.Status.APPROVED


@pytest.mark.django_db
def test_the_playground_offers_the_organisations_own_live_endpoints(upstream, owner):
    user, org = owner
    other_user = factories.user()
    other = console_organization_create(actor=other_user, name="Someone Else")
    mine = private_endpoint_register(
        actor=user,
        organization=org,
        slug="mine",
        base_url=upstream.base_url,
        upstream_model="m",
        price_input=0,
        price_output=0,
    )
    signed_in(user).post(reverse("console:endpoint-check", args=[org.slug, mine.pk]))

    page = signed_in(user).get(reverse("console:playground", args=[org.slug])).content.decode()
    theirs = signed_in(other_user).get(reverse("console:playground", args=[other.slug]))

    assert f'value="{mine.full_slug}"' in page
    assert mine.full_slug not in theirs.content.decode()


@pytest.mark.django_db
def test_settlement_never_pays_a_private_vendor(owner):
    _, org = owner
    vendor = private_vendor_ensure(organization=org)
    account_for_vendor(vendor)  # usage ingest opens a payable for every vendor it sees
    assert private_vendor_ensure(organization=org) == vendor  # one per organisation
    assert vendor.fee_bps == 10_000

    today = timezone.now().date()
    report = settlement_run(period_start=today, period_end=today)

    assert vendor.pk not in [outcome.vendor_id for outcome in report.outcomes]


@pytest.mark.django_db
def test_another_organisation_reaches_none_of_them_through_its_own_console(upstream, owner):
    user, org = owner
    endpoint = private_endpoint_register(
        actor=user,
        organization=org,
        slug="ours",
        base_url=upstream.base_url,
        upstream_model="m",
        price_input=0,
        price_output=0,
    )
    intruder = factories.user()
    theirs = console_organization_create(actor=intruder, name="Intruders")
    browser = signed_in(intruder)

    listing = browser.get(reverse("console:endpoints", args=[theirs.slug])).content.decode()
    assert endpoint.full_slug not in listing
    for name in ("endpoint", "endpoint-check", "endpoint-disable", "endpoint-delete"):
        url = reverse(f"console:{name}", args=[theirs.slug, endpoint.pk])
        assert browser.get(url).status_code in (404, 405)
        assert browser.post(url).status_code == 404, name
    assert Endpoint.objects.get(pk=endpoint.pk).status == Endpoint.Status.PENDING
    assert not ConformanceReport.objects.exists()


@pytest.mark.django_db
def test_a_private_endpoint_waits_in_no_approval_queue(client, upstream, owner):
    user, org = owner
    private = private_endpoint_register(
        actor=user,
        organization=org,
        slug="ours",
        base_url=upstream.base_url,
        upstream_model="m",
        price_input=0,
        price_output=0,
    )
    public = factories.endpoint(base_url=upstream.base_url, approved=False)
    staff = factories.user()
    staff.is_staff = True
    staff.save()
    client.force_login(staff)

    queue = client.get(reverse("ops:index")).content.decode()
    listing = client.get(reverse("ops:endpoints")).content.decode()

    assert public.full_slug in queue and private.full_slug not in queue
    assert private.full_slug in listing and "Private" in listing
