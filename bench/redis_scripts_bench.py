"""Redis's CPU for the gateway's hot-path scripts: one reserve and one settle per request.

    .venv/bin/python -m marketplace.devenv --data-dir var/bench exec -- \\
        .venv/bin/python -m bench.redis_scripts_bench [--requests 20000] [--endpoints 50]

Runs ``--requests`` reserve + settle pairs (``routing.live.LiveState``, the scripts the
gateway runs, with a usage event and a route trace of a benchmark request's size) in a
scratch Redis database (``REDIS_URL``'s, number 7, emptied before and after), 16 at a time
over ``--endpoints`` endpoints, and prints the Redis server's CPU per request (``INFO cpu``
before and after) and the commands the scripts ran per request (``INFO commandstats``).
The server's CPU includes reading and answering the calls; compare two commits with the
same arguments on the same machine (a ``git worktree`` of the old one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import redis
import redis.asyncio as aioredis

SCRATCH_DB = 7


def _cpu(info: dict[str, float]) -> float:
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.redis_scripts_bench", description=__doc__
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--endpoints", type=int, default=50)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    import django

    django.setup()
    from billing.credit import credit_key
    from routing.live import LiveState
    from routing.resp import RespClient

    url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + f"/{SCRATCH_DB}"
    sync = redis.Redis.from_url(url)
    sync.flushdb()
    sync.set(credit_key(1), 10**15)
    event = {"rid": "r" * 32, "org": 1, "key": 1, "ep": 1, "cost": 12345, "pt": 20, "ct": 20}
    trace = {"id": "r" * 32, "routing": {"candidates": [{"slug": "v/e", "score": 0.5}] * 4}}

    async def run() -> tuple[float, float, dict[str, int]]:
        client = aioredis.Redis.from_url(url)
        fast = RespClient(url)
        state = LiveState(client, fast=fast)
        counter = iter(range(10**9))

        async def one() -> None:
            n = next(counter)
            lease = f"lease-{n}"
            result = await state.reserve(
                organization_id=1,
                key_id=1,
                endpoint_id=n % args.endpoints + 1,
                capacity=1000,
                hold=50_000,
                lease=lease,
                rate_limit_rpm=None,
                key_credit_limit=None,
                key_period="all",
                key_period_ttl=3600,
            )
            assert result.reservation is not None, result.verdict
            await state.settle(
                result.reservation,
                cost=12_345,
                vendor_failed=False,
                latency_ms=3,
                event=event,
                request_id=f"req-{n}",
                trace=trace,
                tokens=40,
                completion_tokens=20,
            )

        async def worker(count: int) -> None:
            for _ in range(count):
                await one()

        await asyncio.gather(*(worker(50) for _ in range(16)))  # warm: scripts loaded
        sync.config_resetstat()
        before = _cpu(sync.info("cpu"))
        started = time.perf_counter()
        per = args.requests // 16
        await asyncio.gather(*(worker(per) for _ in range(16)))
        wall = time.perf_counter() - started
        after = _cpu(sync.info("cpu"))
        stats = sync.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        usec = {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in stats.items()}
        calls["usec:scripts"] = usec.get("evalsha", 0)
        calls["usec:inside"] = sum(v for k, v in usec.items() if k not in ("evalsha", "info"))
        await fast.aclose()
        await client.aclose()
        return (after - before) / (per * 16), wall / (per * 16), calls

    try:
        cpu, wall, calls = asyncio.run(run())
    finally:
        sync.flushdb()
    total = args.requests // 16 * 16
    print(f"{total} requests (reserve + settle), 16 at a time, {args.endpoints} endpoints")
    print(f"redis CPU per request: {cpu * 1e6:.1f} us; wall per request: {wall * 1e6:.1f} us")
    scripts_us, inside_us = calls.pop("usec:scripts"), calls.pop("usec:inside")
    print(
        f"running the scripts: {scripts_us / total:.1f} us per request, of which the commands "
        f"they call {inside_us / total:.1f} us (INFO commandstats)"
    )
    inner = {k: v for k, v in calls.items() if k not in ("evalsha", "info", "config|resetstat")}
    print(f"commands per request inside the scripts: {sum(inner.values()) / total:.2f}")
    for name, count in sorted(inner.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<18} {count / total:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
