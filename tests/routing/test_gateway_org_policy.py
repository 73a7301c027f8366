"""The organisation's routing policy, merged under every request's own, through the gateway."""

from __future__ import annotations

import pytest

from marketplace.data_policy import organization_routing_defaults_update
from tests import factories
from tests.support.cluster import wait_until
from tests.support.upstream import FaultUpstream

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "route me somewhere"}]


@pytest.fixture
def market(upstream):  # type: ignore[no-untyped-def]
    """A cheap endpoint (the router's first choice) and a dearer one, both serving tag:sql."""
    with FaultUpstream() as other:
        cheap = factories.endpoint(base_url=upstream.base_url, tags=("sql",), price_output_usd="1")
        dear = factories.endpoint(base_url=other.base_url, tags=("sql",), price_output_usd="3")
        customer = factories.customer()
        owner = factories.owner(customer.organization)
        yield cheap, dear, customer, owner


def _set(customer, owner, provider):  # type: ignore[no-untyped-def]
    organization_routing_defaults_update(
        actor=owner, organization=customer.organization, provider=provider
    )


def test_the_organisations_policy_applies_to_every_request_and_the_trace_says_so(
    gateway_server, market
):
    cheap, dear, customer, owner = market
    _set(customer, owner, {"ignore": [cheap.vendor.slug]})
    body = {"model": "tag:sql", "messages": MESSAGES, "provider": {"sort": "price"}}
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=body)
        # The request's own policy cannot bring an ignored vendor back: ignore lists add up.
        ordered = client.post(
            "/v1/chat/completions",
            json={**body, "provider": {"order": [cheap.vendor.slug], "ignore": ["nobody"]}},
        )
        trace = client.get("/v1/generation", params={"id": ordered.headers["x-request-id"]}).json()[
            "data"
        ]

    assert response.status_code == 200, response.text
    assert response.headers["x-switchyard-endpoint"] == dear.full_slug
    assert ordered.headers["x-switchyard-endpoint"] == dear.full_slug
    routing = trace["routing"]
    assert routing["organization_policy"] == {"ignore": [cheap.vendor.slug]}
    assert routing["policy"]["ignore"] == sorted([cheap.vendor.slug, "nobody"])
    assert routing["policy"]["order"] == [cheap.vendor.slug]


def test_a_request_overrides_the_organisations_sort_and_a_change_reaches_the_gateway(
    gateway_server, market
):
    cheap, _dear, customer, owner = market
    body = {"model": "tag:sql", "messages": MESSAGES}
    with gateway_server.client(customer.key) as client:
        assert (
            client.post("/v1/chat/completions", json=body).headers["x-switchyard-endpoint"]
            == cheap.full_slug
        )
        # Cheap is over the organisation's price ceiling once its output costs more.
        _set(customer, owner, {"max_price": {"completion": 0.5}})

        def refused() -> bool:
            answer = client.post("/v1/chat/completions", json=body)
            return answer.status_code == 503

        # Both endpoints are dearer than $0.50 a million output tokens: nothing to route to,
        # as soon as the change reached the gateway (it forgets the key's cached settings).
        assert wait_until(refused, timeout=10)
        refusal = client.post("/v1/chat/completions", json=body).json()["error"]
        # A request's own ceiling wins over the organisation's, component by component.
        raised = client.post(
            "/v1/chat/completions",
            json={**body, "provider": {"max_price": {"completion": 5}}},
        )
        _set(customer, owner, {})
        assert wait_until(
            lambda: client.post("/v1/chat/completions", json=body).status_code == 200, timeout=10
        )

    assert refusal["code"] == "no_available_endpoint"
    assert "2 over_max_price" in refusal["message"]
    assert raised.status_code == 200 and raised.headers["x-switchyard-endpoint"] == cheap.full_slug


@pytest.mark.parametrize(
    ("provider", "says"),
    [
        ({"max_price": {"prompt": 10**23}}, "integer beyond 64 bits"),
        ({"max_price": {"prompt": "1e999999999"}}, "too large an amount"),
        ({"max_price": {"prompt": "100000000000"}}, "too large an amount"),
        ({"ignore": ["acme\u0000x"]}, "holds a character no name has"),
        ({"only": []}, "`provider.only` is empty"),
        ({"region": []}, "`provider.region` is empty"),
    ],
)
def test_a_policy_the_gateway_could_not_use_is_refused_with_a_reason(market, provider, says):
    from marketplace.models import Organization
    from marketplace.services import ServiceError

    _cheap, _dear, customer, owner = market
    with pytest.raises(ServiceError) as refused:
        _set(customer, owner, provider)
    assert says in str(refused.value)
    assert Organization.objects.get(pk=customer.organization.pk).routing_defaults in (None, {})


def test_a_huge_max_price_in_a_request_is_a_400_before_any_vendor_is_called(
    gateway_server, market, upstream
):
    from marketplace.redis_client import sync_client

    _cheap, _dear, customer, _owner = market
    upstream.reset()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": "tag:sql",
                "messages": MESSAGES,
                "provider": {"max_price": {"prompt": "100000000000"}},
            },
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "provider.max_price.prompt"
    assert upstream.stats()["total"] == 0
    assert sync_client().zcard("sy:holds") == 0


@pytest.mark.parametrize(
    ("stored", "served"),
    [
        # A preference that no longer parses is dropped; the protective field still holds.
        ({"sort": "cheapest-first", "ignore": ["CHEAP"]}, "dear"),
        # A protective field that no longer parses is not dropped: nothing serves the
        # organisation rather than a prompt going where it said it must not.
        ({"data_collection": "never", "sort": "price"}, None),
        ({"region": 7}, None),
    ],
)
def test_a_stored_policy_that_no_longer_parses_fails_closed_where_it_protects(
    gateway_server, market, upstream, stored, served
):
    from marketplace.models import Organization

    cheap, dear, customer, _owner = market
    if "ignore" in stored:
        stored = {**stored, "ignore": [cheap.vendor.slug.upper()]}
    # As after a change of the rules: stored without the service's check.
    Organization.objects.filter(pk=customer.organization.pk).update(routing_defaults=stored)
    upstream.reset()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES}
        )
    if served is None:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "no_matching_endpoint"
        assert upstream.stats()["total"] == 0
    else:
        assert response.status_code == 200, response.text
        assert response.headers["x-switchyard-endpoint"] == dear.full_slug
