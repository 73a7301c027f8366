"""Throughput with one and with two gateway replicas, as a ratio.

    .venv/bin/python -m marketplace.devenv --data-dir var/bench exec -- \\
        .venv/bin/python -m bench.replicas_bench [--seconds 20] [--rounds 2] [--concurrency 64]

Starts the instant fake upstream (``tests.support.upstream``), two gateway replicas
(uvicorn, one worker each, on two ports) and the usage ingest loop, all on loopback, and
seeds one endpoint and a customer. The client (this process: aiohttp on uvloop, closed
loop) runs ``--concurrency`` workers sending non-streamed requests, first all to replica A,
then spread over A and B (worker i to replica i mod 2, as a balancer would); the two
configurations alternate for ``--rounds`` rounds, each measured ``--seconds`` after a short
ramp. Prints req/s for one and two replicas, the ratio, and how busy the machine's cores
were (everything, the load generator and the upstream included, shares them); writes
``bench/results/replicas-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

from bench import harness
from bench.harness import log

RAMP_SECONDS = 2.0


def machine_busy_seconds() -> float:
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def measure(urls: list[str], key: str, body: bytes, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    import aiohttp

    done = 0
    errors = 0
    window: dict[str, float] = {}
    end = time.monotonic() + RAMP_SECONDS + args.seconds
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency)) for _ in urls
    ]

    async def worker(i: int) -> None:
        nonlocal done, errors
        session, url = sessions[i % len(urls)], urls[i % len(urls)]
        while time.monotonic() < end:
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            if "start" in window:
                done += ok
                errors += not ok

    async def edges() -> None:
        await asyncio.sleep(RAMP_SECONDS)
        window.update(start=time.monotonic(), busy0=machine_busy_seconds())
        nonlocal done, errors
        done = errors = 0
        await asyncio.sleep(args.seconds)
        window.update(end=time.monotonic(), busy1=machine_busy_seconds(), done=done, errors=errors)

    await asyncio.gather(edges(), *(worker(i) for i in range(args.concurrency)))
    for session in sessions:
        await session.close()
    seconds = window["end"] - window["start"]
    return {
        "rps": window["done"] / seconds,
        "errors": int(window["errors"]),
        "cores_busy": (window["busy1"] - window["busy0"]) / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas_bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured per cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    harness.require_devenv("bench.replicas_bench")
    import orjson
    import uvloop

    from marketplace.devenv import free_port
    from tests.support.upstream import UpstreamProcess

    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    run_dir = harness.RUN_DIR / f"replicas-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    tag = f"rep{stamp.replace('-', '')}"
    upstream = UpstreamProcess().start()
    procs: list[harness.Proc] = []
    cells: list[dict[str, Any]] = []
    try:
        customer = harness.seed([upstream.url], tag, ["1000000"])[0]
        replicas = [
            harness.gateway(free_port(), run_dir, f"gateway-{name}").start() for name in "ab"
        ]
        procs += [*replicas, harness.ingest_loop(run_dir).start()]
        for replica in replicas:
            replica.wait_ready()
        urls = [f"http://127.0.0.1:{r.port}/v1/chat/completions" for r in replicas]
        body = orjson.dumps(harness.chat_body(tag, False))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(measure(urls, customer.keys[0], body, args))  # warm-up, both replicas
            for round_ in range(args.rounds):
                order = (1, 2) if round_ % 2 == 0 else (2, 1)
                for n in order:
                    cell = runner.run(measure(urls[:n], customer.keys[0], body, args))
                    cell.update(replicas=n, round=round_)
                    cells.append(cell)
                    log(
                        f"round {round_}: {n} replica(s) {cell['rps']:7.0f} req/s, "
                        f"{cell['errors']} errors, machine {cell['cores_busy']:.2f} cores busy"
                    )
    finally:
        for proc in reversed(procs):
            proc.stop()
        upstream.stop()

    def mean(n: int, field: str) -> float:
        values = [c[field] for c in cells if c["replicas"] == n]
        return sum(values) / len(values)

    one, two = mean(1, "rps"), mean(2, "rps")
    cpus = os.cpu_count()
    print(f"\nconcurrency {args.concurrency}, non-streaming, instant upstream, {cpus} CPUs")
    print(f"1 replica:  {one:7.0f} req/s  (machine {mean(1, 'cores_busy'):.2f} cores busy)")
    print(f"2 replicas: {two:7.0f} req/s  (machine {mean(2, 'cores_busy'):.2f} cores busy)")
    print(f"ratio 2/1:  {two / one:.2f}")
    print(
        f"The machine has {cpus} cores shared by the load generator, the upstream, Redis, "
        "PostgreSQL, the ingest and the replicas (and other people's work): a second replica "
        "can only use what the first leaves idle."
    )
    harness.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = harness.RESULTS_DIR / f"replicas-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "args": vars(args),
                "cpus": cpus,
                "cells": cells,
                "rps_1": one,
                "rps_2": two,
                "ratio": two / one,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out.relative_to(harness.ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
