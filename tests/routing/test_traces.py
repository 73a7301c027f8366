"""Route traces outlive Redis's copy: the sy:traces stream into PostgreSQL, read back by
GET /v1/generation and POST /v1/feedback, replaced only by a later entry, pruned by age."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import orjson
import pytest
import redis.asyncio as aioredis
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from marketplace.redis_client import sync_client
from routing.live import TRACE_STREAM, LiveConfig, LiveState, trace_key
from routing.models import RouteTrace
from routing.traces import TRACE_GROUP, prune_traces, stored_trace, trace_ingest_batch
from tests import factories
from tests.conftest import ingest_traces

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "explain this route"}]


def _trace(request_id: str, organization_id: int = 7, **extra: object) -> bytes:
    return orjson.dumps({"id": request_id, "organization_id": organization_id, **extra})


def test_a_trace_is_served_from_postgresql_once_redis_has_let_it_go(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    owner, stranger = factories.customer(), factories.customer()
    with gateway_server.client(owner.key) as client:
        request_id = client.post(
            "/v1/chat/completions", json={"model": "tag:sql", "messages": MESSAGES}
        ).json()["id"]
        fresh = client.get("/v1/generation", params={"id": request_id}).json()["data"]

    assert ingest_traces() == 1
    sync_client().delete(trace_key(request_id))  # Redis's copy expired
    with gateway_server.client(owner.key) as client:
        kept = client.get("/v1/generation", params={"id": request_id})
        rated = client.post("/v1/feedback", json={"id": request_id, "score": 0.9})
    with gateway_server.client(stranger.key) as client:
        hidden = client.get("/v1/generation", params={"id": request_id})
        not_rated = client.post("/v1/feedback", json={"id": request_id, "score": 0.1})

    assert kept.status_code == 200, kept.text
    assert kept.json()["data"] == fresh
    assert fresh["served_by"] == endpoint.full_slug
    assert rated.status_code == 200, rated.text
    assert hidden.status_code == 404 and not_rated.status_code == 404
    assert sync_client().xlen(TRACE_STREAM) == 0  # ingested entries leave the stream


def test_a_later_entry_replaces_an_earlier_one_and_a_redelivered_earlier_one_does_not():
    client = sync_client()
    client.xgroup_create(TRACE_STREAM, TRACE_GROUP, id="0", mkstream=True)
    client.xadd(TRACE_STREAM, {"t": _trace("gen-1", version="settled")})
    client.xadd(TRACE_STREAM, {"t": _trace("gen-1", version="rewritten")})
    # A consumer reads the first entry and dies before acknowledging it.
    client.xreadgroup(TRACE_GROUP, "dead", {TRACE_STREAM: ">"}, count=1)
    trace_ingest_batch(consumer="alive")
    assert stored_trace("gen-1")["version"] == "rewritten"

    with override_settings(USAGE_CLAIM_IDLE_MS=0):
        result = trace_ingest_batch(consumer="alive")  # claims the dead consumer's entry
    assert result.read == 1
    assert stored_trace("gen-1")["version"] == "rewritten"
    assert client.xpending(TRACE_STREAM, TRACE_GROUP)["pending"] == 0


def test_a_batch_holding_two_entries_of_one_request_keeps_the_later():
    client = sync_client()
    client.xadd(TRACE_STREAM, {"t": _trace("gen-2", version="settled")})
    client.xadd(TRACE_STREAM, {"t": _trace("gen-2", version="rewritten")})
    assert ingest_traces() == 1
    assert stored_trace("gen-2")["version"] == "rewritten"


def test_malformed_entries_are_dropped_without_blocking_the_good_ones():
    client = sync_client()
    for fields in (
        {"t": b"not json"},
        {"x": b"{}"},
        {"t": orjson.dumps({"id": "gen-3"})},  # no organisation
        {"t": orjson.dumps({"id": "x" * 65, "organization_id": 7})},
        {"t": orjson.dumps({"id": "gen-4", "organization_id": "7"})},
    ):
        client.xadd(TRACE_STREAM, fields)
    client.xadd(TRACE_STREAM, {"t": orjson.dumps({"id": "gen\u00006", "organization_id": 7})})
    # JSON allows the NUL character, PostgreSQL's jsonb refuses it: the trace keeps it.
    client.xadd(TRACE_STREAM, {"t": _trace("gen-5", model="bad\u0000model")})

    result = trace_ingest_batch()
    assert (result.read, result.stored, result.invalid) == (7, 1, 6)
    assert list(RouteTrace.objects.values_list("request_id", flat=True)) == ["gen-5"]
    assert stored_trace("gen-5")["model"] == "bad\u0000model"
    assert client.xlen(TRACE_STREAM) == 0


def test_the_trace_stream_is_capped_so_a_stalled_ingest_cannot_fill_redis():
    async def scenario() -> None:
        client = aioredis.Redis.from_url(settings.REDIS_URL)
        state = LiveState(client, LiveConfig(trace_ttl=60, trace_stream_maxlen=1000))
        try:
            for n in range(1500):
                await state.store_trace(f"gen-{n}", {"id": f"gen-{n}", "organization_id": 1})
        finally:
            await client.aclose()

    asyncio.run(scenario())
    length = sync_client().xlen(TRACE_STREAM)
    # Trimmed approximately (whole macro nodes of 100 entries), never below the cap.
    assert 1000 <= length < 1200
    newest = sync_client().xrevrange(TRACE_STREAM, count=1)[0][1][b"t"]
    assert orjson.loads(newest)["id"] == "gen-1499"


def test_pruning_deletes_the_traces_older_than_the_retention_only():
    now = timezone.now()
    for n, age in enumerate((0, 29, 31, 400)):
        RouteTrace.objects.create(
            request_id=f"gen-{n}",
            organization_id=1,
            created_at=now - timedelta(days=age),
            stream_ms=n,
            stream_seq=0,
            trace=orjson.dumps({"id": f"gen-{n}"}).decode(),
        )
    with override_settings(TRACE_RETENTION_DAYS=30):
        assert prune_traces(batch=1) == 2
    assert sorted(RouteTrace.objects.values_list("request_id", flat=True)) == ["gen-0", "gen-1"]


def test_the_beat_tasks_ingest_the_stream_and_prune():
    from routing import tasks

    sync_client().xadd(TRACE_STREAM, {"t": _trace("gen-6")})
    RouteTrace.objects.create(
        request_id="gen-old",
        organization_id=7,
        created_at=timezone.now() - timedelta(days=365),
        stream_ms=1,
        stream_seq=0,
        trace='{"id": "gen-old"}',
    )
    assert tasks.trace_ingest() == 1
    assert tasks.trace_prune() == 1
    assert list(RouteTrace.objects.values_list("request_id", flat=True)) == ["gen-6"]
