"""Where the gateway's tail latency comes from (at concurrency 1 unless told).

    .venv/bin/python -m marketplace.devenv --data-dir var/bench exec -- \\
        .venv/bin/python -m bench.tail_bench [--seconds 10] [--rounds 2] [--concurrency 1]

One instant fake upstream and one gateway (as ``bench.gateway_bench`` starts them), driven
closed-loop at ``--concurrency`` (1) for ``--seconds`` per condition and round, with beside it:

* ``none``: nothing (the gateway alone);
* ``ingest``: the usage and route-trace ingest loop, as ``bench.gateway_bench`` runs it;
* ``ingest-idle``: the same, with the loop and every PostgreSQL process at ``SCHED_IDLE``;
* ``burn``: no metering, a process that burns the CPU 80 ms out of every 280 ms;
* ``burn-idle``: the same at ``SCHED_IDLE``;
* ``burn-apart``: the same pinned to CPU 1, with the load generator, the gateway, the
  upstream and Redis pinned to CPU 0.

Prints, per condition, the direct p50/p99 (the upstream called directly in the same round)
and the gateway's p50/p99/p99.9; with the ingest, how many of the slow requests (over p50 +
2 ms) overlapped a usage or trace batch against how many of all requests did, and Redis's
time per call of the ingest's commands. Not part of ``make test``; needs two CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OUTBOUND_ALLOWED_NETWORKS", "127.0.0.0/8")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

from bench.gateway_bench import (
    PROJECT_PYTHON,
    ROOT,
    RUN_DIR,
    UPSTREAMS,
    LeanSession,
    Proc,
    Target,
    asyncio_run,
    find_postgres_pid,
    find_redis_pid,
    ingest_lag,
    log,
    one_request,
    pct,
    run_load,
    seed,
    start_gateway,
    wait_http,
)

CONDITIONS = ("none", "ingest", "ingest-idle", "burn", "burn-idle", "burn-apart")
BURNER = (
    "import time\n"
    "while True:\n"
    "    t = time.perf_counter()\n"
    "    while time.perf_counter() - t < 0.08: pass\n"
    "    time.sleep(0.2)\n"
)


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def _postgres_pids() -> list[int]:
    import psutil

    root = find_postgres_pid()
    if root is None:
        return []
    return [root, *(child.pid for child in psutil.Process(root).children(recursive=True))]


def _set_idle(pids: list[int]) -> None:
    for pid in pids:
        for tid in _threads(pid):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def _pin(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        for tid in _threads(pid):
            os.sched_setaffinity(tid, cpus)


def _redis_calls() -> dict[str, Any]:
    import redis

    return redis.Redis.from_url(os.environ["REDIS_URL"]).info("commandstats")


def _overlap(rows: list[tuple[float, float]], batches: list[list[float]]) -> str:
    """Share of slow requests, and of all requests, that overlapped each kind of batch."""
    lat = sorted(end - begin for begin, end in rows)
    p50 = lat[len(lat) // 2]
    slow = [(b, e) for b, e in rows if e - b > p50 + 0.002]
    out = []
    for name, start, end, count in (("usage", 0, 1, 3), ("trace", 1, 2, 4)):
        spans = [(row[start], row[end]) for row in batches if row[count]]

        def hit(begin: float, finish: float, spans: list[tuple[float, float]] = spans) -> bool:
            return any(begin < z and finish > a for a, z in spans)

        share_all = sum(hit(b, e) for b, e in rows) / len(rows)
        share_slow = sum(hit(b, e) for b, e in slow) / max(len(slow), 1)
        out.append(f"{name} batches: {share_slow:.0%} of slow requests, {share_all:.0%} of all")
    return f"{len(slow)} slow (> p50 + 2 ms); " + "; ".join(out)


async def _closed_loop(
    session: LeanSession, target: Target, seconds: float, concurrency: int
) -> list[tuple[float, float]]:
    """``concurrency`` workers, each sending its next request when the last ended; the load
    generator's garbage collector off meanwhile (as in ``bench.gateway_bench``: its pauses
    would stall every request in flight and show as the gateway's tail)."""
    url, body = target.url("instant"), target.body("instant", False)
    rows: list[tuple[float, float]] = []
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            outcome = await one_request(session, url, body, target.headers, False)
            if outcome.ok:
                rows.append((outcome.begin, outcome.end))

    gc.collect()
    gc.disable()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        gc.enable()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    conditions = [c for c in args.conditions.split(",") if c]
    unknown = set(conditions) - set(CONDITIONS)
    if unknown or not os.environ.get("REDIS_URL"):
        print(f"unknown conditions {unknown}" if unknown else "run me under devenv exec")
        return 2
    if len(os.sched_getaffinity(0)) < 2 and "burn-apart" in conditions:
        conditions.remove("burn-apart")

    from marketplace.devenv import free_port
    from tests.support.upstream import UpstreamProcess

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = RUN_DIR / f"tail-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    upstream = UpstreamProcess(delay_ms=0).start()
    urls = {name: upstream.url for name in UPSTREAMS}
    seeded = seed(urls, f"tail{stamp.replace('-', 't')}")
    port = free_port()
    gateway = start_gateway(port, run_dir)
    wait_http(f"http://127.0.0.1:{port}/healthz", gateway, 60, ok=(200, 404))
    base = f"http://127.0.0.1:{port}"
    direct = Target("direct", urls, {n: "fake-small" for n in UPSTREAMS}, {})
    routed = Target(
        "switchyard",
        {n: base for n in UPSTREAMS},
        seeded.models,
        {"Authorization": f"Bearer {seeded.key}"},
    )
    chain = [os.getpid(), gateway.pid, upstream.pid or 0, find_redis_pid() or 0]
    results: dict[str, dict[str, list[float]]] = {
        c: {"direct": [], "gateway": []} for c in conditions
    }
    notes: dict[str, list[str]] = {c: [] for c in conditions}
    served: dict[str, int] = dict.fromkeys(conditions, 0)  # gateway requests, for req/s

    async def one_condition(sessions: dict[str, LeanSession], condition: str, n: int) -> None:
        helper: Proc | None = None
        timings = run_dir / f"ingest-{condition}-{n}.json"
        if condition.startswith("ingest"):
            env = {**os.environ, "INGEST_TIMINGS": str(timings), "LOG_LEVEL": "WARNING"}
            popen = subprocess.Popen(
                [str(PROJECT_PYTHON), "-m", "bench.ingest_loop"], cwd=ROOT, env=env
            )
            helper = Proc("ingest", popen)
        elif condition.startswith("burn"):
            helper = Proc("burn", subprocess.Popen([sys.executable, "-c", BURNER]))
        try:
            await asyncio.sleep(1.5)  # the ingest loop imports Django
            if helper is not None and condition.startswith("ingest"):
                # Events the conditions without metering left in Redis: ingested before the
                # load, not during it (the gateway benchmark's ingest never has a backlog).
                backlog = await asyncio.to_thread(ingest_lag, 120.0)
                notes[condition].append(
                    f"backlog before the load: {backlog.get('lag_at_end')} events, ingested in "
                    f"{backlog.get('drain_seconds')} s"
                )
            if helper is not None and condition.endswith("-idle"):
                _set_idle([helper.pid, *(_postgres_pids() if condition == "ingest-idle" else [])])
            if helper is not None and condition == "burn-apart":
                _pin([helper.pid], {1})
                _pin(chain, {0})
            stats = _redis_calls()
            results[condition]["direct"] += [
                e - b
                for b, e in await _closed_loop(
                    sessions["direct"], direct, args.seconds / 4, args.concurrency
                )
            ]
            rows = await _closed_loop(sessions["gateway"], routed, args.seconds, args.concurrency)
            results[condition]["gateway"] += [e - b for b, e in rows]
            served[condition] += len(rows)
            after = _redis_calls()
        finally:
            if condition == "burn-apart":
                _pin(chain, set(range(os.cpu_count() or 2)))
            if helper is not None:
                helper.stop()
        if condition.startswith("ingest") and timings.exists():
            notes[condition].append(_overlap(rows, json.loads(timings.read_text())))
            per_call = []
            for name in ("xreadgroup", "exec", "xack", "xdel"):
                now, then = after.get(f"cmdstat_{name}"), stats.get(f"cmdstat_{name}")
                if now and (calls := now["calls"] - (then or {}).get("calls", 0)):
                    usec = now["usec"] - (then or {}).get("usec", 0)
                    per_call.append(f"{name.upper()} {usec / calls:.0f} us")
            notes[condition].append("Redis per call: " + ", ".join(per_call))

    async def drive() -> None:
        sessions = {"direct": LeanSession(), "gateway": LeanSession()}
        try:
            await run_load(sessions["gateway"], routed, "instant", False, 16, 3.0)  # warm-up
            await run_load(sessions["direct"], direct, "instant", False, 16, 1.0)
            for n in range(args.rounds):
                for condition in conditions:
                    await one_condition(sessions, condition, n)
                    log(f"round {n} {condition} done")
        finally:
            for session in sessions.values():
                await session.close()

    try:
        asyncio_run(drive())
    finally:
        gateway.stop()
        upstream.stop()

    print(
        f"\nc={args.concurrency}, instant upstream, {args.rounds} x {args.seconds:.0f} s per "
        "condition (ms)"
    )
    heads = ("direct p50", "p99", "gateway p50", "p99", "p99.9", "req/s")
    print(f"{'condition':<13} " + " ".join(f"{h:>{max(len(h), 6)}}" for h in heads))
    for condition in conditions:
        d, g = results[condition]["direct"], results[condition]["gateway"]
        rate = served[condition] / (args.seconds * args.rounds)
        figures = (pct(d, 50), pct(d, 99), pct(g, 50), pct(g, 99), pct(g, 99.9), rate)
        print(
            f"{condition:<13} "
            + " ".join(f"{f or 0:{max(len(h), 6)}.2f}" for h, f in zip(heads, figures, strict=True))
        )
        for note in notes[condition]:
            print(f"    {note}")
    out = run_dir / "report.json"
    out.write_text(json.dumps({"results": results, "notes": notes, "served": served}))
    print(f"\nraw data: {Path(out).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
