"""Fallback, circuit breaking, capacity, rate limits, traces and embeddings through the
running gateway, against real fault-injecting upstreams."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from billing.ledger import organization_balance
from billing.models import UsageRecord
from billing.money import request_cost
from marketplace.models import ApiKey
from marketplace.redis_client import sync_client
from tests import factories
from tests.conftest import ingest_all
from tests.support.cluster import wait_until
from tests.support.upstream import FaultUpstream
from vendors.pricing import live_key
from vendors.services import endpoint_probe_health

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "route me somewhere"}]


@pytest.fixture
def second_upstream():  # type: ignore[no-untyped-def]
    with FaultUpstream() as server:
        yield server


@pytest.fixture
def two_vendors(upstream, second_upstream):  # type: ignore[no-untyped-def]
    """A cheap endpoint (tried first) and a dearer one, both serving tag:sql."""
    cheap = factories.endpoint(base_url=upstream.base_url, tags=("sql",), price_output_usd="1")
    dear = factories.endpoint(
        base_url=second_upstream.base_url, tags=("sql",), price_output_usd="3"
    )
    return cheap, dear


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        ("status:500", "http_error"),
        ("status:503", "http_error"),
        ("reset", "connect_error"),
        ("malformed-json", "invalid"),
        ("status:401", "http_error"),
        ("ttfb-hang", "timeout"),  # no first byte within GATEWAY_FIRST_BYTE_TIMEOUT
    ],
)
def test_it_falls_back_to_the_next_vendor(
    gateway_server, upstream, second_upstream, two_vendors, fault, outcome, settings
):
    cheap, dear = two_vendors
    settings.GATEWAY_FIRST_BYTE_TIMEOUT = 0.5
    customer = factories.customer()
    before = organization_balance(customer.organization)
    upstream.script([fault])
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES}
        )
        trace = client.get(
            "/v1/generation", params={"id": response.headers["x-request-id"]}
        ).json()["data"]
    assert response.status_code == 200, response.text
    assert response.headers["x-switchyard-endpoint"] == dear.full_slug
    assert response.headers["x-switchyard-attempts"] == "2"
    assert upstream.stats()["total"] == 1 and second_upstream.stats()["total"] == 1
    assert [(a["endpoint"], a["outcome"]) for a in trace["attempts"]] == [
        (cheap.full_slug, outcome),
        (dear.full_slug, "success"),
    ]

    ingest_all()
    record = UsageRecord.objects.get(request_id=response.json()["id"])
    # Charged once, at the quote of the vendor that answered, for the tokens it reported.
    quote = dict(part.split("=") for part in response.headers["x-switchyard-price"].split(";"))
    usage = response.json()["usage"]
    expected = request_cost(
        usage["prompt_tokens"],
        usage["completion_tokens"],
        int(quote["input"]),
        int(quote["output"]),
    )
    assert (record.endpoint_id, record.attempts, record.cost) == (dear.pk, 2, expected)
    assert organization_balance(customer.organization) == before - expected


def test_it_falls_back_past_a_vendor_nothing_listens_at(gateway_server, upstream):
    with socket.socket() as placeholder:  # a port that was free, and is closed again
        placeholder.bind(("127.0.0.1", 0))
        closed = placeholder.getsockname()[1]
    gone = factories.endpoint(
        base_url=f"http://127.0.0.1:{closed}", tags=("sql",), price_output_usd="1"
    )
    alive = factories.endpoint(base_url=upstream.base_url, tags=("sql",), price_output_usd="3")
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES}
        )
        trace = client.get(
            "/v1/generation", params={"id": response.headers["x-request-id"]}
        ).json()["data"]
    assert response.status_code == 200, response.text
    assert response.headers["x-switchyard-endpoint"] == alive.full_slug
    assert [(a["endpoint"], a["outcome"]) for a in trace["attempts"]] == [
        (gone.full_slug, "connect_error"),
        (alive.full_slug, "success"),
    ]


def test_it_respects_retry_after_on_429(gateway_server, upstream, second_upstream, two_vendors):
    _cheap, dear = two_vendors
    customer = factories.customer()
    upstream.script(["status:429;retry_after=60"])
    with gateway_server.client(customer.key) as client:
        first = client.post("/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES})
        second = client.post(
            "/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES}
        )
    assert first.headers["x-switchyard-endpoint"] == dear.full_slug
    # The cheap vendor asked for 60 s of quiet: the next request does not even try it.
    assert second.headers["x-switchyard-endpoint"] == dear.full_slug
    assert upstream.stats()["total"] == 1


def test_it_opens_the_circuit_of_a_failing_vendor(
    gateway_server, upstream, second_upstream, two_vendors
):
    from django.conf import settings

    threshold = settings.GATEWAY_CIRCUIT_FAILURES
    customer = factories.customer()
    upstream.script(["status:500"] * (threshold + 5))
    with gateway_server.client(customer.key) as client:
        for _ in range(threshold + 3):
            response = client.post(
                "/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES}
            )
            assert response.status_code == 200
    # `threshold` consecutive failures opened the circuit; later requests skip that vendor.
    assert upstream.stats()["total"] == threshold
    assert second_upstream.stats()["total"] == threshold + 3


def test_an_open_circuit_half_opens_after_its_cooldown_and_a_good_trial_closes_it(
    gateway_server, upstream, second_upstream, two_vendors
):
    from django.conf import settings

    cheap, dear = two_vendors
    threshold = settings.GATEWAY_CIRCUIT_FAILURES
    customer = factories.customer()
    body = {"model": "tag:sql", "messages": MESSAGES}
    upstream.script(["status:500"] * threshold)
    with gateway_server.client(customer.key) as client:
        opened = [client.post("/v1/chat/completions", json=body) for _ in range(threshold + 1)]
        calls_while_open = upstream.stats()["total"]
        # The cooldown passes (the circuit's opened-at moved back past it, and the endpoint
        # marked changed so every replica's copy re-reads it): the next request is the trial.
        cooled = time.time() - settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS - 1
        sync_client().hset(live_key(cheap.pk), "cb", repr(cooled))
        sync_client().zadd("sy:live:touched", {str(cheap.pk): time.time()})

        def served_by_cheap() -> bool:
            answer = client.post("/v1/chat/completions", json=body)
            return bool(answer.headers["x-switchyard-endpoint"] == cheap.full_slug)

        trial = wait_until(served_by_cheap, timeout=10)
        after = client.post("/v1/chat/completions", json=body)

    assert [r.headers["x-switchyard-endpoint"] for r in opened] == [dear.full_slug] * (
        threshold + 1
    )
    assert calls_while_open == threshold  # the last request skipped the open circuit
    assert trial  # the half-open circuit let one request through, and it succeeded...
    assert after.headers["x-switchyard-endpoint"] == cheap.full_slug  # ...closing it
    assert sync_client().hget(live_key(cheap.pk), "cb") is None


def test_an_endpoint_the_health_probes_find_down_is_skipped_until_a_probe_finds_it_up(
    gateway_server, upstream, second_upstream, two_vendors, settings
):
    cheap, dear = two_vendors
    failures = settings.GATEWAY_CIRCUIT_FAILURES
    upstream.script(["status:503"] * failures)
    for _ in range(failures):  # what Celery beat's health_probe_all does every 30 s
        assert endpoint_probe_health(endpoint=cheap).ok is False
    customer = factories.customer()
    body = {"model": "tag:sql", "messages": MESSAGES}
    with gateway_server.client(customer.key) as client:
        skipped = client.post("/v1/chat/completions", json=body)
        trace = client.get("/v1/generation", params={"id": skipped.headers["x-request-id"]}).json()[
            "data"
        ]
        # Up again: a healthy probe past the cooldown closes the circuit (no trial request).
        settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS = 0.0
        assert endpoint_probe_health(endpoint=cheap).ok is True
        # (each replica's copy of the circuit follows within a refresh, 250 ms)
        assert wait_until(
            lambda: (
                client.post("/v1/chat/completions", json=body).headers["x-switchyard-endpoint"]
                == cheap.full_slug
            ),
            timeout=10,
        )

    # No customer request met the dead endpoint: only the probes called it (either the
    # router's copy already had the circuit open, or the reserve script refused the slot).
    assert skipped.headers["x-switchyard-endpoint"] == dear.full_slug
    assert skipped.headers["x-switchyard-attempts"] == "1"
    assert all(
        a["outcome"] == "skipped:circuit_open"
        for a in trace["attempts"]
        if a["endpoint"] == cheap.full_slug
    )
    assert upstream.stats()["total"] == failures + 2  # the probes, and the request served


def test_it_answers_503_when_every_vendor_is_at_capacity(gateway_server, upstream):
    import threading

    endpoint = factories.endpoint(base_url=upstream.base_url, capacity=1)
    customer = factories.customer()
    # Built here: the ORM in a thread of the test would hold a database connection of its
    # own past the test (and the test database's teardown found it in use).
    body = {"model": endpoint.full_slug, "messages": MESSAGES}
    upstream.script(["delay:1500"])
    results = {}

    def slow() -> None:
        with gateway_server.client(customer.key) as client:
            results["slow"] = client.post("/v1/chat/completions", json=body)

    thread = threading.Thread(target=slow)
    thread.start()
    # Wait until the slow request holds the only slot (the upstream sees it in flight).
    for _ in range(300):
        if upstream.stats()["in_flight"] == 1:
            break
        threading.Event().wait(0.01)
    with gateway_server.client(customer.key) as client:
        busy = client.post("/v1/chat/completions", json=body)
    thread.join()
    assert results["slow"].status_code == 200
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "no_available_endpoint"
    assert upstream.stats()["max_in_flight"] == 1


def test_a_slot_freed_since_the_last_refresh_serves_the_request(gateway_server, upstream):
    """Each replica routes on a copy of the live numbers, refreshed a few times a second.
    When the copy counts every endpoint full, reserve (which counts the slots atomically)
    decides for a few of them: a slot freed since the copy was read is used, not refused."""
    import time

    from marketplace.redis_client import sync_client
    from routing.live import TOUCHED, trace_key
    from tests.support.cluster import wait_until
    from vendors.pricing import live_key

    endpoint = factories.endpoint(base_url=upstream.base_url, capacity=1)
    customer = factories.customer()
    body = {"model": endpoint.full_slug, "messages": MESSAGES}
    gateway = gateway_server.gateway
    with gateway_server.client(customer.key) as client:
        first = client.post("/v1/chat/completions", json=body)
        assert first.status_code == 200
        # (Its settlement reaches Redis before the answer's end reaches us, but Redis may
        # run it after what we send next: wait for its trace.)
        assert wait_until(lambda: sync_client().exists(trace_key(first.json()["id"])))
        # The copy now counts the only slot taken, as it does between a request's end and
        # the next refresh; the slots reserve counts are all free.
        sync_client().hset(live_key(endpoint.pk), "n", 1)
        sync_client().zadd(TOUCHED, {str(endpoint.pk): time.time()})
        assert wait_until(lambda: getattr(gateway.live_view.get(endpoint.pk), "inflight", 0) == 1)
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        trace = client.get("/v1/generation", params={"id": answer.json()["id"]}).json()["data"]
    assert trace["routing"]["capacity_recheck"] is True
    assert [c["endpoint"] for c in trace["routing"]["candidates"]] == [endpoint.full_slug]
    assert upstream.stats()["max_in_flight"] == 1


def test_it_rate_limits_a_key_with_headers(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    ApiKey.objects.filter(organization=customer.organization).update(rate_limit_rpm=2)
    with gateway_server.client(customer.key) as client:
        answers = [
            client.post(
                "/v1/chat/completions", json={"model": endpoint.full_slug, "messages": MESSAGES}
            )
            for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert answers[2].json()["error"]["type"] == "rate_limit_error"
    assert int(answers[2].headers["retry-after"]) >= 1
    assert upstream.stats()["total"] == 2


def test_a_fallback_hop_is_the_same_request_for_the_rate_limit(
    gateway_server, upstream, two_vendors
):
    # RPM 1: the first vendor fails, the second answers. One request, counted once: the
    # hop is neither refused by the limit the request itself used up nor counted again.
    _cheap, dear = two_vendors
    customer = factories.customer()
    ApiKey.objects.filter(organization=customer.organization).update(rate_limit_rpm=1)
    upstream.script(["status:500"])
    body = {"model": "tag:sql", "messages": MESSAGES, "provider": {"sort": "price"}}
    with gateway_server.client(customer.key) as client:
        served = client.post("/v1/chat/completions", json=body)
        refused = client.post("/v1/chat/completions", json=body)
    assert served.status_code == 200, served.text
    assert served.headers["x-switchyard-endpoint"] == dear.full_slug
    assert served.headers["x-switchyard-attempts"] == "2"
    assert served.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.status_code == 429  # the minute's one request was that one


def test_it_stops_a_key_at_its_credit_limit_with_402(gateway_server, upstream):
    endpoint = factories.endpoint(
        base_url=upstream.base_url, price_input_usd="1000", price_output_usd="1000"
    )
    customer = factories.customer(credit_usd="100")
    # 0.05 USD per key: one request with max_tokens 8 holds ~0.04 USD.
    ApiKey.objects.filter(organization=customer.organization).update(credit_limit=50_000_000)
    body = {"model": endpoint.full_slug, "messages": MESSAGES, "max_tokens": 8}
    with gateway_server.client(customer.key) as client:
        first = client.post("/v1/chat/completions", json=body)
        second = client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200
    assert second.status_code == 402 and second.json()["error"]["code"] == "key_credit_limit"


def test_a_fallback_hop_checks_the_credit_again_and_the_refusal_is_on_record(
    gateway_server, upstream, second_upstream
):
    cheap = factories.endpoint(base_url=upstream.base_url, tags=("sql",), price_output_usd="1")
    # The next vendor's hold (100 output tokens at $1,000 a million: $0.10) is more than the
    # customer has; the first one's ($0.0001) is not.
    dear = factories.endpoint(
        base_url=second_upstream.base_url, tags=("sql",), price_output_usd="1000"
    )
    customer = factories.customer(credit_usd="0.05")
    before = organization_balance(customer.organization)
    upstream.script(["status:500"])
    body = {"model": "tag:sql", "messages": MESSAGES, "max_tokens": 100}
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=body)
        request_id = response.headers["x-request-id"]
        trace = client.get("/v1/generation", params={"id": request_id})

    assert response.status_code == 402, response.text
    assert response.json()["error"]["code"] == "insufficient_credit"
    assert response.headers["x-switchyard-attempts"] == "1"
    assert upstream.stats()["total"] == 1 and second_upstream.stats()["total"] == 0
    # The trace says what happened: the first vendor failed, the second was not affordable.
    assert trace.status_code == 200, trace.text
    data = trace.json()["data"]
    assert data["outcome"] == "insufficient_credit" and data["served_by"] is None
    assert [(a["endpoint"], a["outcome"], a["status"]) for a in data["attempts"]] == [
        (cheap.full_slug, "http_error", 500),
        (dear.full_slug, "skipped:insufficient_credit", None),
    ]
    assert data["attempts"][1]["quote"]["output"] > data["attempts"][0]["quote"]["output"]
    # Nothing charged; the failed request is on the customer's record like any other.
    ingest_all()
    assert organization_balance(customer.organization) == before
    failed = UsageRecord.objects.get(request_id=request_id)
    assert (failed.outcome, failed.cost, failed.attempts) == ("failed", 0, 1)


def test_fallback_stops_at_the_total_deadline(gateway_server, upstream, second_upstream, settings):
    settings.GATEWAY_FIRST_BYTE_TIMEOUT = 0.6
    settings.GATEWAY_TOTAL_TIMEOUT = 1.0
    with FaultUpstream() as third_upstream:
        slugs = [
            factories.endpoint(
                base_url=server.base_url, tags=("sql",), price_output_usd=str(price)
            ).full_slug
            for price, server in enumerate((upstream, second_upstream, third_upstream), start=1)
        ]
        upstream.script(["ttfb-hang"])
        second_upstream.script(["ttfb-hang"])
        customer = factories.customer()
        with gateway_server.client(customer.key) as client:
            response = client.post(
                "/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES}
            )
            trace = client.get(
                "/v1/generation", params={"id": response.headers["x-request-id"]}
            ).json()["data"]
        third_calls = third_upstream.stats()["total"]

    # The first vendor has its 0.6 s, the second the 0.4 s left of the 1 s; the third,
    # which would have answered, is never called: the request is out of time.
    assert response.status_code == 502 and response.json()["error"]["code"] == "deadline_exceeded"
    assert third_calls == 0 and response.headers["x-switchyard-attempts"] == "2"
    assert [(a["endpoint"], a["outcome"]) for a in trace["attempts"]] == [
        (slugs[0], "timeout"),
        (slugs[1], "timeout"),
    ]


def test_the_trace_explains_what_happened_and_only_to_its_owner(
    gateway_server, upstream, second_upstream, two_vendors
):
    cheap, dear = two_vendors
    pricey = factories.endpoint(
        base_url=upstream.base_url, tags=("sql",), price_output_usd="50"
    )  # over the request's max_price: filtered, and the trace says so
    owner = factories.customer()
    stranger = factories.customer()
    upstream.script(["status:503"])
    body = {
        "model": "tag:sql",
        "messages": MESSAGES,
        "provider": {"max_price": {"completion": 10}},
    }
    with gateway_server.client(owner.key) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
        request_id = answer["id"]
        trace = client.get("/v1/generation", params={"id": request_id}).json()["data"]
    with gateway_server.client(stranger.key) as client:
        hidden = client.get("/v1/generation", params={"id": request_id})

    rows = {row["endpoint"]: row for row in trace["routing"]["endpoints"]}
    assert (rows[pricey.full_slug]["status"], rows[pricey.full_slug]["reason"]) == (
        "filtered",
        "over_max_price",
    )
    assert trace["routing"]["filtered"] == {"over_max_price": 1}
    assert trace["routing"]["policy"]["max_price"]["completion"] == 10 * 10**9
    assert all(a["latency_ms"] >= 0 and a["quote"]["output"] > 0 for a in trace["attempts"])
    usage = answer["usage"]
    assert trace["tokens"] == {
        "prompt": usage["prompt_tokens"],
        "completion": usage["completion_tokens"],
    }
    assert trace["cost_nanos"] == usage["cost_nanos"]

    assert [c["endpoint"] for c in trace["routing"]["candidates"]] == [
        cheap.full_slug,
        dear.full_slug,
    ]
    assert [(a["endpoint"], a["outcome"], a["status"]) for a in trace["attempts"]] == [
        (cheap.full_slug, "http_error", 503),
        (dear.full_slug, "success", 200),
    ]
    assert trace["served_by"] == dear.full_slug
    assert "route me somewhere" not in str(trace)  # prompts are not stored
    assert hidden.status_code == 404


def test_it_routes_embeddings_and_charges_input_tokens(gateway_server, upstream):
    endpoint = factories.endpoint(
        base_url=upstream.base_url,
        kind="embeddings",
        tags=("embed",),
        price_input_usd="0.5",
        price_output_usd="0",
    )
    chat_only = factories.endpoint(base_url=upstream.base_url, tags=("embed",))
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/embeddings", json={"model": "tag:embed", "input": ["a b c", "d e"]}
        )
        wrong_kind = client.post(
            "/v1/embeddings", json={"model": chat_only.full_slug, "input": "x"}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 2 and body["usage"]["cost_nanos"] > 0
    assert response.headers["x-switchyard-endpoint"] == endpoint.full_slug
    assert wrong_kind.status_code == 404
    ingest_all()
    assert UsageRecord.objects.get(organization=customer.organization).completion_tokens == 0


def test_embeddings_fall_back_like_chat(gateway_server, upstream, second_upstream):
    first, second = (
        factories.endpoint(
            base_url=server.base_url,
            kind="embeddings",
            tags=("embed",),
            price_input_usd=price,
            price_output_usd="0",
        )
        for server, price in ((upstream, "0.5"), (second_upstream, "0.9"))
    )
    customer = factories.customer()
    upstream.script(["status:503"])
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/embeddings", json={"model": "tag:embed", "input": "a b"})
    assert response.status_code == 200, response.text
    assert response.headers["x-switchyard-endpoint"] == second.full_slug
    assert response.headers["x-switchyard-attempts"] == "2"
    assert upstream.stats()["total"] == 1 and first.full_slug != second.full_slug


@pytest.mark.parametrize(
    "body",
    [
        {"input": "x"},
        {"model": "m"},
        {"model": "m", "input": []},
        {"model": "m", "input": [1.5]},
        {"model": "m", "input": "x", "encoding_format": "hex"},
    ],
)
def test_it_refuses_bad_embeddings_bodies(gateway_server, upstream, body):
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] in (
        "model",
        "input",
        "encoding_format",
    )
    assert upstream.stats()["total"] == 0


def test_feedback_on_an_answer_moves_the_endpoints_quality(gateway_server, upstream):
    from vendors.models import EndpointQuality, Feedback

    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    owner = factories.customer()
    stranger = factories.customer()
    with gateway_server.client(owner.key) as client:
        request_id = client.post(
            "/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES}
        ).json()["id"]
        rated = client.post("/v1/feedback", json={"id": request_id, "score": 0.0})
        bad = client.post("/v1/feedback", json={"id": request_id, "score": 7})
    with gateway_server.client(stranger.key) as client:
        foreign = client.post("/v1/feedback", json={"id": request_id, "score": 1.0})

    assert rated.status_code == 200, rated.text
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"
    assert foreign.status_code == 404
    feedback = Feedback.objects.get(request_id=request_id)
    assert (
        feedback.endpoint_id == endpoint.pk and feedback.tags == ["sql"] and feedback.score == 0.0
    )
    quality = EndpointQuality.objects.get(endpoint=endpoint, tag="sql")
    assert quality.feedback_n == 1 and quality.score < 0.5


def test_ingest_feeds_each_endpoints_observed_success(
    gateway_server, upstream, second_upstream, two_vendors
):
    from vendors.models import EndpointQuality

    cheap, dear = two_vendors
    customer = factories.customer()
    upstream.script(["status:500"])
    with gateway_server.client(customer.key) as client:
        for _ in range(2):
            assert (
                client.post(
                    "/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES}
                ).status_code
                == 200
            )
    ingest_all()
    failing = EndpointQuality.objects.get(endpoint=cheap, tag="sql")
    healthy = EndpointQuality.objects.get(endpoint=dear, tag="sql")
    # The cheap endpoint failed once and then served once; the dear one served once.
    assert (failing.success_n, failing.total_n) == (1, 2)
    assert (healthy.success_n, healthy.total_n) == (1, 1)
    assert healthy.score > failing.score


def test_it_does_not_fall_back_when_the_customer_forbids_it(
    gateway_server, upstream, second_upstream, two_vendors
):
    customer = factories.customer()
    upstream.script(["status:500"])
    body = {"model": "tag:sql", "messages": MESSAGES, "provider": {"allow_fallbacks": False}}
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 502
    assert second_upstream.stats()["total"] == 0


def test_it_honours_the_provider_policy(gateway_server, upstream, second_upstream, two_vendors):
    cheap, dear = two_vendors
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        ignored = client.post(
            "/v1/chat/completions",
            json={
                "model": "tag:sql",
                "messages": MESSAGES,
                "provider": {"ignore": [cheap.vendor.slug]},
            },
        )
        ordered = client.post(
            "/v1/chat/completions",
            json={
                "model": "tag:sql",
                "messages": MESSAGES,
                "provider": {"order": [dear.full_slug]},
            },
        )
        capped = client.post(
            "/v1/chat/completions",
            json={
                "model": "tag:sql",
                "messages": MESSAGES,
                "provider": {"max_price": {"prompt": 1, "completion": 2}},
            },
        )
        bad = client.post(
            "/v1/chat/completions",
            json={"model": "tag:sql", "messages": MESSAGES, "provider": {"shuffle": True}},
        )
    assert ignored.headers["x-switchyard-endpoint"] == dear.full_slug
    assert ordered.headers["x-switchyard-endpoint"] == dear.full_slug
    assert capped.headers["x-switchyard-endpoint"] == cheap.full_slug
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("provider")


def test_load_raises_the_quote_and_moves_price_sorted_traffic_away(
    gateway_server, upstream, second_upstream
):
    import threading
    import time

    surging = factories.endpoint(
        base_url=upstream.base_url,
        tags=("legal",),
        capacity=10,
        price_input_usd="1",
        price_output_usd="1",
        surge_curve=[[0.0, 1.0], [0.1, 2.0], [1.0, 3.0]],
    )
    steady = factories.endpoint(
        base_url=second_upstream.base_url,
        tags=("legal",),
        capacity=100,
        price_input_usd="1.5",
        price_output_usd="1.5",
    )
    customer = factories.customer()
    by_price = {"model": "tag:legal", "messages": MESSAGES, "provider": {"sort": "price"}}
    with gateway_server.client(customer.key) as client:
        assert (
            client.post("/v1/chat/completions", json=by_price).headers["x-switchyard-endpoint"]
            == surging.full_slug
        )

    upstream.set_delay(3000)
    threads = []
    slow_body = {"model": surging.full_slug, "messages": MESSAGES}  # (no ORM in the threads)
    slow_answers: list[Any] = []
    for _ in range(3):

        def slow() -> None:
            with gateway_server.client(customer.key) as c:
                slow_answers.append(c.post("/v1/chat/completions", json=slow_body))

        threads.append(threading.Thread(target=slow))
        threads[-1].start()
    served_by = None
    try:
        assert any(upstream.stats()["in_flight"] == 3 or time.sleep(0.02) for _ in range(200))
        with gateway_server.client(customer.key) as client:
            for _ in range(100):  # the gateway's live view refreshes a few times a second
                response = client.post("/v1/chat/completions", json=by_price)
                served_by = response.headers["x-switchyard-endpoint"]
                if served_by == steady.full_slug:
                    break
                time.sleep(0.05)
            trace = client.get("/v1/generation", params={"id": response.json()["id"]}).json()[
                "data"
            ]
            capped = client.post(
                "/v1/chat/completions",
                json={
                    **by_price,
                    "provider": {"sort": "price", "max_price": {"prompt": 1.4, "completion": 1.4}},
                },
            )
    finally:
        for thread in threads:
            thread.join()
    # Busy, the cheap vendor's quote surged above the steady one: price-sorted traffic moved.
    assert served_by == steady.full_slug
    quotes = {c["endpoint"]: c["quote"] for c in trace["routing"]["candidates"]}
    assert quotes[surging.full_slug]["input"] > 1_500_000_000
    # At the surged quote the cheap vendor is over this max_price; the steady one always was.
    assert capped.status_code == 503 and "over_max_price" in capped.json()["error"]["message"]
    # More requests while it is busy keep going to the steady vendor (not a one-off).
    with gateway_server.client(customer.key) as client:
        upstream.set_delay(3000)

        def hold_a_slot() -> None:
            with gateway_server.client(customer.key) as c:
                c.post("/v1/chat/completions", json=slow_body)

        holders = [threading.Thread(target=hold_a_slot) for _ in range(3)]
        for holder in holders:
            holder.start()
        assert any(upstream.stats()["in_flight"] == 3 or time.sleep(0.02) for _ in range(200))
        time.sleep(0.6)  # a few refreshes of the live numbers
        during = [
            client.post("/v1/chat/completions", json=by_price).headers["x-switchyard-endpoint"]
            for _ in range(5)
        ]
        for holder in holders:
            holder.join()
    assert during == [steady.full_slug] * 5
    # Each request was charged at the quote it was given when it was routed (its
    # x-switchyard-price), whatever the load did afterwards.
    ingest_all()
    assert len(slow_answers) == 3
    for answer in slow_answers:
        assert answer.status_code == 200, answer.text
        quote = dict(part.split("=") for part in answer.headers["x-switchyard-price"].split(";"))
        record = UsageRecord.objects.get(request_id=answer.json()["id"])
        assert (record.price_input, record.price_output) == (
            int(quote["input"]),
            int(quote["output"]),
        )
        assert record.cost == request_cost(
            record.prompt_tokens, record.completion_tokens, record.price_input, record.price_output
        )
    assert len({r.price_input for r in UsageRecord.objects.filter(endpoint=surging)}) > 1


def test_it_limits_tokens_per_minute_per_key(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    ApiKey.objects.filter(organization=customer.organization).update(rate_limit_tpm=20)
    body = {
        "model": endpoint.full_slug,
        "messages": [{"role": "user", "content": "a b c d e f"}],
        "max_tokens": 8,
    }
    with gateway_server.client(customer.key) as client:
        first = client.post("/v1/chat/completions", json=body)
        second = client.post("/v1/chat/completions", json=body)
        third = client.post("/v1/chat/completions", json=body)
    # Each answer uses 6 prompt + 6 completion tokens: the third request finds 24 >= 20 used.
    assert first.headers["x-ratelimit-limit-tokens"] == "20"
    assert first.headers["x-ratelimit-remaining-tokens"] == "20"
    assert second.headers["x-ratelimit-remaining-tokens"] == "8"
    assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limited"


def test_a_session_sticks_to_its_endpoint_until_it_fails(
    gateway_server, upstream, second_upstream, two_vendors
):
    cheap, dear = two_vendors
    customer = factories.customer()
    session = {"model": "tag:sql", "messages": MESSAGES, "session_id": "conversation-42"}
    with gateway_server.client(customer.key) as client:
        # The session starts on the dear endpoint (the cheap one is ignored for this call)...
        first = client.post(
            "/v1/chat/completions", json={**session, "provider": {"ignore": [cheap.vendor.slug]}}
        )
        # ...and stays there although the cheap endpoint would win on price.
        second = client.post("/v1/chat/completions", json=session)
        other = client.post("/v1/chat/completions", json={**session, "session_id": "another"})
        second_upstream.script(["status:500"])
        moved = client.post("/v1/chat/completions", json=session)
        after = client.post("/v1/chat/completions", json=session)
    assert first.headers["x-switchyard-endpoint"] == dear.full_slug
    assert second.headers["x-switchyard-endpoint"] == dear.full_slug
    assert other.headers["x-switchyard-endpoint"] == cheap.full_slug
    assert moved.headers["x-switchyard-endpoint"] == cheap.full_slug  # it failed: fall back
    assert after.headers["x-switchyard-endpoint"] == cheap.full_slug  # and stick there now


def test_the_user_field_keys_a_session_and_max_price_breaks_it(
    gateway_server, upstream, second_upstream, two_vendors
):
    cheap, dear = two_vendors
    customer = factories.customer()
    chat = {"model": "tag:sql", "messages": MESSAGES, "user": "end-user-7"}
    with gateway_server.client(customer.key) as client:
        started = client.post(
            "/v1/chat/completions", json={**chat, "provider": {"ignore": [cheap.vendor.slug]}}
        )
        stuck = client.post("/v1/chat/completions", json=chat)
        # The dear endpoint ($3 a million output tokens) is over this request's max_price:
        # the session does not drag the request past the customer's ceiling.
        capped = client.post(
            "/v1/chat/completions", json={**chat, "provider": {"max_price": {"completion": 2}}}
        )
    assert started.headers["x-switchyard-endpoint"] == dear.full_slug
    assert stuck.headers["x-switchyard-endpoint"] == dear.full_slug  # keyed by `user`
    assert capped.headers["x-switchyard-endpoint"] == cheap.full_slug


def test_an_organisation_stops_at_its_monthly_budget_with_402(gateway_server, upstream):
    from marketplace.models import Organization

    endpoint = factories.endpoint(
        base_url=upstream.base_url, price_input_usd="1000", price_output_usd="1000"
    )
    customer = factories.customer(credit_usd="100")
    # Each request holds about 0.04 USD at these prices; the budget is 0.05 USD a month.
    Organization.objects.filter(pk=customer.organization.pk).update(monthly_budget=50_000_000)
    body = {"model": endpoint.full_slug, "messages": MESSAGES, "max_tokens": 8}
    with gateway_server.client(customer.key) as client:
        first = client.post("/v1/chat/completions", json=body)
        second = client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200
    assert second.status_code == 402
    assert second.json()["error"]["code"] == "organization_budget"
    assert upstream.stats()["total"] == 1


@pytest.mark.parametrize("fault", ["none", "trickle:20"])
def test_it_reads_a_vendor_answer_that_arrives_in_pieces(gateway_server, upstream, fault):
    """Found by schemathesis: a ~110 kB answer (2048 inputs) was read only as far as the
    first network chunk and called invalid (502); ``trickle`` sends the body in 8 pieces."""
    endpoint = factories.endpoint(base_url=upstream.base_url, kind="embeddings", tags=("embed",))
    customer = factories.customer()
    upstream.script([fault])
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/embeddings",
            json={"model": endpoint.full_slug, "input": ["0"] * 2048, "dimensions": 1},
        )
    assert response.status_code == 200, response.text
    assert [item["index"] for item in response.json()["data"]] == list(range(2048))


def test_moved_quality_scores_reach_routing_without_holding_requests(gateway_server, upstream):
    """A quality change is loaded in the background: requests are served on the table the
    gateway has while the reload waits (here: for a lock on the endpoints table)."""
    import time

    from django.db import connection, transaction

    from marketplace import invalidation
    from vendors.services import quality_observe

    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    customer = factories.customer()
    body = {"model": "tag:sql", "messages": MESSAGES, "provider": {"min_quality": 0.4}}
    with gateway_server.client(customer.key) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200  # loaded
        with transaction.atomic():
            # every answer of the endpoint failed: its score falls far below 0.4
            quality_observe(endpoint.pk, None, 0, 1000)
            with connection.cursor() as cursor:
                cursor.execute("LOCK TABLE vendors_endpoint IN ACCESS EXCLUSIVE MODE")
            invalidation.publish_now(invalidation.QUALITY)  # the reload now waits on the lock
            time.sleep(0.3)
            during = client.post("/v1/chat/completions", json=body, timeout=10)
        # committed: the lock is gone and the on-commit "quality" message is out
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            after = client.post("/v1/chat/completions", json=body)
            if after.status_code != 200:
                break
            time.sleep(0.1)
    assert during.status_code == 200  # served from the table it had, not kept waiting
    assert after.status_code == 404
    assert after.json()["error"]["code"] == "no_matching_endpoint"
    assert "below_min_quality" in after.json()["error"]["message"]
