"""POST /v1/chat/completions through a real HTTP server against a real (fault-injecting)
upstream: the answer, its cost, the usage record and the ledger charge."""

from __future__ import annotations

import threading

import orjson
import pytest

from billing.ledger import organization_balance
from billing.models import LedgerEntry, LedgerTransaction, UsageRecord
from billing.money import request_cost, usd_to_nanos
from tests import factories
from tests.conftest import ingest_all

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"messages": [{"role": "user", "content": "say hello to the world"}], "max_tokens": 8}


def _sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_it_routes_a_request_to_the_endpoint_and_charges_it_once(gateway_server, upstream):
    endpoint = factories.endpoint(
        base_url=upstream.base_url, upstream_model="up-model", secret="vendor-secret"
    )
    customer = factories.customer(credit_usd="10")
    before = organization_balance(customer.organization)

    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "model": endpoint.full_slug})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"]
    assert body["switchyard"]["vendor"] == endpoint.vendor.slug
    assert response.headers["x-switchyard-endpoint"] == endpoint.full_slug
    usage = body["usage"]
    expected = request_cost(
        usage["prompt_tokens"], usage["completion_tokens"], usd_to_nanos("1"), usd_to_nanos("2")
    )
    assert usage["cost_nanos"] == expected > 0

    forwarded = upstream.last_request("/v1/chat/completions")
    assert forwarded["body"]["model"] == "up-model"
    assert forwarded["headers"]["Authorization"] == "Bearer vendor-secret"
    assert customer.key not in orjson.dumps(forwarded).decode()

    assert ingest_all() == 1
    record = UsageRecord.objects.get(request_id=body["id"])
    assert (record.cost, record.endpoint_id, record.outcome) == (expected, endpoint.pk, "success")
    assert organization_balance(customer.organization) == before - expected
    # Charged once: the record points at its batch's usage posting, which debits exactly it.
    assert record.transaction.kind == LedgerTransaction.Kind.USAGE
    debited = LedgerEntry.objects.filter(
        transaction=record.transaction, account__organization=customer.organization
    ).values_list("amount", flat=True)
    assert list(debited) == [-expected]


def test_it_routes_by_capability_tag(gateway_server, upstream):
    factories.endpoint(base_url=upstream.base_url, tags=("chat", "sql"))
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "model": "tag:sql"})
    assert response.status_code == 200, response.text
    assert (
        "sql" in response.json()["switchyard"]["endpoint"]
        or response.json()["switchyard"]["vendor"]
    )


def test_it_streams_chunks_and_ends_with_usage_and_cost(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    payload = {
        **CHAT,
        "model": endpoint.full_slug,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    content = [c for c in chunks if c.get("choices")]
    assert len(content) >= 2
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["cost_nanos"] > 0
    # Every chunk carries our request id (the header's), never the vendor's.
    assert {c["id"] for c in chunks} == {response.headers["x-request-id"]}

    ingest_all()
    record = UsageRecord.objects.get(request_id=final["id"])
    assert record.stream and record.cost == final["usage"]["cost_nanos"]


def test_streams_and_answers_reuse_one_connection_to_the_vendor(gateway_server, upstream):
    # A vendor writes a stream's closing chunk after its last event ([DONE]): the gateway
    # waits for it and keeps the connection, instead of opening one (and, over HTTPS,
    # shaking hands) per streamed request.
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    upstream.reset()
    with gateway_server.client(customer.key) as client:
        for stream in (True, True, False, True, False):
            response = client.post(
                "/v1/chat/completions",
                json={**CHAT, "model": endpoint.full_slug, "stream": stream},
            )
            assert response.status_code == 200, response.text
            if stream:
                assert _sse_events(response.text)[-1] == "[DONE]"
    stats = upstream.stats()
    assert stats["by_path"]["/v1/chat/completions"] == 5
    assert stats["connections"] == 1


def test_it_hides_the_usage_chunk_when_the_client_did_not_ask(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions", json={**CHAT, "model": endpoint.full_slug, "stream": True}
        )
    events = _sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in orjson.loads(e) or orjson.loads(e)["choices"] for e in events[:-1])
    # ...but the request is metered all the same.
    assert ingest_all() == 1


def test_it_charges_a_request_once_even_if_its_event_is_ingested_twice(gateway_server, upstream):
    from billing.usage import record_events

    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        request_id = client.post(
            "/v1/chat/completions", json={**CHAT, "model": endpoint.full_slug}
        ).json()["id"]
    ingest_all()
    balance = organization_balance(customer.organization)
    record = UsageRecord.objects.get(request_id=request_id)
    replay = {
        "rid": request_id,
        "org": customer.organization.pk,
        "vendor": endpoint.vendor_id,
        "ep": endpoint.pk,
        "cost": record.cost,
        "pt": 1,
        "ct": 1,
        "at": 0,
    }

    assert record_events([replay, replay]) == (0, 2)
    assert organization_balance(customer.organization) == balance
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1


def test_the_answer_does_not_wait_for_redis_to_record_its_settlement(gateway_server, upstream):
    """The settlement is written to Redis, then the answer sent, then Redis's reply awaited:
    with Redis holding writes back, the client has its answer before the charge is applied,
    and the charge lands (once) when Redis resumes."""
    from billing.credit import credit_key
    from marketplace.redis_client import sync_client
    from tests.support.cluster import wait_until

    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer(credit_usd="10")
    organization_id = customer.organization.pk
    redis = sync_client()
    with gateway_server.client(customer.key) as client:
        body = {**CHAT, "model": endpoint.full_slug}
        first = client.post("/v1/chat/completions", json=body).json()  # loads scripts and credit
        settled = int(redis.get(credit_key(organization_id)))
        upstream.script(["delay:500"])
        answered = {}

        def slow_request() -> None:
            answered["response"] = client.post("/v1/chat/completions", json=body)

        thread = threading.Thread(target=slow_request)
        thread.start()
        try:
            assert wait_until(lambda: upstream.stats()["in_flight"] == 1)
            held = int(redis.get(credit_key(organization_id)))  # the hold is taken
            redis.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
            thread.join(timeout=30)
            # Answered while Redis holds the settlement back: only the hold is off the credit.
            assert answered["response"].status_code == 200, answered["response"].text
            assert int(redis.get(credit_key(organization_id))) == held < settled
        finally:
            redis.execute_command("CLIENT", "UNPAUSE")
            thread.join()
    cost = answered["response"].json()["usage"]["cost_nanos"]
    assert wait_until(lambda: int(redis.get(credit_key(organization_id))) == settled - cost)
    assert cost == first["usage"]["cost_nanos"] > 0
    assert ingest_all() == 2


def test_it_lists_models_the_key_may_use(gateway_server, upstream):
    public = factories.endpoint(base_url=upstream.base_url, tags=("chat", "legal"))
    other = factories.organization()
    private = factories.endpoint(base_url=upstream.base_url, private_to=other)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.get("/v1/models")
    ids = {m["id"] for m in response.json()["data"]}
    assert public.full_slug in ids and "tag:legal" in ids
    assert private.full_slug not in ids


def test_it_refuses_a_private_endpoint_of_another_organisation(gateway_server, upstream):
    owner = factories.organization()
    private = factories.endpoint(base_url=upstream.base_url, private_to=owner)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "model": private.full_slug})
    assert response.status_code == 404
    assert upstream.stats()["total"] == 0
