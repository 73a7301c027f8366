"""The gateway's live-numbers refresh over many endpoints (``routing.live.LiveCache``).

    .venv/bin/python -m marketplace.devenv --data-dir var/bench exec -- \\
        .venv/bin/python -m bench.live_refresh_bench [--endpoints 10000] [--rounds 20]

Every gateway replica re-reads every endpoint's live numbers (in flight, utilisation,
latency, requests, success) from Redis every ``GATEWAY_LIVE_REFRESH_SECONDS`` (0.25 s), on
its event loop. This fills those hashes for ``--endpoints`` endpoints in a scratch Redis
database (``REDIS_URL``'s, number 7, emptied before and after) and prints the wall time
and this process's CPU time of one refresh (median and max of ``--rounds``), beside the
time of the same HGETALL pipeline alone, the floor any parsing adds to.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import redis
import redis.asyncio as aioredis

from routing.live import (
    INFLIGHT,
    LATENCY,
    OUTCOMES,
    REQUESTS,
    UTILISATION,
    LiveCache,
)

SCRATCH_DB = 7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.live_refresh_bench", description=__doc__)
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + f"/{SCRATCH_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    ids = [str(i) for i in range(1, args.endpoints + 1)]
    pipe = client.pipeline()
    for key, value in (
        (INFLIGHT, 3),
        (UTILISATION, 0.123456789012),
        (LATENCY, 45.678901234567),
        (REQUESTS, 1234),
        (OUTCOMES, 0.99),
    ):
        pipe.hset(key, mapping=dict.fromkeys(ids, value))
    pipe.execute()

    async def run() -> None:
        async_client = aioredis.Redis.from_url(url)
        cache = LiveCache(async_client)
        await cache.refresh()  # warm: connection and imports
        for label, once in (("HGETALL pipeline alone", _pipeline_only), ("refresh", None)):
            walls, cpus = [], []
            for _ in range(args.rounds):
                t0, c0 = time.perf_counter(), time.process_time()
                if once is None:
                    await cache.refresh()
                else:
                    await once(async_client)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            walls.sort()
            cpus.sort()
            mid = len(walls) // 2
            print(
                f"{label:<24} {args.endpoints} endpoints: wall median {walls[mid] * 1e3:.1f} ms "
                f"max {walls[-1] * 1e3:.1f} ms; CPU median {cpus[mid] * 1e3:.1f} ms"
            )
        await async_client.aclose()

    try:
        asyncio.run(run())
    finally:
        client.flushdb()
    return 0


async def _pipeline_only(client: aioredis.Redis) -> None:
    pipe = client.pipeline(transaction=False)
    for key in (INFLIGHT, UTILISATION, LATENCY, REQUESTS, OUTCOMES):
        pipe.hgetall(key)
    await pipe.execute()


if __name__ == "__main__":
    raise SystemExit(main())
