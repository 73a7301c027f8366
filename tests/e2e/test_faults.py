"""Faults with real processes: Redis stopped and restarted under a running gateway."""

from __future__ import annotations

import subprocess
import threading

import pytest

from billing.ledger import organization_balance
from billing.models import UsageRecord
from marketplace.devenv import EmbeddedRedis
from tests import factories
from tests.support.cluster import start_gateway, start_ingest_consumer, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "survive this"}]


def test_redis_down_fails_closed_and_loses_no_answered_usage(tmp_path, upstream):
    redis = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
    spool_dir = tmp_path / "spool"
    gateway = start_gateway(REDIS_URL=redis.url, SWITCHYARD_SPOOL_DIR=str(spool_dir))
    try:
        endpoint = factories.endpoint(base_url=upstream.base_url)
        customer = factories.customer(credit_usd="5")
        before = organization_balance(customer.organization)
        body = {"model": endpoint.full_slug, "messages": MESSAGES}
        with gateway.client(customer.key) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200

        upstream.script(["delay:1500"])
        answered = {}

        def slow_request() -> None:
            with gateway.client(customer.key) as client:
                answered["response"] = client.post("/v1/chat/completions", json=body)

        thread = threading.Thread(target=slow_request)
        thread.start()
        assert wait_until(lambda: upstream.stats()["in_flight"] == 1)
        redis.stop()  # Redis goes away while the vendor is answering

        with gateway.client(customer.key) as client:
            refused = client.post("/v1/chat/completions", json=body)
            refused_idempotent = client.post(
                "/v1/chat/completions", json=body, headers={"Idempotency-Key": "while-down"}
            )
        thread.join()

        # New requests fail closed: never unmetered, never over budget. The same clear 503
        # whichever Redis call of the request failed first (here the Idempotency-Key's).
        for response in (refused, refused_idempotent):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "state_unavailable"
        # The request the vendor answered reaches the client, its usage waits on disk.
        served = answered["response"]
        assert served.status_code == 200
        assert list(spool_dir.glob("gateway-*.jsonl"))

        redis.start()  # same port, same append-only file
        assert wait_until(lambda: not list(spool_dir.glob("gateway-*")), timeout=30), (
            gateway.output()
        )
        consumer = start_ingest_consumer("after-outage", REDIS_URL=redis.url)
        try:
            assert wait_until(
                lambda: UsageRecord.objects.filter(organization=customer.organization).count() == 2,
                timeout=60,
            ), consumer.output()
        finally:
            consumer.stop()

        records = UsageRecord.objects.filter(organization=customer.organization)
        assert records.filter(request_id=served.json()["id"]).count() == 1
        assert organization_balance(customer.organization) == before - sum(r.cost for r in records)

        # Service comes back by itself.
        with gateway.client(customer.key) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            # The spooled request's trace came back with its settlement.
            trace = client.get("/v1/generation", params={"id": served.json()["id"]})
        assert trace.status_code == 200, trace.text
        assert trace.json()["data"]["served_by"] == endpoint.full_slug
    finally:
        gateway.stop()
        redis.stop()


def test_sigterm_lets_streams_in_flight_finish_and_refuses_new_work(upstream):
    import signal
    import socket

    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    gateway = start_gateway()
    upstream.script(["trickle:150"])  # an 8-chunk stream that takes over a second
    body = {
        "model": endpoint.full_slug,
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "one two three four five six seven eight"}],
    }
    received = {}

    def stream() -> None:
        with gateway.client(customer.key) as client:
            received["text"] = client.post("/v1/chat/completions", json=body).text

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert wait_until(lambda: upstream.stats()["in_flight"] == 1)
        gateway.process.send_signal(signal.SIGTERM)
        # New connections are refused while the stream drains.
        assert wait_until(lambda: _refused(gateway.port, socket), timeout=10)
        thread.join(30)
        assert received["text"].endswith("data: [DONE]\n\n")
        # uvicorn exits after draining, re-raising the signal it caught (status -SIGTERM).
        try:
            status = gateway.process.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the replica did not exit after draining:\n{gateway.output()[-4000:]}")
        assert status in (0, -signal.SIGTERM)
    finally:
        gateway.stop()


def _refused(port: int, socket) -> bool:  # type: ignore[no-untyped-def]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return False
    except OSError:
        return True


def test_a_replica_killed_mid_stream_charges_nothing_and_its_slot_and_hold_come_back(upstream):
    from billing.credit import credit_key
    from marketplace.redis_client import sync_client
    from tests.conftest import ingest_all

    short = {
        "GATEWAY_LEASE_SECONDS": "3",
        "GATEWAY_TOTAL_TIMEOUT": "2.5",
        "GATEWAY_HOLD_SWEEP_SECONDS": "0.5",
        "GATEWAY_ALLOW_SHORT_LEASES": "1",
    }
    doomed, survivor = start_gateway(**short), start_gateway(**short)
    try:
        endpoint = factories.endpoint(base_url=upstream.base_url, capacity=1)
        customer = factories.customer(credit_usd="1")
        before = organization_balance(customer.organization)
        body = {
            "model": endpoint.full_slug,
            "stream": True,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "one two three four five six seven eight"}],
        }
        with survivor.client(customer.key) as client:  # loads the spendable credit into Redis
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        ingest_all()
        spendable = int(sync_client().get(credit_key(customer.organization.pk)))

        upstream.script(["trickle:300"])
        outcome = {}

        def stream() -> None:
            try:
                with doomed.client(customer.key) as client:
                    outcome["text"] = client.post("/v1/chat/completions", json=body).text
            except Exception as exc:  # the connection dies with the replica
                outcome["error"] = exc

        thread = threading.Thread(target=stream)
        thread.start()
        assert wait_until(lambda: upstream.stats()["in_flight"] == 1)
        assert int(sync_client().get(credit_key(customer.organization.pk))) < spendable  # held
        doomed.kill()  # kill -9 mid-stream
        thread.join(10)
        assert "error" in outcome or "[DONE]" not in outcome.get("text", "")

        # The survivor's sweep returns the hold once the lease expires, and the slot frees:
        assert wait_until(
            lambda: int(sync_client().get(credit_key(customer.organization.pk))) == spendable,
            timeout=20,
        )
        upstream.script([])
        with survivor.client(customer.key) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        ingest_all()
        # Only the two requests the client saw succeed were charged.
        records = UsageRecord.objects.filter(organization=customer.organization)
        assert records.count() == 2
        assert organization_balance(customer.organization) == before - sum(r.cost for r in records)
    finally:
        doomed.stop()
        survivor.stop()


def test_a_cascade_whose_state_store_goes_away_serves_the_answer_already_paid_for(
    tmp_path, upstream
):
    # The cheap tier answers unsure while Redis goes away: its settlement waits on disk (it
    # is billed), and the dearer tier cannot be reserved. The client gets the paid-for
    # answer, not a 503 saying that nothing was charged.
    from tests.support.upstream import FaultUpstream

    redis = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
    spool_dir = tmp_path / "spool"
    gateway = start_gateway(REDIS_URL=redis.url, SWITCHYARD_SPOOL_DIR=str(spool_dir))
    try:
        with FaultUpstream() as strong:
            weak = factories.endpoint(
                base_url=upstream.base_url,
                tags=("qa",),
                price_input_usd="0.1",
                price_output_usd="0.1",
            )
            factories.endpoint(
                base_url=strong.base_url, tags=("qa",), price_input_usd="2", price_output_usd="2"
            )
            upstream.configure(logprob_mean=-2.0)  # exp(-2) = 0.14: the cheap answer escalates
            customer = factories.customer(credit_usd="5")
            body = {
                "model": "tag:qa",
                "messages": [{"role": "user", "content": "what is the capital of france"}],
                "cascade": {"threshold": 0.6},
            }
            upstream.script(["delay:1500"])
            answered = {}

            def cascade_request() -> None:
                with gateway.client(customer.key) as client:
                    answered["response"] = client.post("/v1/chat/completions", json=body)

            thread = threading.Thread(target=cascade_request)
            thread.start()
            assert wait_until(lambda: upstream.stats()["in_flight"] == 1)
            redis.stop()  # while the cheap tier's vendor is answering
            thread.join()

            response = answered["response"]
            assert response.status_code == 200, response.text
            assert response.headers["x-switchyard-endpoint"] == weak.full_slug
            cascade = response.json()["switchyard"]["cascade"]
            assert cascade["kept_because"] == "state_unavailable"
            assert [t["decision"] for t in cascade["tiers"]] == ["kept", "failed"]
            assert strong.stats()["total"] == 0
            assert list(spool_dir.glob("gateway-*.jsonl"))  # the cheap leg's settlement
    finally:
        gateway.stop()
        redis.stop()
