"""The gateway's live-numbers refresh over many endpoints (``routing.live.LiveCache``).

    .venv/bin/python -m marketplace.devenv --data-dir var/bench exec -- \\
        .venv/bin/python -m bench.live_refresh_bench [--endpoints 10000] [--rounds 20]
        [--changed 100]

Every gateway replica copies the endpoints' live numbers (in flight, utilisation, latency,
requests, success, circuit) from Redis every ``GATEWAY_LIVE_REFRESH_SECONDS`` (0.25 s) on
its event loop, and rebuilds the router's view from them. Since the sixth session a
refresh reads only the endpoints whose numbers changed (the scripts mark them), and every
``GATEWAY_LIVE_FULL_REFRESH_SECONDS`` all of them. This fills the live hashes for
``--endpoints`` endpoints in a scratch Redis database (``REDIS_URL``'s, number 7, emptied
before and after), builds a snapshot of as many endpoints (``bench.router_bench``'s), and
prints the wall time and this process's CPU time (median and max of ``--rounds``) of:

* a full read (every endpoint's hash), with and without the view rebuild;
* a read of what changed, ``--changed`` endpoints moved since the last one (written and
  marked between rounds, outside the timing), with the view rebuild.

The event loop runs nothing else while a refresh runs: the wall time is how long requests
arriving meanwhile wait.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio as aioredis

from bench.router_bench import build_snapshot
from routing.live import (
    INFLIGHT,
    LATENCY,
    OUTCOMES,
    REQUESTS,
    TOUCHED,
    UTILISATION,
    LiveCache,
)
from vendors.pricing import live_key

SCRATCH_DB = 7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.live_refresh_bench", description=__doc__)
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--changed", type=int, default=100)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    import django

    django.setup()
    from routing.gateway.app import GatewayApp
    from routing.router import prepare_snapshot

    url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + f"/{SCRATCH_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    ids = [str(i) for i in range(1, args.endpoints + 1)]
    numbers = {
        INFLIGHT: 3,
        UTILISATION: 0.123456789012,
        LATENCY: 45.678901234567,
        REQUESTS: 1234,
        OUTCOMES: 0.99,
    }
    pipe = client.pipeline()
    for ep in ids:
        pipe.hset(live_key(ep), mapping=numbers)
    pipe.zadd(TOUCHED, dict.fromkeys(ids, time.time() - 3600))
    pipe.execute()
    rng = random.Random(1)
    snapshot = build_snapshot(rng)  # bench.router_bench's 10,000 endpoints
    prepare_snapshot(snapshot)

    def move_some() -> None:
        """``--changed`` endpoints move, as the reserve and settle scripts would write."""
        now = time.time()
        pipe = client.pipeline()
        for ep in rng.sample(ids, args.changed):
            pipe.hset(live_key(ep), mapping={INFLIGHT: rng.randrange(5), UTILISATION: rng.random()})
            pipe.zadd(TOUCHED, {ep: now})
        pipe.execute()

    async def run() -> None:
        async_client = aioredis.Redis.from_url(url)
        app = GatewayApp()
        app._snapshot = snapshot
        bare = LiveCache(async_client)
        viewed = LiveCache(async_client, on_refresh=app._rebuild_live_view, skew=0)
        await bare.refresh()  # warm: connection, imports, the first view
        await viewed.refresh()

        async def full_view() -> None:
            await viewed.refresh(full=True)

        cases: list[tuple[str, Callable[[], Awaitable[object]], Callable[[], None] | None]] = [
            ("full read", lambda: bare.refresh(full=True), None),
            ("full read + view", full_view, None),
            (f"changed ({args.changed}) + view", viewed.refresh, move_some),
        ]
        for label, once, before in cases:
            walls, cpus = [], []
            for _ in range(args.rounds):
                if before is not None:
                    before()
                t0, c0 = time.perf_counter(), time.process_time()
                await once()
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            walls.sort()
            cpus.sort()
            mid = len(walls) // 2
            print(
                f"{label:<26} {args.endpoints} endpoints: wall median {walls[mid] * 1e3:.1f} ms "
                f"max {walls[-1] * 1e3:.1f} ms; CPU median {cpus[mid] * 1e3:.1f} ms"
            )
        await async_client.aclose()

    try:
        asyncio.run(run())
    finally:
        client.flushdb()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
