"""Gateway benchmark: the upstream directly vs Switchyard vs LiteLLM's proxy, same load.

    .venv/bin/python -m marketplace.devenv --data-dir var/bench exec -- \\
        .venv/bin/python -m bench.gateway_bench [--quick] [--seconds S] [--rounds R]

One invocation starts everything it measures, each in its own process, all on loopback:

* two fake OpenAI upstreams (``tests.support.upstream``): one instant, one ``--delay-ms 50``;
* Switchyard: ``uvicorn marketplace.asgi:application`` (one worker, uvloop, httptools), with
  a customer, a key and two endpoints created through the project's services, and the usage
  ingest loop (``bench.ingest_loop``) running beside it so metering works as in production;
* LiteLLM's proxy (``litellm[proxy]`` from ``requirements/bench.txt``, installed into
  ``var/bench-venv`` on first run, never into ``.venv``), one worker, no database,
  logging and callbacks off, one model per upstream;
* the load generator: this process on uvloop, a keep-alive HTTP/1.1 client per target
  (``LeanSession``; ``--client aiohttp`` for aiohttp's), closed loop: ``c`` workers each
  sending the next request when the last ended.

For every scenario (upstream x streaming x concurrency 1/16/64) the three targets run
back to back, in rounds whose order rotates, so drift hits all three alike. Every cell has
an unmeasured ramp, then a window (time and a minimum number of requests). Per request it
records the latency (send to last byte), and for streams the time to the first chunk and
checks the chunks; at the window's edges it reads, from /proc, the CPU time of every
process group (gateway, LiteLLM, upstreams, Redis, PostgreSQL, ingest, load generator) and
of the whole machine, so other work on the box shows. It prints the tables and PASS/MISS
per target and writes the same as JSON to ``bench/results/gateway-<timestamp>.json``.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Loopback vendors must pass the outbound guard, in the seeding and in the gateway alike.
os.environ.setdefault("OUTBOUND_ALLOWED_NETWORKS", "127.0.0.0/8")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"
UV = ROOT / ".venv" / "bin" / "uv"
BENCH_VENV = ROOT / "var" / "bench-venv"
BENCH_REQUIREMENTS = ROOT / "requirements" / "bench.txt"
RESULTS_DIR = ROOT / "bench" / "results"
RUN_DIR = ROOT / "var" / "bench-run"

WORDS = [
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"),
    *("juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo"),
    *("sierra", "tango"),
]
PROMPT = " ".join(WORDS)  # 20 words: the fake upstream answers with 20 tokens / 20 chunks
MAX_TOKENS = 20
CONCURRENCIES = (1, 16, 64)
UPSTREAMS = ("instant", "delay50")
TARGETS = ("direct", "switchyard", "litellm")

# The issue's targets ("beat LiteLLM on speed").
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 2.5
TARGET_CPU_MS = 0.5
TARGET_VS_LITELLM = 25.0
TARGET_P99_C64_MS = 50.0
TARGET_DELAY_RATIO = {16: 0.95, 64: 0.85}
TARGET_STREAM_TTFT_MS = 1.0
TARGET_STREAM_WHOLE_MS = 1.5
TARGET_RSS_MB = 300.0
# Where the targets were set (the issue), LiteLLM spent 11-12 ms of CPU per non-streamed
# request. On another machine the targets in milliseconds do not transfer; the gateway's CPU
# relative to LiteLLM's, measured in the same run, does (see ``machine_yardstick``).
ISSUE_LITELLM_CPU_MS = 11.5


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- the bench venv


def ensure_bench_venv() -> Path:
    """Create or update var/bench-venv from the hash-locked requirements/bench.txt."""
    digest = hashlib.sha256(BENCH_REQUIREMENTS.read_bytes()).hexdigest()
    stamp = BENCH_VENV / ".bench-requirements.sha256"
    python = BENCH_VENV / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    log(f"installing {BENCH_REQUIREMENTS.relative_to(ROOT)} into {BENCH_VENV.relative_to(ROOT)}")
    if not python.exists():
        subprocess.run(
            [str(UV), "venv", "--quiet", "--python", str(PROJECT_PYTHON), str(BENCH_VENV)],
            check=True,
        )
    env = {**os.environ, "VIRTUAL_ENV": str(BENCH_VENV)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # else uv's --compile-bytecode writes nothing
    subprocess.run(
        [
            str(UV),
            "pip",
            "sync",
            "--quiet",
            "--require-hashes",
            "--python",
            str(python),
            str(BENCH_REQUIREMENTS),
        ],
        check=True,
        env=env,
    )
    stamp.write_text(digest + "\n")
    return python


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_http(url: str, proc: Proc, timeout: float, ok: tuple[int, ...] = (200,)) -> None:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{_tail(proc.log_path)}")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code in ok:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise TimeoutError(
        f"{proc.name} not ready at {url} after {timeout}s ({last}):\n{_tail(proc.log_path)}"
    )


def start_gateway(port: int, run_dir: Path, prefix: Sequence[str] = ()) -> Proc:
    """One uvicorn worker as production runs it; ``prefix``: a wrapper (valgrind) before it."""
    log_path = run_dir / "gateway.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"}
    cmd = [
        *prefix,
        str(PROJECT_PYTHON),
        "-m",
        "uvicorn",
        "marketplace.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
        # As docker-compose.yml runs it: the client IP comes from TRUSTED_PROXIES alone.
        "--no-proxy-headers",
    ]
    handle = log_path.open("wb")
    popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return Proc("switchyard", popen, log_path)


def litellm_config(upstreams: dict[str, str]) -> str:
    lines = ["model_list:"]
    for name, url in upstreams.items():
        lines += [
            f"  - model_name: bench-{name}",
            "    litellm_params:",
            "      model: openai/fake-small",
            f"      api_base: {url}/v1",
            "      api_key: sk-bench-not-a-secret",
        ]
    lines += [
        "litellm_settings:",
        "  drop_params: true",
        "  set_verbose: false",
        "  telemetry: false",
        "  turn_off_message_logging: true",
        "  callbacks: []",
        "  success_callback: []",
        "  failure_callback: []",
        "general_settings:",
        "  disable_spend_logs: true",
        "  disable_error_logs: true",
    ]
    return "\n".join(lines) + "\n"


def start_litellm(
    bench_python: Path, port: int, upstreams: dict[str, str], run_dir: Path, master_key: str
) -> Proc:
    config = run_dir / "litellm.yaml"
    config.write_text(litellm_config(upstreams))
    log_path = run_dir / "litellm.log"
    env = {
        k: v
        for k, v in os.environ.items()
        # No database, no Redis for LiteLLM: those URLs belong to Switchyard.
        if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE", "VIRTUAL_ENV")
    }
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
            "DISABLE_ADMIN_UI": "True",
            "NO_DOCS": "True",
            # Without a database the master key is checked by comparison, no lookup: the
            # cheapest authentication LiteLLM has, as Switchyard's key check is cached.
            "LITELLM_MASTER_KEY": master_key,
        }
    )
    cmd = [
        str(bench_python.parent / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    handle = log_path.open("wb")
    popen = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return Proc("litellm", popen, log_path)


def start_ingest(run_dir: Path) -> Proc:
    log_path = run_dir / "ingest.log"
    handle = log_path.open("wb")
    popen = subprocess.Popen(
        [str(PROJECT_PYTHON), "-m", "bench.ingest_loop"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    return Proc("ingest", popen, log_path)


# --------------------------------------------------------------------------- seeding


@dataclass
class Seed:
    key: str
    models: dict[str, str]  # upstream name -> Switchyard model (vendor/endpoint)


def seed(upstreams: dict[str, str], tag: str) -> Seed:
    """Migrate and create a customer with plenty of credit, a key, a vendor, endpoints."""
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from billing.money import usd_to_nanos
    from billing.services import credit_grant
    from marketplace.services import api_key_create, organization_create
    from vendors.services import endpoint_approve, endpoint_create, vendor_approve, vendor_create

    call_command("migrate", interactive=False, verbosity=0)
    org = organization_create(name=f"Bench customer {tag}", slug=f"bench-{tag}")
    credit_grant(organization=org, amount=usd_to_nanos("1000000"), reason="benchmark credit")
    key = api_key_create(organization=org, name="benchmark").plaintext
    vendor = vendor_approve(
        vendor=vendor_create(name=f"Bench vendor {tag}", slug=f"bench-vendor-{tag}")
    )
    models = {}
    for name, url in upstreams.items():
        endpoint = endpoint_create(
            vendor=vendor,
            slug=name,
            base_url=f"{url}/v1",
            upstream_model="fake-small",
            price_input=usd_to_nanos("0.1"),
            price_output=usd_to_nanos("0.2"),
            capacity=10_000,  # the benchmark measures the gateway, not capacity refusals
            context_length=8192,
            tags=("chat",),
        )
        endpoint_approve(endpoint=endpoint)
        models[name] = f"{vendor.slug}/{endpoint.slug}"
    connection.close()
    return Seed(key=key, models=models)


# --------------------------------------------------------------------------- load


@dataclass
class Target:
    name: str
    bases: dict[str, str]  # upstream -> http://127.0.0.1:port to send to
    models: dict[str, str]  # upstream -> model name the target wants
    headers: dict[str, str]

    def url(self, upstream: str) -> str:
        return f"{self.bases[upstream]}/v1/chat/completions"

    def body(self, upstream: str, stream: bool) -> bytes:
        import orjson

        return orjson.dumps(
            {
                "model": self.models[upstream],
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": MAX_TOKENS,
                "stream": stream,
            }
        )


@dataclass
class CellSamples:
    """What one cell measured inside its window (after the ramp, before the drain)."""

    latency: list[float] = field(default_factory=list)  # s, send -> last byte (started in window)
    ttft: list[float] = field(default_factory=list)  # s, send -> first body bytes (streams)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    window: float = 0.0  # seconds measured
    completed: int = 0  # requests that ended inside the window (ok or not)
    completed_ok: int = 0
    total: int = 0  # every request of the run, ramp and drain included
    cpu: dict[str, float] = field(default_factory=dict)  # process group -> CPU s in window

    def merge(self, other: CellSamples) -> None:
        self.latency += other.latency
        self.ttft += other.ttft
        self.errors.update(other.errors)
        for k, v in other.error_examples.items():
            self.error_examples.setdefault(k, v)
        self.window += other.window
        self.completed += other.completed
        self.completed_ok += other.completed_ok
        self.total += other.total
        for k, v in other.cpu.items():
            self.cpu[k] = self.cpu.get(k, 0.0) + v


@dataclass
class Outcome:
    begin: float
    end: float
    ok: bool
    ttft: float = 0.0
    error: str = ""
    example: str = ""


class LeanSession:
    """The load generator's default HTTP client: the gateway's own keep-alive HTTP/1.1
    client (``routing.gateway.h1``: httptools' C parser under an asyncio protocol).

    The load generator shares the two cores with every process it measures; aiohttp's
    client spent 0.24 ms of CPU per request against the upstream directly and 0.36 ms
    against Switchyard (the same code parsing a few more headers), a fifth of the box's CPU
    per request at c=16, taken from the targets. ``--client aiohttp`` keeps the old one.
    """

    def __init__(self) -> None:
        from routing.gateway.h1 import H1Pool

        self.pool = H1Pool(connect_timeout=5.0, keepalive=300.0, resolver=_LoopbackOnly())

    async def close(self) -> None:
        await self.pool.close()


class _LoopbackOnly:
    """Every target is an IP literal on loopback: nothing to resolve."""

    async def resolve(self, host: str, port: int, family: int) -> list[dict[str, Any]]:
        raise OSError(f"the load generator does not resolve names ({host})")

    async def close(self) -> None:
        return None


async def _lean_request(
    session: LeanSession, url: str, body: bytes, headers: dict[str, str], stream: bool
) -> Outcome:
    clock = time.perf_counter
    t0 = clock()
    lines: list[bytes] = []
    first = 0.0
    try:
        async with asyncio.timeout(60):
            resp = await session.pool.post(url, body, headers)
            try:
                status = resp.status
                if not stream:
                    data = await resp.read(1 << 22)
                    t1 = clock()
                    if status != 200 or b'"choices"' not in data:
                        kind = f"HTTP {status}" if status != 200 else "bad body"
                        return Outcome(
                            t0, t1, False, error=kind, example=data[:300].decode("latin-1")
                        )
                    return Outcome(t0, t1, True)
                while line := await resp.readline():
                    if not first:
                        first = clock()  # the first chunk is one line: "data: {...}"
                    lines.append(line)
                t1 = clock()
            finally:
                resp.release()
    except Exception as exc:  # a failed request is counted, never timed
        return Outcome(t0, clock(), False, error=type(exc).__name__, example=str(exc)[:300])
    return _stream_outcome(t0, t1, first, status, b"".join(lines))


def _stream_outcome(t0: float, t1: float, first: float, status: int, whole: bytes) -> Outcome:
    chunks = whole.count(b'data: {"')
    if status != 200 or not whole.rstrip().endswith(b"data: [DONE]") or chunks < MAX_TOKENS:
        kind = f"HTTP {status}" if status != 200 else f"bad stream ({chunks} chunks)"
        return Outcome(t0, t1, False, error=kind, example=whole[:300].decode("latin-1"))
    return Outcome(t0, t1, True, ttft=first - t0)


async def one_request(
    session: Any, url: str, body: bytes, headers: dict[str, str], stream: bool
) -> Outcome:
    if isinstance(session, LeanSession):
        return await _lean_request(session, url, body, headers, stream)
    clock = time.perf_counter
    t0 = clock()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            status = resp.status
            if not stream:
                data = await resp.read()
                t1 = clock()
                if status != 200 or b'"choices"' not in data:
                    kind = f"HTTP {status}" if status != 200 else "bad body"
                    return Outcome(t0, t1, False, error=kind, example=data[:300].decode("latin-1"))
                return Outcome(t0, t1, True)
            first = 0.0
            parts = []
            async for piece in resp.content.iter_any():
                if not first:
                    first = clock()
                parts.append(piece)
            t1 = clock()
    except Exception as exc:  # a failed request is counted, never timed
        return Outcome(t0, clock(), False, error=type(exc).__name__, example=str(exc)[:300])
    return _stream_outcome(t0, t1, first, status, b"".join(parts))


async def run_load(
    session: Any,
    target: Target,
    upstream: str,
    stream: bool,
    concurrency: int,
    seconds: float,
    *,
    ramp: float = 0.0,
    snapshot: Any = None,
    min_completed: int = 0,
    max_seconds: float | None = None,
) -> CellSamples:
    """Closed loop: ``concurrency`` workers, each sending its next request when the last ends.

    Runs ``ramp`` seconds unmeasured, then measures for ``seconds`` and at least until
    ``min_completed`` requests have ended inside the window (a slow target at high
    concurrency needs that), but never longer than ``max_seconds``. Throughput counts the
    requests that ended inside the window, latency the requests that began inside it;
    ``snapshot()`` (CPU counters) is called at both edges of the window.
    """
    url, body = target.url(upstream), target.body(upstream, stream)
    headers = {"Content-Type": "application/json", **target.headers}
    loop = asyncio.get_running_loop()
    outcomes: list[Outcome] = []
    edges: dict[str, Any] = {}
    clock = time.perf_counter
    begin = clock()
    min_end = begin + ramp + seconds
    hard_end = begin + ramp + max(seconds, max_seconds or seconds)
    in_window = 0

    def edge(name: str) -> None:
        if name not in edges:
            edges[name] = (clock(), snapshot() if snapshot is not None else {})

    loop.call_at(loop.time() + ramp, edge, "start")
    hard_timer = loop.call_at(loop.time() + (hard_end - begin), edge, "end")

    async def worker() -> None:
        nonlocal in_window
        while "end" not in edges and clock() < hard_end:
            outcome = await one_request(session, url, body, headers, stream)
            outcomes.append(outcome)
            if "start" in edges and "end" not in edges:
                in_window += 1
                if outcome.end >= min_end and in_window >= min_completed:
                    edge("end")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    hard_timer.cancel()
    edge("start")  # (only if the ramp outlasted the whole run: an empty window)
    edge("end")
    (t_start, cpu_start), (t_end, cpu_end) = edges["start"], edges["end"]
    out = CellSamples(window=t_end - t_start, total=len(outcomes))
    out.cpu = {k: cpu_end[k] - cpu_start[k] for k in cpu_end if k in cpu_start}
    for o in outcomes:
        if t_start <= o.end <= t_end:
            out.completed += 1
            out.completed_ok += o.ok
        if not t_start <= o.begin < t_end:
            continue
        if o.ok:
            out.latency.append(o.end - o.begin)
            if stream:
                out.ttft.append(o.ttft)
        else:
            out.errors[o.error] += 1
            out.error_examples.setdefault(o.error, o.example)
    return out


# --------------------------------------------------------------------------- statistics


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of seconds, returned in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1] * 1000


def summarise(samples: CellSamples) -> dict[str, Any]:
    n = len(samples.latency)
    started = n + sum(samples.errors.values())
    window = samples.window or 1e-9
    cpu = dict(samples.cpu)
    machine = cpu.pop("machine", 0.0)
    ours = sum(cpu.values())
    return {
        "requests_ok": n,
        "errors": dict(samples.errors),
        "error_examples": samples.error_examples,
        "error_rate": (started - n) / started if started else 0.0,
        "seconds": round(samples.window, 3),
        "rps": samples.completed_ok / window,
        "p50_ms": pct(samples.latency, 50),
        "p90_ms": pct(samples.latency, 90),
        "p99_ms": pct(samples.latency, 99),
        "max_ms": pct(samples.latency, 100),
        "ttft_p50_ms": pct(samples.ttft, 50),
        "ttft_p99_ms": pct(samples.ttft, 99),
        # CPU of each process group per request completed in the window (ms).
        "cpu_ms_per_request": {
            k: (v * 1000 / samples.completed if samples.completed else None) for k, v in cpu.items()
        },
        # Cores in use on average during the window: all of the machine, and what is
        # not ours (other work on the box: the numbers of that cell are less clean).
        "machine_cores_busy": machine / window,
        "foreign_cores_busy": max(0.0, machine - ours) / window,
    }


# --------------------------------------------------------------------------- the run


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _machine_busy() -> float:
    with open("/proc/stat", "rb") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Monitored:
    """Process groups whose CPU time is read (from /proc) at the edges of every window."""

    roots: dict[str, int]  # group -> root pid (its children count too)
    pids: dict[str, list[int]] = field(default_factory=dict)

    def refresh(self) -> None:
        """Re-list every group's processes (call before a cell, not inside the window)."""
        import psutil

        for name, pid in self.roots.items():
            pids = [pid]
            with contextlib.suppress(psutil.Error):
                pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
            self.pids[name] = pids

    def snapshot(self) -> dict[str, float]:
        out = {name: sum(_proc_cpu(p) for p in pids) for name, pids in self.pids.items()}
        out["client"] = time.process_time()
        out["machine"] = _machine_busy()
        return out

    def rss_mb(self, name: str) -> float:
        import psutil

        total = 0
        for pid in self.pids.get(name) or [self.roots[name]]:
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
        return total / 2**20


def wait_for_quiet(monitored: Monitored, limit: float, threshold: float = 0.3) -> float:
    """Wait (up to ``limit`` s) until other work uses less than ``threshold`` cores."""
    deadline = time.monotonic() + limit
    while True:
        monitored.refresh()
        before = monitored.snapshot()
        time.sleep(2.0)
        after = monitored.snapshot()
        ours = sum(after[k] - before[k] for k in after if k != "machine")
        foreign = max(0.0, after["machine"] - before["machine"] - ours) / 2.0
        if foreign < threshold or time.monotonic() > deadline:
            log(f"other work on the machine: {foreign:.2f} cores")
            return foreign
        log(f"other work on the machine: {foreign:.2f} cores; waiting for it to calm down")


def find_redis_pid() -> int | None:
    """The redis-server behind REDIS_URL (devenv's), found by its port."""
    import psutil

    port = os.environ.get("REDIS_URL", "").rsplit(":", 1)[-1].split("/")[0]
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "redis-server" in (proc.info["name"] or "") and f":{port}" in cmdline:
            return int(proc.pid)
    return None


def find_postgres_pid() -> int | None:
    """The postmaster behind DATABASE_URL (devenv's embedded cluster), by its data dir."""
    import psutil

    url = os.environ.get("DATABASE_URL", "")
    socket_dir = url.split("host=", 1)[1].split("&")[0] if "host=" in url else ""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "postgres" in (proc.info["name"] or "") and "-D" in cmdline:
            data_dir = (
                cmdline[cmdline.index("-D") + 1] if cmdline.index("-D") + 1 < len(cmdline) else ""
            )
            if socket_dir and (socket_dir in data_dir or data_dir in socket_dir):
                return int(proc.pid)
    return None


def scenario_key(upstream: str, stream: bool, concurrency: int) -> str:
    return f"{upstream}/{'stream' if stream else 'json'}/c{concurrency}"


def scenarios() -> Iterator[tuple[str, bool, int]]:
    for upstream in UPSTREAMS:
        for stream in (False, True):
            for concurrency in CONCURRENCIES:
                yield upstream, stream, concurrency


async def preflight(sessions: dict[str, Any], targets: dict[str, Target]) -> None:
    """One request per target, upstream and mode; stop with the answer if anything is off."""
    for target in targets.values():
        for upstream in UPSTREAMS:
            for stream in (False, True):
                outcome = await one_request(
                    sessions[target.name],
                    target.url(upstream),
                    target.body(upstream, stream),
                    {"Content-Type": "application/json", **target.headers},
                    stream,
                )
                if not outcome.ok:
                    raise RuntimeError(
                        f"preflight failed: {target.name} {upstream} stream={stream}: "
                        f"{outcome.error}: {outcome.example!r}"
                    )


async def drive(
    targets: dict[str, Target],
    monitored: Monitored,
    *,
    seconds: float,
    rounds: int,
    ramp: float,
    warmup: dict[str, float],
    min_completed: Any,
    client: str = "h1",
) -> dict[str, dict[str, Any]]:
    import aiohttp

    def session() -> Any:
        if client == "h1":
            return LeanSession()
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=300),
            timeout=aiohttp.ClientTimeout(total=60),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    sessions = {name: session() for name in targets}
    results: dict[str, dict[str, Any]] = {}
    try:
        await preflight(sessions, targets)
        # Warm every target up before anything is measured (LiteLLM gets markedly faster
        # over its first thousand requests or so: caches and lazy imports).
        for name in TARGETS:
            for stream in (False, True):
                seconds_warm = warmup[name] / (1 if not stream else 2)
                await run_load(sessions[name], targets[name], "instant", stream, 16, seconds_warm)
        log("warm-up done")
        order = list(TARGETS)
        for upstream, stream, concurrency in scenarios():
            key = scenario_key(upstream, stream, concurrency)
            merged = {name: CellSamples() for name in TARGETS}
            for r in range(rounds):
                # Rotate who goes first, so slow drift is shared out evenly.
                turn = order[r % len(order) :] + order[: r % len(order)]
                for name in turn:
                    monitored.refresh()
                    gc.collect()
                    gc.disable()
                    try:
                        samples = await run_load(
                            sessions[name],
                            targets[name],
                            upstream,
                            stream,
                            concurrency,
                            seconds / rounds,
                            ramp=ramp,
                            snapshot=monitored.snapshot,
                            min_completed=min_completed(concurrency) // rounds,
                            max_seconds=4 * seconds / rounds,
                        )
                    finally:
                        gc.enable()
                    merged[name].merge(samples)
            results[key] = {name: summarise(merged[name]) for name in TARGETS}
            line = "  ".join(
                f"{name}: {results[key][name]['rps']:6.0f}/s p50 "
                f"{_fmt(results[key][name]['p50_ms'])} p99 {_fmt(results[key][name]['p99_ms'])}"
                for name in TARGETS
            )
            foreign = max(results[key][name]["foreign_cores_busy"] for name in TARGETS)
            log(f"{key:<19} {line}  (others' load up to {foreign:.2f} cores)")
    finally:
        for session in sessions.values():
            await session.close()
    return results


def ingest_lag(wait: float = 60.0) -> dict[str, Any]:
    """How far the usage ingest is behind when the load stops, and how long it takes to
    catch up (the events are what the ledger is built from)."""
    import redis

    from billing.credit import USAGE_GROUP, USAGE_STREAM

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    out: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        while True:
            group = next(
                (g for g in client.xinfo_groups(USAGE_STREAM) if g["name"] == USAGE_GROUP.encode()),
                None,
            )
            if group is None:
                return {"error": "no ingest group"}
            behind = int(group.get("lag") or 0) + int(group.get("pending") or 0)
            out.setdefault("lag_at_end", behind)
            if behind == 0 or time.monotonic() - t0 > wait:
                out["drain_seconds"] = round(time.monotonic() - t0, 1)
                out["lag_after_wait"] = behind
                return out
            time.sleep(0.5)
    except Exception as exc:  # reporting only
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    finally:
        client.close()


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def compare(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, cells in results.items():
        d, s, lt = cells["direct"], cells["switchyard"], cells["litellm"]
        out[key] = {
            "added_p50_ms": _sub(s["p50_ms"], d["p50_ms"]),
            "added_p99_ms": _sub(s["p99_ms"], d["p99_ms"]),
            "litellm_added_p50_ms": _sub(lt["p50_ms"], d["p50_ms"]),
            "litellm_added_p99_ms": _sub(lt["p99_ms"], d["p99_ms"]),
            "sy_over_direct_rps": _ratio(s["rps"], d["rps"]),
            "sy_over_litellm_rps": _ratio(s["rps"], lt["rps"]),
            "added_ttft_p50_ms": _sub(s["ttft_p50_ms"], d["ttft_p50_ms"]),
            "added_ttft_p99_ms": _sub(s["ttft_p99_ms"], d["ttft_p99_ms"]),
            "gateway_cpu_ms_per_request": s["cpu_ms_per_request"].get("switchyard"),
            "litellm_cpu_ms_per_request": lt["cpu_ms_per_request"].get("litellm"),
        }
    return out


def evaluate(
    results: dict[str, dict[str, Any]], comparison: dict[str, dict[str, Any]], rss_mb: float
) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, op: str) -> None:
        ok = value is not None and (
            value <= limit if op == "<=" else value < limit if op == "<" else value >= limit
        )
        checks.append({"target": name, "value": value, "limit": f"{op} {limit}", "pass": ok})

    c1 = comparison["instant/json/c1"]
    check(
        "added latency p50, c=1, non-streaming (ms)", c1["added_p50_ms"], TARGET_ADDED_P50_MS, "<="
    )
    check(
        "added latency p99, c=1, non-streaming (ms)", c1["added_p99_ms"], TARGET_ADDED_P99_MS, "<="
    )
    for c in (1, 16, 64):
        check(
            f"gateway CPU per non-streamed request, c={c} (ms)",
            comparison[f"instant/json/c{c}"]["gateway_cpu_ms_per_request"],
            TARGET_CPU_MS,
            "<=",
        )
    for c in (16, 64):
        check(
            f"throughput vs LiteLLM, instant upstream, c={c} (x)",
            comparison[f"instant/json/c{c}"]["sy_over_litellm_rps"],
            TARGET_VS_LITELLM,
            ">=",
        )
    check(
        "p99 latency, instant upstream, c=64 (ms)",
        results["instant/json/c64"]["switchyard"]["p99_ms"],
        TARGET_P99_C64_MS,
        "<",
    )
    for c, limit in TARGET_DELAY_RATIO.items():
        check(
            f"throughput vs direct, 50 ms upstream, c={c} (x)",
            comparison[f"delay50/json/c{c}"]["sy_over_direct_rps"],
            limit,
            ">=",
        )
    s1 = comparison["instant/stream/c1"]
    check(
        "streaming added TTFT p50, c=1 (ms)", s1["added_ttft_p50_ms"], TARGET_STREAM_TTFT_MS, "<="
    )
    check(
        "streaming whole 20-chunk stream added p50, c=1 (ms)",
        s1["added_p50_ms"],
        TARGET_STREAM_WHOLE_MS,
        "<=",
    )
    check("gateway RSS after load (MB)", rss_mb, TARGET_RSS_MB, "<=")
    return checks


def render(
    results: dict[str, dict[str, Any]],
    comparison: dict[str, dict[str, Any]],
    checks: list[dict[str, Any]],
    memory: dict[str, float],
) -> str:
    lines = []
    lines.append(
        "Per cell: throughput (req/s), latency (ms; streams: whole stream), time to first "
        "chunk (ms), CPU ms per request"
    )
    head = (
        f"{'scenario':<19} {'target':<10} {'req/s':>7} {'p50':>7} {'p99':>7} {'max':>7} "
        f"{'ttft50':>7} {'ttft99':>7} {'cpu':>6} {'redis':>6} {'pg+ing':>6} {'others':>6} "
        f"{'n':>6} {'err':>4}"
    )
    lines += [head, "-" * len(head)]
    for key, cells in results.items():
        upstream = key.split("/")[0]
        for name in TARGETS:
            c = cells[name]
            cpu = c["cpu_ms_per_request"]
            serving = cpu.get({"direct": f"upstream-{upstream}"}.get(name, name))
            redis = cpu.get("redis") if name == "switchyard" else None
            metering = (
                (cpu.get("postgres") or 0) + (cpu.get("ingest") or 0)
                if name == "switchyard"
                else None
            )
            err = sum(c["errors"].values())
            lines.append(
                f"{key:<19} {name:<10} {c['rps']:>7.0f} {_fmt(c['p50_ms']):>7} "
                f"{_fmt(c['p99_ms']):>7} {_fmt(c['max_ms']):>7} {_fmt(c['ttft_p50_ms']):>7} "
                f"{_fmt(c['ttft_p99_ms']):>7} {_fmt(serving, 3):>6} {_fmt(redis, 3):>6} "
                f"{_fmt(metering, 3):>6} {c['foreign_cores_busy']:>6.2f} "
                f"{c['requests_ok']:>6} {err:>4}"
            )
    lines.append(
        "  cpu: the serving process (direct: the fake upstream itself; switchyard: the uvicorn "
        "worker; litellm: its proxy). redis, pg+ing: Switchyard's Redis and its metering "
        "(usage ingest + PostgreSQL). others: cores busy with work that is not this "
        "benchmark's (other jobs on the machine) during the cell."
    )
    errors = {
        f"{key} {name}": (cells[name]["errors"], cells[name]["error_examples"])
        for key, cells in results.items()
        for name in TARGETS
        if cells[name]["errors"]
    }
    if errors:
        lines.append("")
        lines.append("Errors")
        for where, (counts, examples) in errors.items():
            for kind, count in counts.items():
                lines.append(f"  {where}: {count} x {kind}: {examples.get(kind, '')[:160]!r}")
    lines.append("")
    lines.append("Switchyard against the upstream directly and against LiteLLM")
    head = (
        f"{'scenario':<19} {'+p50':>7} {'+p99':>7} {'+ttft50':>8} {'SY/dir':>7} {'SY/LL':>7} "
        f"{'SYcpu':>7} {'LLcpu':>7} {'LL+p50':>8} {'LL+p99':>8}"
    )
    lines += [head, "-" * len(head)]
    for key, c in comparison.items():
        lines.append(
            f"{key:<19} {_fmt(c['added_p50_ms']):>7} {_fmt(c['added_p99_ms']):>7} "
            f"{_fmt(c['added_ttft_p50_ms']):>8} {_fmt(c['sy_over_direct_rps']):>7} "
            f"{_fmt(c['sy_over_litellm_rps'], 1):>7} {_fmt(c['gateway_cpu_ms_per_request'], 3):>7} "
            f"{_fmt(c['litellm_cpu_ms_per_request'], 3):>7} {_fmt(c['litellm_added_p50_ms']):>8} "
            f"{_fmt(c['litellm_added_p99_ms']):>8}"
        )
    lines.append(
        "  +p50/+p99: Switchyard minus direct (ms; streams: the whole stream). +ttft50: the "
        "same for the first chunk. SY/dir, SY/LL: throughput ratios. SYcpu, LLcpu: CPU ms "
        "per request of the gateway process. LL+p50/p99: LiteLLM minus direct."
    )
    lines.append("")
    lines.append(
        "Memory after load (RSS, MB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items())
    )
    lines.append("")
    lines.append("Targets")
    for c in checks:
        value = c["value"]
        lines.append(
            f"  {'PASS' if c['pass'] else 'MISS'}  {c['target']:<55} "
            f"{_fmt(value, 3):>9}  (target {c['limit']})"
        )
    passed = sum(c["pass"] for c in checks)
    lines.append(f"  {passed} of {len(checks)} targets met")
    lines += ["", *machine_yardstick(comparison)]
    return "\n".join(lines)


def machine_yardstick(comparison: dict[str, dict[str, Any]]) -> list[str]:
    """How fast this machine is next to the issue's, and the gateway's CPU target scaled by
    it: a yardstick for slower or busier machines, not a PASS (the targets are absolute)."""
    lines = []
    for key in ("instant/json/c1", "instant/json/c16", "instant/json/c64"):
        c = comparison.get(key)
        if not c or not c["litellm_cpu_ms_per_request"] or c["gateway_cpu_ms_per_request"] is None:
            continue
        litellm, gateway = c["litellm_cpu_ms_per_request"], c["gateway_cpu_ms_per_request"]
        scaled, factor = gateway / litellm * ISSUE_LITELLM_CPU_MS, litellm / ISSUE_LITELLM_CPU_MS
        lines.append(
            f"  {key}: LiteLLM {litellm:.1f} ms CPU per request ({factor:.1f}x "
            f"the issue's machine); gateway/LiteLLM CPU {gateway / litellm:.4f} "
            f"(target {TARGET_CPU_MS / ISSUE_LITELLM_CPU_MS:.4f}), i.e. {scaled:.2f} ms there"
        )
    if lines:
        lines.insert(
            0, "Yardstick (this machine against the issue's, by LiteLLM's CPU per request)"
        )
    return lines


def versions(bench_python: Path) -> dict[str, str]:
    import aiohttp
    import uvicorn

    out = {
        "python": platform.python_version(),
        "uvicorn": uvicorn.__version__,
        "aiohttp": aiohttp.__version__,
        "cpus": str(os.cpu_count()),
        "machine": platform.machine(),
    }
    with contextlib.suppress(Exception):
        out["litellm"] = subprocess.run(
            [
                str(bench_python),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short cells (~2 minutes in all)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per cell")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per scenario")
    parser.add_argument(
        "--no-ingest",
        action="store_true",
        help="diagnosis only: no usage ingest loop beside the gateway (events pile up in Redis)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before the load, wait up to this long for other work on the machine to stop "
        "(the machine is shared; its load shows in the 'others' column either way)",
    )
    parser.add_argument(
        "--client",
        choices=("h1", "aiohttp"),
        default="h1",
        help="the load generator's HTTP client (see LeanSession); aiohttp: the one used up "
        "to the fourth session, which costs the shared cores more per request",
    )
    args = parser.parse_args(argv)
    seconds = args.seconds or (1.2 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 2)
    ramp = 0.3 if args.quick else 0.5  # unmeasured start of every cell
    # Before anything is measured, per target (non-streaming; half as long streaming).
    warmup = (
        {"direct": 1.0, "switchyard": 1.5, "litellm": 4.0}
        if args.quick
        else {"direct": 2.0, "switchyard": 3.0, "litellm": 10.0}
    )

    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        print(
            "run me under devenv: .venv/bin/python -m marketplace.devenv --data-dir var/bench "
            "exec -- .venv/bin/python -m bench.gateway_bench",
            file=sys.stderr,
        )
        return 2

    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    run_dir = RUN_DIR / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    t_setup = time.monotonic()
    bench_python = ensure_bench_venv()

    from marketplace.devenv import free_port
    from tests.support.upstream import UpstreamProcess

    procs: list[Proc] = []
    upstream_procs: dict[str, UpstreamProcess] = {}
    try:
        for name, delay in (("instant", 0.0), ("delay50", 50.0)):
            upstream_procs[name] = UpstreamProcess(delay_ms=delay).start()
        upstream_urls = {name: up.url for name, up in upstream_procs.items()}
        log(f"upstreams: {upstream_urls}")

        # LiteLLM imports for a long while: start it first, seed while it boots.
        litellm_port = free_port()
        litellm_key = "sk-" + secrets.token_hex(32)
        litellm = start_litellm(bench_python, litellm_port, upstream_urls, run_dir, litellm_key)
        procs.append(litellm)

        seeded = seed(upstream_urls, stamp.replace("-", "t"))
        log(f"seeded: models {seeded.models}")
        ingest = None if args.no_ingest else start_ingest(run_dir)
        if ingest is not None:
            procs.append(ingest)
        gateway_port = free_port()
        gateway = start_gateway(gateway_port, run_dir)
        procs.append(gateway)
        wait_http(f"http://127.0.0.1:{gateway_port}/healthz", gateway, 60, ok=(200, 404))
        wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", litellm, 240)
        log(
            f"gateway on :{gateway_port} (pid {gateway.pid}), "
            f"litellm on :{litellm_port} (pid {litellm.pid}); "
            f"setup {time.monotonic() - t_setup:.0f}s"
        )

        gateway_base = f"http://127.0.0.1:{gateway_port}"
        litellm_base = f"http://127.0.0.1:{litellm_port}"
        targets = {
            "direct": Target("direct", upstream_urls, {n: "fake-small" for n in UPSTREAMS}, {}),
            "switchyard": Target(
                "switchyard",
                {n: gateway_base for n in UPSTREAMS},
                seeded.models,
                {"Authorization": f"Bearer {seeded.key}"},
            ),
            "litellm": Target(
                "litellm",
                {n: litellm_base for n in UPSTREAMS},
                {n: f"bench-{n}" for n in UPSTREAMS},
                {"Authorization": f"Bearer {litellm_key}"},
            ),
        }

        roots = {
            "switchyard": gateway.pid,
            "litellm": litellm.pid,
            **({"ingest": ingest.pid} if ingest is not None else {}),
            **{f"upstream-{n}": up.pid for n, up in upstream_procs.items() if up.pid},
        }
        for name, finder in (("redis", find_redis_pid), ("postgres", find_postgres_pid)):
            pid = finder()
            if pid is None:
                log(f"cannot find the {name} process: its CPU is not reported")
            else:
                roots[name] = pid
        monitored = Monitored(roots)
        monitored.refresh()
        if args.wait_quiet > 0:
            wait_for_quiet(monitored, args.wait_quiet)
        memory_before = {
            "switchyard": monitored.rss_mb("switchyard"),
            "litellm": monitored.rss_mb("litellm"),
        }
        t_load = time.monotonic()
        results = asyncio_run(
            drive(
                targets,
                monitored,
                seconds=seconds,
                rounds=rounds,
                ramp=ramp,
                warmup=warmup,
                min_completed=(lambda c: max(2 * c, 10))
                if args.quick
                else (lambda c: max(4 * c, 40)),
                client=args.client,
            )
        )
        load_seconds = time.monotonic() - t_load
        memory = {
            "switchyard": monitored.rss_mb("switchyard"),
            "litellm": monitored.rss_mb("litellm"),
        }
        monitored.refresh()
        cpu_totals = monitored.snapshot()
        metering = ingest_lag() if ingest is not None else {"ingest": "off (--no-ingest)"}
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                proc.stop()
        for up in upstream_procs.values():
            with contextlib.suppress(Exception):
                up.stop()

    ingest_totals: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        for line in reversed(ingest.log_path.read_text().splitlines()):  # type: ignore
            if line.startswith("{"):
                ingest_totals = json.loads(line)
                break

    comparison = compare(results)
    checks = evaluate(results, comparison, memory["switchyard"])
    report = render(results, comparison, checks, memory)
    print()
    print(report)
    print(
        f"\nusage metering: {ingest_totals.get('recorded', '?')} usage events recorded in "
        f"PostgreSQL by the ingest loop; unprocessed when the load stopped: "
        f"{metering.get('lag_at_end', '?')}, caught up {metering.get('drain_seconds', '?')} s "
        f"later. Load phase {load_seconds:.0f} s, whole run "
        f"{(datetime.now(UTC) - started).total_seconds():.0f} s."
    )

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS_DIR / f"gateway-{stamp}.json"
    out_path.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "mode": "quick" if args.quick else "full",
                "usage_ingest": not args.no_ingest,
                "client": args.client,
                "seconds_per_cell": seconds,
                "rounds": rounds,
                "ramp_seconds": ramp,
                "warmup_seconds": warmup,
                "prompt_words": len(WORDS),
                "max_tokens": MAX_TOKENS,
                "versions": versions(bench_python),
                "cells": results,
                "comparison": comparison,
                "targets": checks,
                "memory_mb": {"before_load": memory_before, "after_load": memory},
                "cpu_seconds_total": cpu_totals,
                "ingest": ingest_totals,
                "metering": metering,
                "load_seconds": load_seconds,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out_path.relative_to(ROOT)}")
    return 0


def asyncio_run(coro: Any) -> Any:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


if __name__ == "__main__":
    raise SystemExit(main())
