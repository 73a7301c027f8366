"""Tenancy: walk every URL of the URLconf as a second tenant.

Every route whose path names an object (an organisation, a vendor, an endpoint, a key, a
membership, an invitation...) is requested, with GET and with POST, by a signed-in user of
another organisation and vendor, filled in with the first tenant's identifiers. Each must
answer 404, 403 (a page behind a role or staff), 405 or a redirect to a login page, and
nothing of the first tenant may change. Routes added later are covered automatically.
"""

from __future__ import annotations

import itertools
import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from marketplace.models import ApiKey, Membership, Organization
from marketplace.services import api_key_create, console_api_key_create, organization_create
from tests import factories
from vendors.models import Endpoint, Vendor
from vendors.private import private_endpoint_register
from vendors.services import endpoint_create, vendor_create

pytestmark = pytest.mark.django_db

SECRET_NAME = "Alpha Confidential"
ALLOWED = {302, 403, 404, 405}


def _walk(resolver: URLResolver, prefix: str = ""):  # type: ignore[no-untyped-def]
    for entry in resolver.url_patterns:
        if isinstance(entry, URLResolver):
            yield from _walk(entry, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern)


def _routes_with_parameters() -> list[str]:
    routes = []
    for route in _walk(get_resolver()):
        if route.startswith("^") or "(?P" in route:
            continue  # regex routes of third-party apps (admin, allauth) are handled below
        if "<" in route:
            routes.append(route)
    return routes


@pytest.fixture
def tenants(settings, upstream):  # type: ignore[no-untyped-def]
    settings.OUTBOUND_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    owner_a = factories.user("owner@alpha.test")
    other_a = factories.user("member@alpha.test")
    org_a = organization_create(name=SECRET_NAME, slug="alpha", owner=owner_a)
    membership = Membership.objects.create(organization=org_a, user=other_a, role="developer")
    key_a = api_key_create(organization=org_a, name=f"{SECRET_NAME} key").api_key
    vendor_a = vendor_create(name=f"{SECRET_NAME} Vendor", slug="alpha-vendor", owner=owner_a)
    endpoint_a = endpoint_create(
        vendor=vendor_a,
        slug="alpha-model",
        base_url=upstream.base_url,
        upstream_model="m",
        price_input=1,
        price_output=1,
    )
    private_a = private_endpoint_register(
        actor=owner_a,
        organization=org_a,
        slug="alpha-private",
        base_url=upstream.base_url,
        upstream_model="m",
        price_input=0,
        price_output=0,
    )
    intruder = factories.user("intruder@beta.test")
    org_b = organization_create(name="Beta", slug="beta", owner=intruder)
    intruder_key = console_api_key_create(actor=intruder, organization=org_b, name="b").plaintext
    vendor_create(name="Beta Vendor", slug="beta-vendor", owner=intruder)
    ids = {
        membership.pk,
        key_a.pk,
        endpoint_a.pk,
        vendor_a.pk,
        org_a.pk,
        owner_a.pk,
        private_a.pk,
    }
    return {
        "intruder": intruder,
        "intruder_key": intruder_key,
        "org": org_a,
        "key": key_a,
        "vendor": vendor_a,
        "endpoint": endpoint_a,
        "private_endpoint": private_a,
        "membership": membership,
        "ids": sorted(ids),
    }


def _fill(route: str, t: dict) -> list[str]:  # type: ignore[type-arg]
    """Every concrete path for ``route`` with the first tenant's identifiers."""
    values = {
        "org_slug": [t["org"].slug],
        "vendor_slug": [t["vendor"].slug],
        "endpoint_slug": [t["endpoint"].slug],
        "token": ["not-a-real-token"],
        "action": ["approve", "suspend", "resume"],
    }
    names = re.findall(r"<(?:\w+:)?(\w+)>", route)
    options = [values.get(name, [str(i) for i in t["ids"]]) for name in names]
    paths = []
    for combo in itertools.product(*options):
        path = route
        for name, value in zip(names, combo, strict=True):
            path = re.sub(r"<(?:\w+:)?" + name + ">", value, path, count=1)
        paths.append("/" + path)
    return paths


def test_another_tenant_reaches_nothing_through_any_url(client, tenants):
    client.force_login(tenants["intruder"])
    routes = _routes_with_parameters()
    assert any(r.startswith("console/") for r in routes) and any(
        r.startswith("vendor/") for r in routes
    )
    leaks = []
    for route in routes:
        for path in _fill(route, tenants):
            for method in ("get", "post"):
                response = getattr(client, method)(path)
                body = response.content.decode(errors="replace")
                login_redirect = response.status_code == 302 and "login" in response.get(
                    "Location", ""
                )
                if (
                    response.status_code not in ALLOWED
                    or (response.status_code == 302 and not login_redirect)
                    or SECRET_NAME in body
                ):
                    leaks.append(f"{method.upper()} {path} -> {response.status_code}")
    assert not leaks, "another tenant's objects are reachable:\n" + "\n".join(leaks)

    # ...and nothing of the first tenant changed.
    assert ApiKey.objects.get(pk=tenants["key"].pk).revoked_at is None
    assert Membership.objects.get(pk=tenants["membership"].pk).role == "developer"
    assert Endpoint.objects.get(pk=tenants["endpoint"].pk).status == Endpoint.Status.PENDING
    private = Endpoint.objects.get(pk=tenants["private_endpoint"].pk)
    assert private.status == Endpoint.Status.PENDING
    assert not private.conformance_reports.exists()
    assert Vendor.objects.get(pk=tenants["vendor"].pk).status == Vendor.Status.PENDING
    assert Organization.objects.filter(slug="alpha").exists()


@pytest.mark.parametrize("credential", ["session", "api_key"])
def test_another_tenant_gets_404_from_every_management_api_route(client, tenants, credential):
    """The management API (/api/v1/) as the second tenant, signed in or with its own API
    key: every route naming the first tenant's objects is a 404 (or the 405 a method the
    route lacks gets for any object, existing or not)."""
    if credential == "session":
        client.force_login(tenants["intruder"])
        headers = {}
    else:
        headers = {"HTTP_AUTHORIZATION": f"Bearer {tenants['intruder_key']}"}
    routes = [r for r in _routes_with_parameters() if r.startswith("api/v1/")]
    assert any("organizations/" in r for r in routes) and any("vendors/" in r for r in routes)
    wrong = []
    for route in routes:
        for path in _fill(route, tenants):
            for method in ("get", "post", "delete"):
                response = getattr(client, method)(path, **headers)
                ghost = path.replace("/alpha-vendor/", "/ghost/").replace("/alpha/", "/ghost/")
                same_as_nothing = getattr(client, method)(ghost, **headers).status_code
                if (
                    response.status_code not in (404, 405)
                    or response.status_code != same_as_nothing
                    or SECRET_NAME in response.content.decode()
                ):
                    wrong.append(f"{method.upper()} {path} -> {response.status_code}")
    assert not wrong, "the management API shows another tenant's objects:\n" + "\n".join(wrong)
    assert ApiKey.objects.get(pk=tenants["key"].pk).revoked_at is None
    assert ApiKey.objects.filter(organization=tenants["org"]).count() == 1


def test_the_admin_is_closed_to_non_staff(client, tenants):
    client.force_login(tenants["intruder"])
    for path in (
        "/admin/",
        f"/admin/marketplace/apikey/{tenants['key'].pk}/change/",
        f"/admin/vendors/endpoint/{tenants['endpoint'].pk}/change/",
        "/admin/billing/ledgertransaction/",
    ):
        response = client.get(path)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], path


@pytest.mark.django_db(transaction=True)
def test_another_tenant_joins_no_live_dashboard(client, tenants, gateway_server):
    """Every WebSocket route (``marketplace.live.routing``), filled in with the first
    tenant's identifiers, refuses the intruder's handshake."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from marketplace.live.routing import websocket_urlpatterns

    client.force_login(tenants["intruder"])
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    routes = [str(pattern.pattern) for pattern in websocket_urlpatterns]
    assert any(r.startswith("ws/console/") for r in routes)
    joined = []
    for route in routes:
        for path in _fill(route, tenants):
            url = gateway_server.url.replace("http://", "ws://") + path
            try:
                with connect(url, origin=gateway_server.url, additional_headers={"Cookie": cookie}):
                    joined.append(path)
            except InvalidStatus as exc:
                assert exc.response.status_code == 403, path
    assert not joined, f"another tenant's live figures are reachable: {joined}"
