"""Soak run: mixed streaming and non-streaming traffic with vendor faults for a long while,
and the gateway's memory over time (target: growth under 5 MB per hour).

    .venv/bin/python -m marketplace.devenv --data-dir var/bench exec -- \\
        .venv/bin/python -m bench.soak_bench [--minutes 30] [--rate 100] [--sample-seconds 10]

Starts two fake upstreams (``tests.support.upstream``), one gateway replica (uvicorn, one
worker) and the usage ingest loop, all on loopback, and seeds two endpoints sharing a tag
(so faults fall back) and a customer. The load is paced at ``--rate`` requests a second
(at most ``--concurrency`` in flight), half streamed; every ``--fault-every`` seconds one
upstream is scripted a short burst of a seeded fault (hang, trickle, oversize, invalid JSON,
invalid SSE, cut stream, reset, 503). Every ``--sample-seconds`` it reads the gateway's RSS
from /proc. At the end it prints the series and the growth per hour fitted by least squares
over the samples after ``--warmup-minutes``, and writes ``bench/results/soak-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from datetime import UTC, datetime

from bench import harness
from bench.harness import log

FAULTS = [
    "ttfb-hang",
    "trickle:40",
    "oversize:1200000",
    "malformed-json",
    "invalid-sse",
    "cut-stream:3",
    "reset",
    "status:503",
]
TARGET_MB_PER_HOUR = 5.0


async def load(args: argparse.Namespace, gateway_url: str, key: str, tag: str, upstreams, rng):  # type: ignore[no-untyped-def]
    import aiohttp
    import orjson

    bodies = {s: orjson.dumps(harness.chat_body(tag, s)) for s in (False, True)}
    url = f"{gateway_url}/v1/chat/completions"
    outcomes: Counter[str] = Counter()
    samples: list[dict[str, float]] = []
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    next_slot = t0
    interval = 1.0 / args.rate
    gateway_pid = args.gateway_pid

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_slot
        while True:
            now = time.monotonic()
            slot = max(now, next_slot)
            next_slot = slot + interval
            if slot >= end:
                return
            await asyncio.sleep(slot - now)
            stream = rng.random() < 0.5
            seen = await harness.chat(session, url, key, bodies[stream], stream)
            label = seen.outcome if seen.outcome != "refused" else f"refused {seen.code}"
            outcomes[f"{'stream' if stream else 'json'} {label}"] += 1

    async def faults() -> None:
        loop = asyncio.get_running_loop()
        while time.monotonic() < end:
            await asyncio.sleep(args.fault_every)
            fault = rng.choice(FAULTS)
            target = rng.choice(upstreams)
            burst = [fault] * rng.randint(1, 5)
            await loop.run_in_executor(None, target.script, burst)
            outcomes[f"fault {fault}"] += 1

    async def sampler() -> None:
        while time.monotonic() < end:
            rss = harness.rss_mb(gateway_pid)
            minute = (time.monotonic() - t0) / 60
            done = sum(v for k, v in outcomes.items() if not k.startswith("fault"))
            samples.append({"minute": round(minute, 2), "rss_mb": round(rss, 2), "requests": done})
            log(f"t={minute:5.1f} min  gateway RSS {rss:7.1f} MB  requests {done}")
            await asyncio.sleep(args.sample_seconds)

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(args.concurrency)]
        side = [asyncio.create_task(faults()), asyncio.create_task(sampler())]
        await asyncio.gather(*tasks)
        for task in side:
            task.cancel()
    samples.append(
        {
            "minute": round((time.monotonic() - t0) / 60, 2),
            "rss_mb": round(harness.rss_mb(gateway_pid), 2),
            "requests": sum(v for k, v in outcomes.items() if not k.startswith("fault")),
        }
    )
    return outcomes, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_bench", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--concurrency", type=int, default=32, help="most requests in flight")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--fault-every", type=float, default=5.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    harness.require_devenv("bench.soak_bench")
    import uvloop

    from marketplace.devenv import free_port
    from tests.support.upstream import UpstreamProcess

    rng = random.Random(args.seed)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    run_dir = harness.RUN_DIR / f"soak-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    tag = f"soak{stamp.replace('-', '')}"
    upstreams = [UpstreamProcess().start() for _ in range(2)]
    procs: list[harness.Proc] = []
    try:
        customer = harness.seed([u.url for u in upstreams], tag, ["1000000"])[0]
        gw = harness.gateway(
            free_port(),
            run_dir,
            GATEWAY_FIRST_BYTE_TIMEOUT="2",
            GATEWAY_CIRCUIT_COOLDOWN_SECONDS="2",
            GATEWAY_MAX_UPSTREAM_BODY_BYTES="1048576",
            SWITCHYARD_SPOOL_DIR=str(run_dir / "spool"),
        ).start()
        procs.append(gw)
        procs.append(harness.ingest_loop(run_dir).start())
        gw.wait_ready()
        args.gateway_pid = gw.pid
        log(f"gateway pid {gw.pid} on :{gw.port}; {args.minutes} min at {args.rate} req/s")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            outcomes, samples = runner.run(
                load(args, f"http://127.0.0.1:{gw.port}", customer.keys[0], tag, upstreams, rng)
            )
    finally:
        for proc in reversed(procs):
            proc.stop()
        for up in upstreams:
            up.stop()

    after = [(s["minute"] / 60, s["rss_mb"]) for s in samples if s["minute"] >= args.warmup_minutes]
    growth = harness.least_squares_slope(after)
    print("\nminute  RSS MB  requests")
    for s in samples:
        print(f"{s['minute']:6.1f}  {s['rss_mb']:6.1f}  {s['requests']:8d}")
    print("\noutcomes:")
    for name, count in sorted(outcomes.items()):
        print(f"  {name:<40} {count}")
    verdict = "PASS" if growth < TARGET_MB_PER_HOUR else "MISS"
    print(
        f"\ngateway RSS growth after {args.warmup_minutes:g} min warm-up: {growth:+.2f} MB/hour "
        f"over {len(after)} samples ({verdict}: target < {TARGET_MB_PER_HOUR} MB/hour)"
    )
    harness.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = harness.RESULTS_DIR / f"soak-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "args": {k: v for k, v in vars(args).items() if k != "gateway_pid"},
                "samples": samples,
                "outcomes": dict(outcomes),
                "growth_mb_per_hour": growth,
                "pass": growth < TARGET_MB_PER_HOUR,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out.relative_to(harness.ROOT)}")
    return 0 if growth < TARGET_MB_PER_HOUR else 1


if __name__ == "__main__":
    raise SystemExit(main())
