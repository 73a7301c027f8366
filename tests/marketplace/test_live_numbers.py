"""The gateway's live numbers as the vendor and operations dashboards get them: read from
the Redis hashes the gateway writes, priced with the endpoint's surge curve, one message per
vendor (its own endpoints only) and one for the operations group."""

from __future__ import annotations

import time

import orjson
import pytest
from django.urls import reverse

from marketplace.live.groups import OPS_GROUP, vendor_group
from marketplace.live.numbers import PREVIOUS, live_numbers_messages
from marketplace.redis_client import sync_client
from routing.live import CIRCUIT, LATENCY, OUTCOMES, REQUESTS, UTILISATION
from tests import factories
from vendors.pricing import live_key, quote, surge_multiplier

pytestmark = pytest.mark.django_db

BASE_URL = "http://127.0.0.1:9/v1"


def test_it_prices_each_endpoint_at_its_utilisation_and_reports_its_circuit():
    busy = factories.endpoint(base_url=BASE_URL, price_input_usd="1", price_output_usd="2")
    other = factories.endpoint(base_url=BASE_URL)
    redis = sync_client()
    ep = str(busy.pk)
    redis.hset(
        live_key(ep),
        mapping={
            UTILISATION: "0.9",
            CIRCUIT: str(time.time()),  # opened just now
            LATENCY: "41.6",
            OUTCOMES: "0.75",
            REQUESTS: "100",
        },
    )

    messages = dict(live_numbers_messages())

    values = messages[vendor_group(busy.vendor_id)]["values"]
    multiplier = surge_multiplier(busy.surge_curve, 0.9, busy.surge_cap)
    assert multiplier > 1
    assert values[f"ep.{ep}.price_input"] == quote(busy.price_input, multiplier)
    assert values[f"ep.{ep}.price_output"] == quote(busy.price_output, multiplier)
    assert values[f"ep.{ep}.circuit"] == "open"
    assert values[f"ep.{ep}.utilisation"] == 0.9
    assert values[f"ep.{ep}.latency"] == 42
    assert values[f"ep.{ep}.error_rate"] == 0.25
    assert values[f"ep.{ep}.rps"] is None  # no earlier counters to compare with
    # A vendor's message carries its own endpoints only; operations see every endpoint.
    assert not any(key.startswith(f"ep.{other.pk}.") for key in values)
    assert messages[vendor_group(other.vendor_id)]["values"][f"ep.{other.pk}.circuit"] == "closed"
    assert f"ep.{other.pk}.circuit" in messages[OPS_GROUP]["values"]


def test_it_derives_requests_per_second_from_the_gateways_counters():
    endpoint = factories.endpoint(base_url=BASE_URL)
    redis = sync_client()
    ep = str(endpoint.pk)
    # Given a push a while ago that saw 100 requests, and 160 served since then...
    redis.hset(live_key(ep), REQUESTS, "160")
    redis.set(PREVIOUS, orjson.dumps({"at": time.time() - 30, "req": {ep: 100}}))

    ops = dict(live_numbers_messages())[OPS_GROUP]["values"]

    # ...the rate is positive and the page total is the sum of the endpoints' rates.
    assert ops[f"ep.{ep}.rps"] > 0
    assert ops["live.rps"] == ops[f"ep.{ep}.rps"]
    # The counters are remembered for the next push.
    assert orjson.loads(redis.get(PREVIOUS))["req"] == {ep: 160}


def test_the_operations_live_page_renders_the_figures_for_staff(client):
    endpoint = factories.endpoint(base_url=BASE_URL)
    sync_client().hset(live_key(endpoint.pk), CIRCUIT, str(time.time()))
    staff = factories.user()
    staff.is_staff = True
    staff.save()
    client.force_login(staff)

    page = client.get(reverse("ops:live")).content.decode()

    assert endpoint.full_slug in page
    assert f'data-live-key="ep.{endpoint.pk}.circuit" data-live-format="text"' in page
    assert ">open</span>" in page
    assert 'data-live-socket="/ws/ops/"' in page
