"""Model forms, filters and sorts through the running gateway (the router's own unit tests
are in test_router.py): what a request names decides which real vendor it reaches."""

from __future__ import annotations

import pytest

from tests import factories
from tests.support.cluster import wait_until
from tests.support.upstream import FaultUpstream
from vendors.services import endpoint_suspend, vendor_suspend

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "route me somewhere"}]


@pytest.fixture
def market(upstream):  # type: ignore[no-untyped-def]
    """Three vendors serving tag:sql: cheap and slow, mid-priced, dear and fast."""
    with FaultUpstream() as mid_server, FaultUpstream() as fast_server:
        upstream.configure(delay_ms=120)
        cheap = factories.endpoint(
            base_url=upstream.base_url, tags=("sql",), price_output_usd="1", region="us"
        )
        mid = factories.endpoint(
            base_url=mid_server.base_url,
            tags=("sql", "legal"),
            price_output_usd="2",
            data_retention_days=30,
        )
        dear = factories.endpoint(
            base_url=fast_server.base_url, tags=("sql",), price_output_usd="5", region="eu"
        )
        yield cheap, mid, dear


def _served(client, **body: object) -> str:  # type: ignore[no-untyped-def]
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    assert response.status_code == 200, response.text
    return str(response.headers["x-switchyard-endpoint"])


def test_the_request_fields_pick_among_the_vendors(gateway_server, market):
    cheap, mid, dear = market
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        for _ in range(3):  # every endpoint gets latency figures
            for endpoint in market:
                _served(client, model=endpoint.full_slug)

        def nitro() -> bool:  # the latency averages reach the router's copy within 250 ms
            return _served(client, model="tag:sql:nitro") != cheap.full_slug

        assert wait_until(nitro, timeout=10)
        picks = {
            "floor": _served(client, model="tag:sql:floor"),
            "price": _served(client, model="tag:sql", provider={"sort": "price"}),
            "slug": _served(client, model=dear.full_slug),
            "pinned": _served(client, model=f"{mid.full_slug}@1"),
            "two tags": _served(client, model="tag:sql+legal"),
            "models in order": _served(client, models=[dear.full_slug, cheap.full_slug]),
            "only": _served(client, model="tag:sql", provider={"only": [mid.vendor.slug]}),
            "zdr": _served(client, model="tag:sql:nitro", provider={"zdr": True}),
            "region": _served(client, model="tag:sql", provider={"region": "eu", "sort": "price"}),
        }
        unknown_version = client.post(
            "/v1/chat/completions", json={"messages": MESSAGES, "model": f"{mid.full_slug}@7"}
        )

    assert picks == {
        "floor": cheap.full_slug,
        "price": cheap.full_slug,
        "slug": dear.full_slug,
        "pinned": mid.full_slug,
        "two tags": mid.full_slug,  # the only endpoint with both tags
        "models in order": dear.full_slug,  # the list's order, not the price
        "only": mid.full_slug,
        "zdr": dear.full_slug,  # mid keeps data 30 days; cheap is slow
        "region": mid.full_slug,  # cheap is in "us"; mid ("eu", the default) beats dear on price
    }
    assert unknown_version.status_code in (404, 503)


def test_the_next_entry_of_models_serves_when_the_first_fails(gateway_server, market, upstream):
    cheap, mid, _dear = market
    customer = factories.customer()
    upstream.script(["status:500"])
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "models": [cheap.full_slug, mid.full_slug]},
        )
    assert response.headers["x-switchyard-endpoint"] == mid.full_slug
    assert response.headers["x-switchyard-attempts"] == "2"


def test_a_suspended_endpoint_or_vendor_stops_serving(gateway_server, market, upstream):
    cheap, mid, dear = market
    customer = factories.customer()

    def cheap_calls() -> int:
        return int(upstream.stats()["by_path"].get("/v1/chat/completions", 0))

    by_price = {"model": "tag:sql", "provider": {"sort": "price"}}
    with gateway_server.client(customer.key) as client:
        assert _served(client, **by_price) == cheap.full_slug
        # Every replica hears of it through Redis and reloads its table (within a second).
        endpoint_suspend(endpoint=cheap)
        assert wait_until(lambda: _served(client, **by_price) == mid.full_slug, timeout=10)
        # A request may reach the cheap endpoint before the replica hears of the suspension;
        # none does once it has.
        heard = cheap_calls()
        by_slug = client.post(
            "/v1/chat/completions", json={"messages": MESSAGES, "model": cheap.full_slug}
        )
        vendor_suspend(vendor=mid.vendor)
        assert wait_until(lambda: _served(client, **by_price) == dear.full_slug, timeout=10)
        served_by_cheap = cheap_calls()

    assert by_slug.status_code in (404, 503) and "x-switchyard-endpoint" not in by_slug.headers
    assert served_by_cheap == heard
