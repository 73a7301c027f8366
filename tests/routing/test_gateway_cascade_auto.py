"""Cascade and auto-routing through the running gateway."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from billing.models import UsageRecord
from routing.traces import stored_trace
from tests import factories
from tests.conftest import ingest_all, ingest_traces
from tests.support.upstream import FaultUpstream
from vendors.services import endpoint_update_pricing

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION = [{"role": "user", "content": "what is the capital of france"}]


@pytest.fixture
def tiers(upstream):  # type: ignore[no-untyped-def]
    with FaultUpstream() as strong:
        weak = factories.endpoint(
            base_url=upstream.base_url, tags=("qa",), price_input_usd="0.1", price_output_usd="0.1"
        )
        good = factories.endpoint(
            base_url=strong.base_url, tags=("qa",), price_input_usd="2", price_output_usd="2"
        )
        strong.configure(logprob_mean=-0.01)
        yield upstream, strong, weak, good


def test_a_low_confidence_answer_escalates_and_both_legs_are_billed(gateway_server, tiers):
    cheap_server, _strong_server, weak, good = tiers
    cheap_server.configure(logprob_mean=-2.0)  # exp(-2) = 0.14: not trusted
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "tag:qa", "messages": QUESTION, "cascade": {"threshold": 0.6}},
        )
        body = response.json()
        trace = client.get("/v1/generation", params={"id": body["id"]}).json()["data"]

    assert response.status_code == 200, body
    assert response.headers["x-switchyard-endpoint"] == good.full_slug
    assert "logprobs" not in body["choices"][0] or body["choices"][0]["logprobs"] is None
    assert cheap_server.last_request()["body"]["logprobs"] is True
    assert "cascade" not in cheap_server.last_request()["body"]
    decisions = [(t["endpoint"], t["decision"]) for t in trace["routing"]["cascade"]["tiers"]]
    assert decisions == [(weak.full_slug, "escalated"), (good.full_slug, "final")]
    # PostgreSQL keeps the rewritten trace (with the cascade), not the one settle wrote.
    ingest_traces()
    kept = stored_trace(body["id"])
    assert kept is not None and kept["routing"]["cascade"] == trace["routing"]["cascade"]
    ingest_all()
    legs = UsageRecord.objects.filter(organization=customer.organization).order_by("request_id")
    assert [r.endpoint_id for r in legs] == [weak.pk, good.pk]
    assert all(r.cost > 0 for r in legs)


def test_a_confident_cheap_answer_is_served_and_the_dear_tier_never_called(gateway_server, tiers):
    cheap_server, strong_server, weak, _good = tiers
    cheap_server.configure(logprob_mean=-0.05)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "tag:qa", "messages": QUESTION, "provider": {"sort": "cascade"}},
        )
        streamed = client.post(
            "/v1/chat/completions",
            json={
                "model": "tag:qa",
                "messages": QUESTION,
                "cascade": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert response.headers["x-switchyard-endpoint"] == weak.full_slug
    assert response.json()["switchyard"]["cascade"]["served_tier"] == 0
    assert strong_server.stats()["total"] == 0
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert '"cost_nanos"' in streamed.text
    ingest_all()
    assert UsageRecord.objects.filter(organization=customer.organization).count() == 2


@pytest.mark.parametrize("stream", [False, True])
def test_an_unsure_answer_is_served_after_all_when_the_dearer_tier_fails(
    gateway_server, tiers, stream
):
    cheap_server, strong_server, weak, good = tiers
    cheap_server.configure(logprob_mean=-2.0)  # escalates
    strong_server.script(["status:500"])
    customer = factories.customer()
    body = {"model": "tag:qa", "messages": QUESTION, "cascade": {"threshold": 0.6}}
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json={**body, "stream": stream})
        request_id = response.headers["x-request-id"]
        trace = client.get("/v1/generation", params={"id": request_id}).json()["data"]

    # The cheap leg was paid for: its answer is served rather than an error.
    assert response.status_code == 200, response.text
    assert response.headers["x-switchyard-endpoint"] == weak.full_slug
    assert request_id.endswith("-t0") and strong_server.stats()["total"] == 1
    if stream:
        assert response.text.endswith("data: [DONE]\n\n")
        assert '"content":"what is the capital of france"' in response.text
    else:
        assert response.json()["switchyard"]["cascade"]["kept_because"] == "upstream_failed"
    cascade = trace["routing"]["cascade"]
    assert [(t["endpoint"], t["decision"]) for t in cascade["tiers"]] == [
        (weak.full_slug, "kept"),
        (good.full_slug, "failed"),
    ]
    assert cascade["served_tier"] == 0 and cascade["kept_because"] == "upstream_failed"
    ingest_all()
    legs = UsageRecord.objects.filter(organization=customer.organization).order_by("request_id")
    assert [(r.endpoint_id, r.outcome, r.cost > 0) for r in legs] == [
        (weak.pk, "success", True),
        (None, "failed", False),
    ]


def test_an_escalation_the_customer_cannot_afford_serves_the_unsure_answer(gateway_server, tiers):
    cheap_server, strong_server, weak, good = tiers
    cheap_server.configure(logprob_mean=-2.0)  # escalates
    endpoint_update_pricing(  # $400 a million output tokens: a hold of $0.40
        endpoint=good,
        price_input=good.price_input,
        price_output=200 * good.price_output,
        surge_curve=good.surge_curve,
        surge_cap=good.surge_cap,
    )
    customer = factories.customer(credit_usd="0.05")
    body = {
        "model": "tag:qa",
        "messages": QUESTION,
        "max_tokens": 1000,
        "cascade": {"threshold": 0.6},
    }
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=body)

    assert response.status_code == 200, response.text
    assert response.headers["x-switchyard-endpoint"] == weak.full_slug
    cascade = response.json()["switchyard"]["cascade"]
    assert [t["decision"] for t in cascade["tiers"]] == ["kept", "refused"]
    assert cascade["kept_because"] == "insufficient_credit"
    assert strong_server.stats()["total"] == 0


def test_a_bad_cascade_object_is_a_400(gateway_server, tiers):
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "tag:qa", "messages": QUESTION, "cascade": {"threshold": 7}},
        )
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("cascade")


def test_auto_routes_a_clear_prompt_to_the_right_specialist(gateway_server, upstream):
    call_command("load_tag_examples", stdout=io.StringIO())
    sql = factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    general = factories.endpoint(base_url=upstream.base_url, tags=("general",))
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        clear = client.post(
            "/v1/chat/completions",
            json={
                "model": "auto",
                "messages": [
                    {"role": "user", "content": "Write a SQL query that counts orders per customer"}
                ],
            },
        )
        vague = client.post(
            "/v1/chat/completions",
            json={
                "model": "auto",
                "messages": [{"role": "user", "content": "hello there, how's it going"}],
            },
        )
        trace = client.get("/v1/generation", params={"id": clear.json()["id"]}).json()["data"]
        vague_trace = client.get("/v1/generation", params={"id": vague.json()["id"]}).json()["data"]

    assert clear.headers["x-switchyard-endpoint"] == sql.full_slug
    assert trace["routing"]["auto"]["tag"] == "sql"
    assert trace["routing"]["auto"]["confidence"] > 0.5
    assert trace["routing"]["auto"]["fallback_used"] is False
    assert vague.headers["x-switchyard-endpoint"] == general.full_slug
    # The ambiguous prompt's trace says why: a confidence under the threshold, so the
    # general tag, not the nearest specialist.
    unsure = vague_trace["routing"]["auto"]
    assert unsure["fallback_used"] is True and unsure["tag"] == "general"
    assert unsure["confidence"] < unsure["threshold"] < trace["routing"]["auto"]["confidence"]
