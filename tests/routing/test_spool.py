"""The settlement spool against real Redis: what the chaos run (bench/chaos_bench.py) found.

A replica spools a settlement when Redis fails under it and replays it when Redis is back.
The run lost settlements spooled while a replay was failing, and left customers with more
spendable credit than their ledger (holds given back twice).
"""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest
import redis.asyncio as aioredis
from django.conf import settings

from billing.credit import USAGE_STREAM, credit_key
from routing.live import LiveCache, LiveConfig, LiveState, Reservation, keyspend_key
from routing.spool import Spool, SpoolReplayer, settlement_record

pytestmark = pytest.mark.django_db(transaction=True)  # the replay looks up usage records

ORG, ENDPOINT, HOLD, COST = 41, 42, 10_000, 3_000
CREDIT = 1_000_000


def settlement(request_id: str, reservation: Reservation | None = None) -> dict[str, object]:
    """The line the gateway spools when Redis fails under a settle (of ``reservation``)."""
    reservation = reservation or Reservation(
        organization_id=ORG,
        endpoint_id=ENDPOINT,
        capacity=10,
        hold=HOLD,
        lease="lease-x",
        held="",
        keyspend="",
        half_open_trial=False,
        ratelimit_remaining=0,
    )
    return settlement_record(
        request_id, reservation, COST, {"rid": request_id, "org": ORG, "cost": COST}
    )


async def stream_request_ids(client: aioredis.Redis) -> list[str]:
    entries = await client.xrange(USAGE_STREAM)
    return [orjson.loads(fields[b"e"])["rid"] for _id, fields in entries]


async def test_it_keeps_a_settlement_spooled_while_a_replay_fails(tmp_path):
    spool = Spool(tmp_path)
    spool.append(settlement("gen-before"))
    # A Redis that takes connections and never answers, as one still loading its data.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    stalled = aioredis.Redis(port=silent.getsockname()[1], socket_timeout=1)
    replay = asyncio.create_task(SpoolReplayer(spool, stalled).replay_once())
    while not list(tmp_path.glob("*.replaying-*")):  # the replayer claimed the file
        await asyncio.sleep(0.01)

    spool.append(settlement("gen-meanwhile"))  # served while the replay waits
    with pytest.raises(aioredis.RedisError):
        await replay
    silent.close()
    await stalled.aclose()

    client = aioredis.Redis.from_url(settings.REDIS_URL)
    try:
        assert await SpoolReplayer(spool, client).replay_once() == 2
        assert sorted(await stream_request_ids(client)) == ["gen-before", "gen-meanwhile"]
        assert not list(tmp_path.iterdir())
    finally:
        await client.aclose()


async def reserve(live: LiveState, lease: str, key_limit: int | None = None) -> Reservation:
    await live.init_credit(ORG, CREDIT, None)  # once: later calls find it set
    before = int(await live.client.get(credit_key(ORG)))
    result = await live.reserve(
        organization_id=ORG,
        key_id=7,
        endpoint_id=ENDPOINT,
        capacity=10,
        hold=HOLD,
        lease=lease,
        rate_limit_rpm=None,
        key_credit_limit=key_limit,
        key_period="monthly",
        key_period_ttl=60,
    )
    assert result.reservation is not None
    assert int(await live.client.get(credit_key(ORG))) == before - HOLD
    return result.reservation


async def test_a_replayed_settlement_takes_its_hold_so_the_sweep_cannot_return_it_again(
    tmp_path,
):
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    live = LiveState(client, LiveConfig(lease_ttl=1))
    try:
        reservation = await reserve(live, "lease-1")
        spool = Spool(tmp_path)
        spool.append(settlement("gen-1", reservation))  # Redis failed under the settle
        assert await SpoolReplayer(spool, client).replay_once() == 1

        await asyncio.sleep(1.2)  # the lease expires; every replica sweeps expired holds
        await live.sweep_holds()

        assert int(await client.get(credit_key(ORG))) == CREDIT - COST
    finally:
        await client.aclose()


async def test_a_settlement_replayed_after_its_hold_was_swept_charges_the_cost(tmp_path):
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    live = LiveState(client, LiveConfig(lease_ttl=-1))  # a lease expired before Redis was back
    try:
        reservation = await reserve(live, "lease-2")
        await live.sweep_holds()
        assert int(await client.get(credit_key(ORG))) == CREDIT
        spool = Spool(tmp_path)
        spool.append(settlement("gen-2", reservation))

        assert await SpoolReplayer(spool, client).replay_once() == 1

        assert int(await client.get(credit_key(ORG))) == CREDIT - COST
    finally:
        await client.aclose()


async def test_a_settlement_that_reached_redis_before_the_error_is_not_refunded_again(tmp_path):
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    live = LiveState(client)
    try:
        reservation = await reserve(live, "lease-3")
        # The settle ran in Redis, but its reply was lost: the gateway spooled it as well.
        await live.settle(
            reservation,
            cost=COST,
            vendor_failed=False,
            latency_ms=5,
            event={"rid": "gen-3", "org": ORG, "cost": COST},
            request_id="gen-3",
            trace={"id": "gen-3"},
        )
        spool = Spool(tmp_path)
        spool.append(settlement("gen-3", reservation))

        assert await SpoolReplayer(spool, client).replay_once() == 1

        assert int(await client.get(credit_key(ORG))) == CREDIT - COST
    finally:
        await client.aclose()


async def test_a_replayed_settlement_frees_its_slot_where_the_routers_refresh_reads_it(tmp_path):
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    live = LiveState(client)
    cache = LiveCache(client, skew=0)
    try:
        reservation = await reserve(live, "lease-3")
        await cache.refresh()
        assert cache.numbers[ENDPOINT].inflight == 1
        spool = Spool(tmp_path)
        spool.append(settlement("gen-3", reservation))  # Redis failed under the settle

        assert await SpoolReplayer(spool, client).replay_once() == 1

        assert await cache.refresh() == {ENDPOINT}  # read without waiting for a full read
        assert cache.numbers[ENDPOINT].inflight == 0
    finally:
        await client.aclose()


async def test_a_replayed_settlement_returns_the_unused_hold_to_the_keys_spend_too(tmp_path):
    """As settle does: the key's spend counter (its credit limit) ends at the cost."""
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    live = LiveState(client)
    try:
        await live.init_keyspend(7, "monthly", 0, 60)
        reservation = await reserve(live, "lease-5", key_limit=10 * HOLD)
        assert int(await client.get(keyspend_key(7, "monthly"))) == HOLD
        spool = Spool(tmp_path)
        spool.append(settlement("gen-5", reservation))  # Redis failed under the settle

        assert await SpoolReplayer(spool, client).replay_once() == 1

        assert int(await client.get(credit_key(ORG))) == CREDIT - COST
        assert int(await client.get(keyspend_key(7, "monthly"))) == COST
    finally:
        await client.aclose()


async def test_a_line_spooled_by_an_older_gateway_still_takes_its_hold(tmp_path):
    """Before holds carried their amounts, a hold was its lease, its amounts in
    sy:holdinfo; a line spooled then (no ``held``) is replayed after an upgrade."""
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    live = LiveState(client, LiveConfig(lease_ttl=-1))
    try:
        await live.init_credit(ORG, CREDIT - HOLD, None)
        await client.zadd("sy:holds", {"lease-x": 0})  # expired: the sweep would return it
        await client.hset("sy:holdinfo", "lease-x", f"{credit_key(ORG)}|{HOLD}||")
        spool = Spool(tmp_path)
        spool.append(settlement("gen-6"))

        assert await SpoolReplayer(spool, client).replay_once() == 1
        await live.sweep_holds()

        assert int(await client.get(credit_key(ORG))) == CREDIT - COST
        assert await client.zcard("sy:holds") == 0
        assert await client.hlen("sy:holdinfo") == 0
    finally:
        await client.aclose()


async def test_a_replayed_settlement_stores_its_trace_as_settle_would_have(tmp_path):
    from routing.live import TRACE_STREAM, trace_key

    client = aioredis.Redis.from_url(settings.REDIS_URL)
    live = LiveState(client)
    try:
        spooled = await reserve(live, "lease-t1")
        reached = await reserve(live, "lease-t2")
        # The second settle ran in Redis, but its reply was lost: it was spooled as well.
        await live.settle(
            reached,
            cost=COST,
            vendor_failed=False,
            latency_ms=5,
            event={"rid": "gen-t2", "org": ORG, "cost": COST},
            request_id="gen-t2",
            trace={"id": "gen-t2", "organization_id": ORG, "served_by": "settle"},
        )
        spool = Spool(tmp_path)
        for request_id, reservation in (("gen-t1", spooled), ("gen-t2", reached)):
            record = settlement(request_id, reservation)
            record["trace"] = {"id": request_id, "organization_id": ORG, "served_by": "spool"}
            spool.append(record)

        assert await SpoolReplayer(spool, client).replay_once() == 2

        assert orjson.loads(await client.get(trace_key("gen-t1")))["served_by"] == "spool"
        assert await client.ttl(trace_key("gen-t1")) > 0
        # What settle stored stays, and is not queued for PostgreSQL a second time.
        assert orjson.loads(await client.get(trace_key("gen-t2")))["served_by"] == "settle"
        queued = [orjson.loads(f[b"t"])["id"] for _id, f in await client.xrange(TRACE_STREAM)]
        assert queued == ["gen-t2", "gen-t1"]
    finally:
        await client.aclose()


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def test_a_file_whose_replayer_died_mid_replay_is_replayed_by_another(tmp_path):
    # Found by the chaos run (seed 10): a replica killed while it replayed a spool file left
    # it as *.replaying-<pid>, which no replayer looked at again: 8 served requests unbilled.
    dead = _dead_pid()
    spool = Spool(tmp_path)
    spool.append(settlement("gen-r1"))
    spool.append(settlement("gen-r2"))
    spool.path.rename(tmp_path / f"gateway-{dead}.replaying-{dead}")

    client = aioredis.Redis.from_url(settings.REDIS_URL)
    try:
        assert spool.pending()
        assert await SpoolReplayer(spool, client).replay_once() == 2
        assert await stream_request_ids(client) == ["gen-r1", "gen-r2"]
        assert not list(tmp_path.iterdir())
    finally:
        await client.aclose()


async def test_a_torn_line_is_set_aside_and_the_lines_after_it_are_replayed(tmp_path):
    dead = _dead_pid()
    lines = [orjson.dumps(settlement("gen-s1")), b'{"request_id": "gen-to', b"42"]
    lines.append(orjson.dumps(settlement("gen-s2")))
    (tmp_path / f"gateway-{dead}.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    client = aioredis.Redis.from_url(settings.REDIS_URL)
    try:
        assert await SpoolReplayer(Spool(tmp_path), client).replay_once() == 2
        assert await stream_request_ids(client) == ["gen-s1", "gen-s2"]
        (kept,) = tmp_path.iterdir()
        assert kept.name.startswith("unreadable-")
        assert kept.read_bytes() == b'{"request_id": "gen-to\n42\n'
    finally:
        await client.aclose()


@pytest.fixture
def billable():  # type: ignore[no-untyped-def]
    """A real organisation and endpoint (built before the test's event loop runs)."""
    from tests import factories

    customer = factories.customer()
    return customer.organization.pk, factories.endpoint(base_url="http://127.0.0.1:9")


async def test_a_settlement_that_reached_redis_is_not_charged_again_after_its_trace_expired(
    tmp_path, billable
):
    # The replay tells a settlement that reached Redis by its trace; once the trace's TTL has
    # run out (a host down for longer with a spooled line), by its usage record.
    from routing.gateway.db import off_loop
    from routing.live import trace_key
    from tests.conftest import ingest_all

    org, endpoint = billable
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    live = LiveState(client)
    try:
        await client.set(credit_key(org), CREDIT)
        reserved = await live.reserve(
            organization_id=org,
            key_id=7,
            endpoint_id=endpoint.pk,
            capacity=10,
            hold=HOLD,
            lease="lease-e",
            rate_limit_rpm=None,
            key_credit_limit=None,
            key_period="monthly",
            key_period_ttl=60,
        )
        assert reserved.reservation is not None
        event = {"rid": "gen-e", "org": org, "cost": COST, "vendor": endpoint.vendor_id}
        await live.settle(
            reserved.reservation,
            cost=COST,
            vendor_failed=False,
            latency_ms=5,
            event=event,
            request_id="gen-e",
            trace={"id": "gen-e", "organization_id": org},
        )
        assert await off_loop(ingest_all)() == 1  # off_loop: hands its connection back
        await client.delete(trace_key("gen-e"))  # its TTL ran out
        spool = Spool(tmp_path)  # ...and its reply had been lost: it was spooled too
        spool.append(settlement_record("gen-e", reserved.reservation, COST, event))

        assert await SpoolReplayer(spool, client).replay_once() == 1

        assert int(await client.get(credit_key(org))) == CREDIT - COST
    finally:
        await client.aclose()
