"""Idempotency-Key: a replay returns the stored answer and is charged once."""

from __future__ import annotations

import threading

import pytest

from billing.models import UsageRecord
from tests import factories
from tests.conftest import ingest_all

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ready(gateway_server, upstream):  # type: ignore[no-untyped-def]
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    body = {"model": endpoint.full_slug, "messages": [{"role": "user", "content": "once only"}]}
    return gateway_server, upstream, customer, body


def test_a_replay_returns_the_stored_answer_without_a_second_charge(ready):
    server, upstream, customer, body = ready
    with server.client(customer.key) as client:
        first = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "k-1"})
        second = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert upstream.stats()["total"] == 1
    assert ingest_all() == 1


def test_the_same_key_with_another_body_is_refused(ready):
    server, _upstream, customer, body = ready
    with server.client(customer.key) as client:
        client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "k-2"})
        other = client.post(
            "/v1/chat/completions",
            json={**body, "max_tokens": 3},
            headers={"Idempotency-Key": "k-2"},
        )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_a_replay_while_the_first_runs_gets_409_and_only_one_is_charged(ready):
    server, upstream, customer, body = ready
    upstream.set_delay(600)
    results = {}

    def first() -> None:
        with server.client(customer.key) as client:
            results["first"] = client.post(
                "/v1/chat/completions", json=body, headers={"Idempotency-Key": "k-3"}
            )

    thread = threading.Thread(target=first)
    thread.start()
    for _ in range(300):
        if upstream.stats()["in_flight"]:
            break
        threading.Event().wait(0.01)
    with server.client(customer.key) as client:
        concurrent = client.post(
            "/v1/chat/completions", json=body, headers={"Idempotency-Key": "k-3"}
        )
    thread.join()
    assert results["first"].status_code == 200
    assert concurrent.status_code == 409 and concurrent.headers["retry-after"] == "1"
    assert ingest_all() == 1


def test_keys_belong_to_one_organisation(ready, upstream):
    server, _, customer, body = ready
    other = factories.customer()
    with server.client(customer.key) as client:
        client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "shared"})
    with server.client(other.key) as client:
        theirs = client.post(
            "/v1/chat/completions", json=body, headers={"Idempotency-Key": "shared"}
        )
    assert theirs.status_code == 200 and "idempotent-replayed" not in theirs.headers
    assert upstream.stats()["total"] == 2


def test_a_failed_attempt_can_be_retried_with_the_same_key(ready):
    server, upstream, customer, body = ready
    upstream.script(["status:500"])
    with server.client(customer.key) as client:
        failed = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "k-4"})
        retried = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "k-4"})
    assert failed.status_code == 502 and retried.status_code == 200
    ingest_all()
    assert UsageRecord.objects.filter(organization=customer.organization, cost__gt=0).count() == 1


def test_streams_are_replayed_too(ready):
    server, upstream, customer, body = ready
    stream_body = {**body, "stream": True}
    with server.client(customer.key) as client:
        first = client.post(
            "/v1/chat/completions", json=stream_body, headers={"Idempotency-Key": "s"}
        )
        again = client.post(
            "/v1/chat/completions", json=stream_body, headers={"Idempotency-Key": "s"}
        )
    assert again.text == first.text and first.text.endswith("data: [DONE]\n\n")
    assert upstream.stats()["total"] == 1


@pytest.mark.parametrize("bad", [b"", b"\xc3\xa9t\xc3\xa9", b"x" * 300])
def test_it_refuses_malformed_keys(ready, bad):
    server, upstream, customer, body = ready
    with server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json=body,
            headers=[(b"Idempotency-Key", bad)],
        )
    assert response.status_code == 400
    assert upstream.stats()["total"] == 0


def test_a_key_whose_request_died_running_is_free_again_after_the_running_ttl():
    import asyncio

    import redis.asyncio as aioredis
    from django.conf import settings

    from routing.gateway.idempotency import Idempotency
    from tests.support.cluster import wait_until

    async def begin(running_ttl: int) -> bytes | None:
        client = aioredis.Redis.from_url(settings.REDIS_URL)
        try:
            return await Idempotency(client, running_ttl=running_ttl).begin(1, "crash", b"{}")
        finally:
            await client.aclose()

    # The first request begins and its replica dies: nothing ever finishes the key.
    assert asyncio.run(begin(1)) is None

    def runs_again() -> bool:
        try:
            return asyncio.run(begin(1)) is None
        except Exception:  # still "running": 409
            return False

    assert wait_until(runs_again, timeout=10, interval=0.2)
