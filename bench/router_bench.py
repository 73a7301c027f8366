"""Microbenchmark of the router: one decision over a large routing table.

    .venv/bin/python -m marketplace.devenv --data-dir var/test-router exec -- \\
        .venv/bin/python -m bench.router_bench

Measured 2026-11-27 on the 2-core development machine (Python 3.11.7, numpy 2.4.6), with
other test suites running beside it (load average 2.6): 10,000 endpoints of which 1,000
serve ``tag:sql`` (950 visible to the caller, 766 eligible), every endpoint with live
numbers, 5,000 decisions after 500 of warm-up, ``time.perf_counter_ns`` around each call
(CPU = the thread's CPU time, which leaves out preemption by other processes):

    case                                      p50 us   p99 us   CPU p50  CPU p99
    baseline: dict lookup of the tag             0.9      1.1       1.0      1.3
    baseline: first router (loop, quote, sort) 1,596    6,696     1,595    3,036
    plan_route balanced, LiveView               99.2    162.9      99.6    156.8
    plan_route :floor, LiveView                107.7    217.1     108.2    192.7
    plan_route strict policy (8 filters)        99.5    176.4      99.8    169.1
    plan_route slug, LiveView                   41.4     88.6      41.6     84.5
    plan_route balanced + to_trace()           122.9    200.7     123.4    194.3
    plan_route balanced, plain dict live       939.7  5,880.8     940.4  2,145.6

    ratio plan_route / first router: p50 0.06x, p99 0.02x; / dict lookup: p50 106x
    one-off per snapshot: index build 17-34 ms; per live refresh: LiveView arrays 9-20 ms

Target: p50 <= 150 us, p99 <= 1 ms for ``plan_route`` with a ``LiveView`` (the gateway
builds one per refresh of the live numbers): met. The wall-clock p99 depends on the
machine's load: at load average ~4.9 it reached ~4 ms (a scheduler time slice) while the
CPU p99 stayed under 0.4 ms. A plain dict as the live view is converted on every call,
hence ~1 ms: the gateway should pass a ``LiveView``. Nothing here is asserted by tests.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections.abc import Callable

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
django.setup()

from routing.policy import route_policy  # noqa: E402
from routing.router import EndpointLive, LiveView, plan_route, prepare_snapshot  # noqa: E402
from routing.scoring import SnapshotIndex  # noqa: E402
from routing.snapshot import EndpointView, Snapshot  # noqa: E402
from vendors.pricing import quote, surge_multiplier  # noqa: E402

ENDPOINTS = 10_000
SERVING_TAG = 1_000
RUNS = 5_000
WARMUP = 500
ORGANIZATION = 7

CURVES = (
    ((0.5, 1.0), (1.0, 2.0)),
    ((0.0, 1.0), (0.7, 1.2), (0.9, 1.8), (1.0, 3.0)),
    ((0.3, 1.0), (0.6, 1.5), (1.0, 2.5)),
    ((0.0, 1.0),),
)
OTHER_TAGS = ("chat", "code", "legal", "medical", "summarise", "translate", "extract", "math")


def build_snapshot(rng: random.Random) -> Snapshot:
    endpoints = []
    sql = set(rng.sample(range(ENDPOINTS), SERVING_TAG))
    for i in range(ENDPOINTS):
        tags = set(rng.sample(OTHER_TAGS, 2))
        if i in sql:
            tags.add("sql")
        quality = {"*": rng.random()}
        if i in sql and rng.random() < 0.7:
            quality["sql"] = rng.random()
        endpoints.append(
            EndpointView(
                id=i + 1,
                vendor_id=i % 500 + 1,
                vendor_slug=f"vendor-{i % 500}",
                slug=f"model-{i}",
                kind="chat" if rng.random() < 0.97 else "embeddings",
                base_url="http://127.0.0.1:9/v1",
                upstream_model="m",
                secret="",
                tags=frozenset(tags),
                price_input=rng.randrange(10_000_000, 2_000_000_000),
                price_output=rng.randrange(20_000_000, 4_000_000_000),
                context_length=4096,
                capacity=rng.randrange(1, 16),
                surge_curve=rng.choice(CURVES),
                surge_cap=rng.choice((2.0, 3.0, 5.0)),
                region=rng.choice(("eu", "us", "ap")),
                data_retention_days=rng.choice((0, 0, 0, 30)),
                private_to=rng.randrange(1, 50) if rng.random() < 0.05 else None,
                quality=quality,
            )
        )
    return Snapshot.build(endpoints)


def build_live(rng: random.Random, snapshot: Snapshot) -> dict[int, EndpointLive]:
    live = {}
    for e in snapshot.endpoints:
        roll = rng.random()
        live[e.id] = EndpointLive(
            inflight=rng.randrange(0, e.capacity + 1),
            utilisation=rng.random(),
            circuit="open" if roll < 0.02 else "half_open" if roll < 0.03 else "closed",
            half_open_trial=rng.random() < 0.5,
            latency_ms=rng.uniform(80, 3000) if rng.random() < 0.95 else None,
            throughput_tps=rng.uniform(10, 200) if rng.random() < 0.95 else None,
            requests=rng.randrange(0, 10_000) if rng.random() < 0.95 else rng.randrange(0, 50),
            success_ratio=rng.random(),
        )
    return live


def legacy_route(snapshot: Snapshot, tag: str, utilisation: dict[int, float]) -> list[object]:
    """The first router's algorithm (before this issue): quote every endpoint, sort by price."""
    found = []
    for e in snapshot.by_tag.get(tag, ()):
        if not e.visible_to(ORGANIZATION) or e.kind != "chat":
            continue
        m = surge_multiplier(e.surge_curve, utilisation.get(e.id, 0.0), e.surge_cap)
        found.append((quote(e.price_input, m) + quote(e.price_output, m), e.id, e))
    found.sort(key=lambda c: (c[0], c[1]))
    return found


def measure(name: str, call: Callable[[float], object], draws: list[float]) -> list[int]:
    """Time ``call`` once per draw after a warm-up; print wall-clock and CPU percentiles.

    The wall clock (``perf_counter_ns``) is the figure that counts; the thread's CPU time
    is printed beside it because on a shared 2-core machine the wall clock's tail also
    measures the other processes (the CPU p99 shows what the code itself costs).
    """
    for draw in draws[:WARMUP]:
        call(draw)
    wall, cpu = [], []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for draw in draws[WARMUP : WARMUP + RUNS]:
        start, start_cpu = clock(), cpu_clock()
        call(draw)
        wall.append(clock() - start)
        cpu.append(cpu_clock() - start_cpu)
    wall.sort()
    cpu.sort()

    def at(samples: list[int], q: float) -> float:
        return samples[min(int(len(samples) * q), len(samples) - 1)] / 1000

    print(
        f"{name:<46} p50 {at(wall, 0.5):8.1f} us  p99 {at(wall, 0.99):8.1f} us  "
        f"mean {statistics.fmean(wall) / 1000:8.1f} us  | cpu p50 {at(cpu, 0.5):7.1f} "
        f"p99 {at(cpu, 0.99):7.1f} us"
    )
    return wall


def main() -> int:
    rng = random.Random(20_260_101)
    snapshot = build_snapshot(rng)
    live_dict = build_live(rng, snapshot)
    utilisation = {i: v.utilisation for i, v in live_dict.items()}
    draws = [rng.random() for _ in range(RUNS + WARMUP)]

    t0 = time.perf_counter_ns()
    SnapshotIndex(snapshot)
    index_ms = (time.perf_counter_ns() - t0) / 1e6
    prepare_snapshot(snapshot)
    live = LiveView(live_dict)
    t0 = time.perf_counter_ns()
    live.prepare(snapshot)
    columns_ms = (time.perf_counter_ns() - t0) / 1e6

    balanced = route_policy({"model": "tag:sql"})
    floor = route_policy({"model": "tag:sql:floor"})
    strict = route_policy(
        {
            "model": "tag:sql+chat",
            "provider": {
                "ignore": ["vendor-1", "vendor-2/model-2"],
                "region": ["eu", "us"],
                "zdr": True,
                "max_price": {"prompt": "1.5", "completion": "3"},
                "order": ["vendor-3", "vendor-4"],
                "min_quality": 0.2,
                "require_parameters": True,
            },
        }
    )
    params = frozenset({"temperature", "max_tokens"})
    slug = route_policy({"model": snapshot.endpoints[5].full_slug})

    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores)")
    print(
        f"snapshot: {ENDPOINTS} endpoints, {len(snapshot.by_tag['sql'])} serve tag:sql; "
        f"{RUNS} decisions after {WARMUP} warm-up"
    )
    print(f"one-off: index build {index_ms:.1f} ms, live columns (10k) {columns_ms:.1f} ms")

    def decide(policy, live_numbers, **extra):  # type: ignore[no-untyped-def]
        def call(draw: float) -> object:
            return plan_route(
                snapshot,
                policy,
                organization_id=ORGANIZATION,
                kind="chat",
                live=live_numbers,
                explore_draw=draw,
                **extra,
            )

        return call

    lookup = measure(
        "baseline: dict lookup of the tag", lambda d: snapshot.by_tag.get("sql"), draws
    )
    legacy = measure(
        "baseline: first router (loop, quote, sort)",
        lambda d: legacy_route(snapshot, "sql", utilisation),
        draws,
    )
    main_run = measure("plan_route balanced, LiveView", decide(balanced, live), draws)
    measure("plan_route :floor, LiveView", decide(floor, live), draws)
    measure(
        "plan_route strict policy (8 filters), LiveView",
        decide(strict, live, request_params=params),
        draws,
    )
    measure("plan_route slug, LiveView", decide(slug, live), draws)
    measure(
        "plan_route balanced + to_trace(), LiveView",
        lambda d: decide(balanced, live)(d).to_trace(),  # type: ignore[attr-defined]
        draws,
    )
    measure("plan_route balanced, plain dict live", decide(balanced, live_dict), draws)

    def p(samples: list[int], q: float) -> float:
        return samples[int(len(samples) * q)] / 1000

    print(
        f"ratio plan_route/first router: p50 {p(main_run, 0.5) / p(legacy, 0.5):.2f}x, "
        f"p99 {p(main_run, 0.99) / p(legacy, 0.99):.2f}x; "
        f"plan_route/dict lookup: p50 {p(main_run, 0.5) / p(lookup, 0.5):.0f}x"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
