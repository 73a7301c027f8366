"""Usage metering benchmark: ingest throughput, hot-path emit cost, time to billable.

Run (embedded PostgreSQL and Redis under var/bench-ingest):

    .venv/bin/python -m marketplace.devenv --data-dir var/bench-ingest exec -- \
        .venv/bin/python -m bench.ingest_bench [--events 60000] [--batch 1000]

It prints three figures, each with a baseline measured in the same process:

1. Emit cost: one ``settle`` Lua round trip as the gateway does it, through the gateway's
   own pipelined client (``routing.resp``): return the hold, free the slot, update live
   counters, XADD the event, store the trace; in µs per request, next to a bare ``PING``
   round trip on the same connection (the floor of any Redis call). Target: the event
   itself costs < 50 µs (a settle with the event minus a settle without it). The trace is
   not the event, so it is measured on its own line (with event and trace).
2. Ingest throughput: events per second from the Redis stream into ``UsageRecord`` plus
   the batch's ledger posting (one leg per organisation and vendor in the batch, one fee
   leg), one database transaction per batch, sustained over ``--events`` events spread at
   random over ``--tenants`` organisations and ``--vendors`` vendors (default 100 and 20);
   baseline: a bare ``COPY``-free ``bulk_create`` of the same number of unrelated rows.
   Target ≥ 15,000 events/s.
3. Trace ingest: route traces per second from the ``sy:traces`` stream into
   ``RouteTrace`` (one consumer), with a trace shaped like a one-attempt gateway trace, and
   PostgreSQL's bytes per stored trace (table, TOAST and indexes). No target: it must keep
   up with the gateway, and it runs on the ingest queue beside the usage.
4. Time to billable: with a consumer running (``manage.py ingest_usage``-style loop),
   the delay from XADD to the committed ledger transaction, p50/p99. Target p99 < 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import threading
import time
import uuid

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")
django.setup()

import orjson  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from billing.credit import USAGE_STREAM, credit_key  # noqa: E402
from billing.models import UsageRecord  # noqa: E402
from billing.money import usd_to_nanos  # noqa: E402
from billing.services import credit_grant  # noqa: E402
from billing.usage import ensure_group, usage_ingest_batch  # noqa: E402
from marketplace.redis_client import sync_client  # noqa: E402
from marketplace.services import organization_create  # noqa: E402
from routing.live import LiveState  # noqa: E402
from routing.resp import RespClient  # noqa: E402
from vendors.services import endpoint_approve, endpoint_create, vendor_approve, vendor_create  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def setup(tenants: int = 1, vendors: int = 1) -> tuple[list[int], list[tuple[int, int]]]:
    """``tenants`` organisations with credit and ``vendors`` vendors with one endpoint each."""
    call_command("migrate", verbosity=0)
    tag = uuid.uuid4().hex[:8]
    settings.OUTBOUND_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    orgs = []
    for i in range(tenants):
        org = organization_create(name=f"Bench {tag} {i}", slug=f"bench-{tag}-{i}")
        credit_grant(organization=org, amount=usd_to_nanos("1000000"), reason="bench")
        orgs.append(org.pk)
    served = []
    for i in range(vendors):
        vendor = vendor_approve(
            vendor=vendor_create(name=f"Bench vendor {tag} {i}", slug=f"bv-{tag}-{i}")
        )
        endpoint = endpoint_approve(
            endpoint=endpoint_create(
                vendor=vendor,
                slug="m",
                base_url="http://127.0.0.1:9/v1",
                upstream_model="m",
                price_input=usd_to_nanos("1"),
                price_output=usd_to_nanos("2"),
            )
        )
        served.append((vendor.pk, endpoint.pk))
    return orgs, served


def event(org: int, vendor: int, endpoint: int, rid: str) -> dict:
    return {
        "rid": rid,
        "org": org,
        "key": None,
        "ep": endpoint,
        "vendor": vendor,
        "model": "bench/m",
        "kind": "chat",
        "pt": 120,
        "ct": 40,
        "pin": 1_000_000_000,
        "pout": 2_000_000_000,
        "cost": 200_000,
        "ms": 42,
        "att": 1,
        "out": "success",
        "stream": False,
        "tag": None,
        "fail_eps": [],
        "at": time.time_ns() // 1_000_000,
    }


async def emit_cost(org: int, vendor: int, endpoint: int, n: int) -> dict[str, float]:
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    fast = RespClient(settings.REDIS_URL)
    live = LiveState(client, fast=fast)
    await client.set(credit_key(org), 10**15)
    trace = {"id": "x", "attempts": [{"endpoint": "bench/m", "outcome": "success"}]}

    async def timed(fn) -> list[float]:  # type: ignore[no-untyped-def]
        out = []
        for i in range(n):
            t0 = time.perf_counter_ns()
            await fn(i)
            out.append((time.perf_counter_ns() - t0) / 1000)
        return out

    async def ping(_: int) -> None:
        await fast.execute("PING")

    async def settle(i: int, with_event: bool = True, with_trace: bool = True) -> None:
        reserved = await live.reserve(
            organization_id=org,
            key_id=1,
            endpoint_id=endpoint,
            capacity=10**6,
            hold=1000,
            lease=f"l{i}",
            rate_limit_rpm=None,
            key_credit_limit=None,
            key_period="all",
            key_period_ttl=60,
        )
        assert reserved.reservation is not None
        t0 = time.perf_counter_ns()
        await live.settle(
            reserved.reservation,
            cost=500,
            vendor_failed=False,
            latency_ms=40,
            event=event(org, vendor, endpoint, f"gen-emit-{uuid.uuid4().hex}")
            if with_event
            else None,
            request_id=f"gen-{i}",
            trace=trace if with_trace else None,
        )
        settle_times.append((time.perf_counter_ns() - t0) / 1000)

    settle_times: list[float] = []
    await timed(ping)  # warm-up
    pings = await timed(ping)
    # Interleaved rounds, so drift on the machine hits the three alike.
    bare: list[float] = []
    event_only: list[float] = []
    full: list[float] = []
    for _round in range(4):
        for kind, into in ((0, bare), (1, event_only), (2, full)):
            settle_times.clear()
            await timed(lambda i, k=kind: settle(i, k >= 1, k == 2))
            into.extend(settle_times)
    await fast.aclose()
    await client.aclose()
    # The emitted events are ingested below with the rest; trim them from the stream first.
    return {
        "ping_p50_us": statistics.median(pings),
        "settle_without_event_p50_us": statistics.median(bare),
        "settle_with_event_p50_us": statistics.median(event_only),
        "settle_with_event_and_trace_p50_us": statistics.median(full),
        "event_cost_p50_us": statistics.median(event_only) - statistics.median(bare),
        "trace_cost_p50_us": statistics.median(full) - statistics.median(event_only),
    }


def fill(orgs: list[int], served: list[tuple[int, int]], count: int) -> None:
    """``count`` events spread over the organisations and vendors (seeded, reproducible)."""
    client = sync_client()
    pick = random.Random(7)
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        vendor, endpoint = pick.choice(served)
        pipe.xadd(
            USAGE_STREAM,
            {
                "e": orjson.dumps(
                    event(pick.choice(orgs), vendor, endpoint, f"gen-b-{uuid.uuid4().hex}")
                )
            },
        )
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def ingest_throughput(
    orgs: list[int], served: list[tuple[int, int]], count: int, batch: int, consumers: int = 1
) -> dict[str, float]:
    client = sync_client()
    client.delete(USAGE_STREAM)
    ensure_group(client)
    fill(orgs, served, count)
    before = UsageRecord.objects.count()

    def drain(name: str) -> None:
        try:
            while usage_ingest_batch(count=batch, consumer=name).read:
                pass
        finally:
            django.db.connections.close_all()

    threads = [threading.Thread(target=drain, args=(f"bench-{i}",)) for i in range(consumers)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    recorded = UsageRecord.objects.count() - before
    # Baseline: inserting the same number of plain rows (no ledger, no idempotency check).
    from billing.models import LedgerTransaction

    t1 = time.perf_counter()
    for start in range(0, count, batch):
        LedgerTransaction.objects.bulk_create(
            LedgerTransaction(kind="usage", idempotency_key=f"baseline:{uuid.uuid4().hex}")
            for _ in range(min(batch, count - start))
        )
    baseline = time.perf_counter() - t1
    return {
        "events": recorded,
        "seconds": elapsed,
        "events_per_second": recorded / elapsed,
        "baseline_plain_rows_per_second": count / baseline,
        "ratio_to_plain_inserts": (recorded / elapsed) / (count / baseline),
    }


def bench_trace(n: int) -> dict[str, object]:
    """A route trace of the size the gateway writes for a one-attempt request (~1.8 KB)."""
    quote = {"input": 10**9, "output": 2 * 10**9, "multiplier": 1.0, "unit": "nano-usd-per-1m"}
    components = {"quality": 0.5, "price": 1.0, "latency": 1.0}
    policy = {"models": ["tag:sql"], "sort": "balanced", "variant": None, "order": [],
              "only": None, "ignore": [], "allow_fallbacks": True,
              "max_price": {"prompt": None, "completion": None}, "zero_retention": False,
              "regions": None, "require_parameters": False, "min_quality": None,
              "trusted_only": False}  # fmt: skip
    return {
        "id": f"gen-t-{n:032x}",
        "organization_id": 1 + n % 100,
        "key_prefix": "0f4fe0a7",
        "kind": "chat",
        "model": "tag:sql",
        "tags": ["sql"],
        "stream": False,
        "created": "2026-11-28T10:58:58.135669+00:00",
        "routing": {
            "strategy": "balanced",
            "policy": policy,
            "explored": None,
            "considered": 1,
            "eligible": 1,
            "filtered": {},
            "candidates": [
                {
                    "rank": 0,
                    "endpoint": "vendor-2/model-1",
                    "endpoint_id": 1,
                    "vendor": "vendor-2",
                    "score": 0.75,
                    "components": components,
                    "latency_ms": None,
                    "quote": quote,
                    "explored": False,
                }
            ],
            "endpoints": [
                {
                    "endpoint": "vendor-2/model-1",
                    "endpoint_id": 1,
                    "vendor": "vendor-2",
                    "status": "candidate",
                    "rank": 0,
                    "score": 0.75,
                    "components": components,
                    "latency_ms": None,
                    "requests": 0,
                    "quote": quote,
                }
            ],
        },
        "attempts": [
            {
                "endpoint": "vendor-2/model-1",
                "outcome": "success",
                "status": 200,
                "latency_ms": 3,
                "detail": "",
                "quote": {"input": 10**9, "output": 2 * 10**9},
            }
        ],
        "outcome": "success",
        "served_by": "vendor-2/model-1",
        "tokens": {"prompt": 12, "completion": 40},
        "cost_nanos": 3000 + n,
        "latency_ms": 41,
        "privacy": None,
    }


def trace_ingest_throughput(count: int) -> dict[str, float]:
    from django.db import connection

    from routing.live import TRACE_STREAM
    from routing.models import RouteTrace
    from routing.traces import trace_ingest_batch

    client = sync_client()
    client.delete(TRACE_STREAM)
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE routing_routetrace")  # no dead rows left to count below
    pipe = client.pipeline(transaction=False)
    size = 0
    for i in range(count):
        text = orjson.dumps(bench_trace(i))
        size += len(text)
        pipe.xadd(TRACE_STREAM, {"t": text})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    while trace_ingest_batch(count=1000, consumer="bench-traces").read:
        pass
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stored = RouteTrace.objects.count()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE routing_routetrace")
        cursor.execute("SELECT pg_total_relation_size('routing_routetrace')")
        on_disk = int(cursor.fetchone()[0])
    return {
        "traces": stored,
        "seconds": elapsed,
        "traces_per_second": stored / elapsed,
        "consumer_cpu_us_per_trace": cpu / stored * 1e6,
        "json_bytes_per_trace": size / count,
        "postgres_bytes_per_trace": on_disk / stored,
    }


def time_to_billable(org: int, vendor: int, endpoint: int, n: int) -> dict[str, float]:
    client = sync_client()
    stop = threading.Event()

    def consumer() -> None:
        django.db.connections.close_all()
        while not stop.is_set():
            usage_ingest_batch(count=1000, block_ms=100, consumer="bench-live")

    thread = threading.Thread(target=consumer, daemon=True)
    thread.start()
    delays = []
    for _ in range(n):
        rid = f"gen-live-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        client.xadd(USAGE_STREAM, {"e": orjson.dumps(event(org, vendor, endpoint, rid))})
        while not UsageRecord.objects.filter(request_id=rid).exists():
            time.sleep(0.002)
        delays.append(time.perf_counter() - t0)
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    return {"p50_ms": percentile(delays, 0.5) * 1000, "p99_ms": percentile(delays, 0.99) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--consumers", type=int, default=2, help="parallel ingest consumers")
    parser.add_argument("--emit", type=int, default=2000)
    parser.add_argument("--billable", type=int, default=200)
    parser.add_argument("--traces", type=int, default=20_000, help="route traces to ingest")
    parser.add_argument(
        "--tenants", type=int, default=100, help="customer organisations the events spread over"
    )
    parser.add_argument("--vendors", type=int, default=20, help="vendors (one endpoint each)")
    args = parser.parse_args(argv)
    orgs, served = setup(args.tenants, args.vendors)
    org, (vendor, endpoint) = orgs[0], served[0]

    emit = asyncio.run(emit_cost(org, vendor, endpoint, args.emit))
    ingest = ingest_throughput(orgs, served, args.events, args.batch, args.consumers)
    traces = trace_ingest_throughput(args.traces)
    billable = time_to_billable(org, vendor, endpoint, args.billable)

    print("== emit cost on the hot path (one settle round trip) ==")
    print(f"  PING round trip (baseline)      p50 {emit['ping_p50_us']:8.1f} µs")
    print(f"  settle without event            p50 {emit['settle_without_event_p50_us']:8.1f} µs")
    print(f"  settle with event               p50 {emit['settle_with_event_p50_us']:8.1f} µs")
    full = emit["settle_with_event_and_trace_p50_us"]
    print(f"  settle with event + trace       p50 {full:8.1f} µs")
    verdict = "PASS" if emit["event_cost_p50_us"] < 50 else "MISS"
    print(
        f"  => the event adds               p50 {emit['event_cost_p50_us']:8.1f} µs"
        f"  [{verdict} < 50 µs]"
    )
    print(f"  (the trace adds                 p50 {emit['trace_cost_p50_us']:8.1f} µs)")
    print(
        f"== ingest into PostgreSQL (records + one ledger posting per batch),"
        f" {args.consumers} consumer(s), {args.tenants} organisations, {args.vendors} vendors =="
    )
    print(
        f"  {ingest['events']} events in {ingest['seconds']:.2f} s"
        f" = {ingest['events_per_second']:,.0f} events/s"
    )
    print(
        f"  baseline plain inserts: {ingest['baseline_plain_rows_per_second']:,.0f} rows/s "
        f"(ratio {ingest['ratio_to_plain_inserts']:.2f})"
    )
    verdict = "PASS" if ingest["events_per_second"] >= 15_000 else "MISS"
    print(f"  => [{verdict} >= 15,000 events/s]")
    print("== route traces into PostgreSQL (one consumer) ==")
    print(
        f"  {traces['traces']} traces of {traces['json_bytes_per_trace']:,.0f} bytes in"
        f" {traces['seconds']:.2f} s = {traces['traces_per_second']:,.0f} traces/s;"
        f" consumer CPU {traces['consumer_cpu_us_per_trace']:.1f} µs per trace;"
        f" PostgreSQL {traces['postgres_bytes_per_trace']:,.0f} bytes per trace"
    )
    print("== time from XADD to billable (consumer running) ==")
    verdict = "PASS" if billable["p99_ms"] < 2000 else "MISS"
    print(
        f"  p50 {billable['p50_ms']:.1f} ms, p99 {billable['p99_ms']:.1f} ms  [{verdict} p99 < 2 s]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
