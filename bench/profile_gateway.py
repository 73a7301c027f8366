"""Profile Switchyard's gateway under load: where does the CPU of one request go?

    .venv/bin/python -m marketplace.devenv --data-dir var/bench exec -- \\
        .venv/bin/python -m bench.profile_gateway [--mode py-spy|cprofile|both|gc|callgrind]
        [--concurrency 16] [--seconds 8] [--stream] [--top 40]

Starts the instant fake upstream, seeds a customer/key/endpoint through the services (as
``bench.gateway_bench`` does), starts the gateway as one uvicorn worker and drives it with
the aiohttp load generator (default: concurrency 16, non-streaming, the instant upstream).
After a warm-up it measures the gateway's CPU time per request from /proc and profiles:

* ``py-spy`` (from var/bench-venv): samples the unmodified gateway process at 250 Hz; the
  share of samples per function times the measured CPU per request gives microseconds
  per request. Time spent in C (syscalls, orjson, the parsers) lands on the Python frame
  that called it.
* ``cprofile``: runs the gateway in a child with cProfile switched on only for the
  measured window (SIGUSR1 / SIGUSR2); gives exact call counts per request, but inflates
  small-function costs (tracing overhead), so read its times relative to each other.
* ``gc``: garbage-collector pauses and latency, as is and with ``gc.freeze()``.
* ``callgrind``: machine instructions per request, counted by valgrind in the measured
  window only; repeatable on a busy machine, for an A/B of two commits (``callgrind_run``).

Prints the top functions by self time and by inclusive time (project code), in
microseconds per request, and writes the raw data under var/bench-run/<stamp>/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pstats
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OUTBOUND_ALLOWED_NETWORKS", "127.0.0.0/8")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

from bench.gateway_bench import (
    PROJECT_PYTHON,
    ROOT,
    RUN_DIR,
    CellSamples,
    Proc,
    Target,
    asyncio_run,
    ensure_bench_venv,
    log,
    pct,
    run_load,
    seed,
    start_gateway,
    start_ingest,
    wait_http,
)

PROJECT_PREFIXES = ("routing/", "billing/", "marketplace/", "vendors/")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def redis_pid() -> int | None:
    """The redis-server behind REDIS_URL (started by devenv), found by its port."""
    import psutil

    port = os.environ.get("REDIS_URL", "").rsplit(":", 1)[-1].split("/")[0]
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "redis-server" in (proc.info["name"] or "") and f":{port}" in cmdline:
            return int(proc.pid)
    return None


def pin(pid: int | None, cpus: set[int]) -> None:
    if pid is not None:
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError as exc:
            log(f"could not pin {pid}: {exc}")


# --------------------------------------------------------------------------- cProfile child


def serve(port: int, out: Path, what: str, gc_freeze: bool) -> int:
    """Run the gateway in this process; SIGUSR1 starts measuring, SIGUSR2 stops and dumps.

    ``what`` = "cprofile": cProfile over the window. "gc": the garbage collector's pauses
    (gc.callbacks) over the window. ``gc_freeze``: call gc.freeze() once the app is loaded
    (the experiment behind a proposed fix; the product code is not changed).
    """
    import collections
    import cProfile
    import gc
    import json

    import uvicorn

    profiler = cProfile.Profile()
    pauses: list[tuple[int, float, int]] = []  # generation, seconds, collected
    started: dict[str, float] = {}
    measuring = False

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if not measuring:
            return
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses.append(
                (info["generation"], time.perf_counter() - started.pop("t"), info["collected"])
            )

    gc.callbacks.append(on_gc)

    def start(signum: int, frame: Any) -> None:
        nonlocal measuring
        measuring = True
        if what == "cprofile":
            profiler.enable()

    def stop(signum: int, frame: Any) -> None:
        nonlocal measuring
        measuring = False
        if what == "cprofile":
            profiler.disable()
            profiler.dump_stats(str(out))
        else:
            out.write_text(
                json.dumps(
                    {
                        "pauses": pauses,
                        "counts": gc.get_count(),
                        "thresholds": gc.get_threshold(),
                        "frozen": gc.get_freeze_count(),
                        # What a full collection has to walk: the oldest generation by type
                        # and by the module that defined the type.
                        "imported_since_start": sorted(
                            {name.split(".")[0] for name in set(sys.modules) - loaded}
                        ),
                        "gen2_objects": len(oldest := gc.get_objects(2)),
                        "gen2_top_types": collections.Counter(
                            f"{type(o).__module__}.{type(o).__qualname__}" for o in oldest
                        ).most_common(25),
                    }
                )
            )
        Path(str(out) + ".done").write_text("ok\n")

    if gc_freeze:
        import marketplace.asgi  # noqa: F401  (load everything, then freeze it)

        gc.collect()
        gc.freeze()

    loaded = set(sys.modules)
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    config = uvicorn.Config(
        "marketplace.asgi:application",
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        proxy_headers=False,  # as docker-compose.yml runs it
    )
    uvicorn.Server(config).run()
    return 0


def start_instrumented_gateway(
    port: int, run_dir: Path, out: Path, what: str, gc_freeze: bool = False
) -> Proc:
    log_path = run_dir / f"gateway-{what}.log"
    handle = log_path.open("wb")
    popen = subprocess.Popen(
        [
            str(PROJECT_PYTHON),
            "-m",
            "bench.profile_gateway",
            "--serve",
            str(port),
            "--out",
            str(out),
            "--what",
            what,
            *(["--gc-freeze"] if gc_freeze else []),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    return Proc(f"switchyard-{what}", popen, log_path)


# --------------------------------------------------------------------------- reports


def _short(frame: str) -> str:
    """'func (path/to/file.py:12)' with site-packages and the project root cut off."""
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in frame:
            head, _, tail = frame.partition(marker)
            frame = head.split("(")[0] + "(" + tail
    return frame


# Where a sample's leaf frame lives -> the component it is charged to (first match wins).
# Markers are path prefixes (as py-spy prints them: relative to site-packages or the
# project) or bare names for frames without a file.
COMPONENTS = (
    (
        ("routing/router.py", "routing/scoring.py", "routing/policy.py", "numpy/"),
        "router: route() / plan_route (numpy)",
    ),
    (("redis/", "hiredis"), "redis-py client (reserve + settle scripts)"),
    (
        ("aiohttp/", "yarl/", "multidict/", "aiohappyeyeballs/"),
        "aiohttp client (the vendor call)",
    ),
    (("uvicorn/", "httptools/"), "uvicorn + httptools (the client's HTTP)"),
    (("prometheus_client/",), "prometheus_client metrics"),
    (("django/", "asgiref/"), "django (settings, asgiref)"),
    (
        ("routing/", "marketplace/", "billing/", "vendors/"),
        "gateway code (auth, validation, proxy, live, http)",
    ),
    (
        ("asyncio/", "concurrent/futures/", "threading.py", "Runner.run", "uvloop/"),
        "event loop (uvloop, asyncio tasks and futures)",
    ),
)


def component(leaf: str) -> str:
    path = leaf[leaf.rfind("(") + 1 :] if "(" in leaf else leaf
    for markers, name in COMPONENTS:
        for marker in markers:
            if path.startswith(marker) or f"/{marker}" in path or marker in leaf.split(" (")[0]:
                return name
    return "other (stdlib: uuid, json, datetime, weakref, ...)"


def pyspy_report(raw: Path, us_per_request: float, top: int) -> str:
    components: collections.Counter[str] = collections.Counter()
    self_samples: collections.Counter[str] = collections.Counter()
    self_lines: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        leaf = frames[-1]
        components[component(leaf)] += n
        self_lines[leaf] += n
        self_samples[_function(leaf)] += n
        for f in {_function(f) for f in frames}:
            inclusive[f] += n
    if not total:
        return "py-spy recorded no samples"
    out = [f"py-spy: {total} samples; gateway CPU {us_per_request:.0f} us per request"]
    out.append("\n  by component (self time of the leaf frame; C code counts for its caller)")
    for name, n in components.most_common():
        out.append(f"  {n / total * us_per_request:7.1f} us {n / total * 100:5.1f}%  {name}")
    out.append("\n  self time, by function (us per request, share of gateway CPU)")
    for f, n in self_samples.most_common(top):
        out.append(f"  {n / total * us_per_request:7.1f} us {n / total * 100:5.1f}%  {_short(f)}")
    out.append(f"\n  self time, by line (top {top // 2})")
    for f, n in self_lines.most_common(top // 2):
        out.append(f"  {n / total * us_per_request:7.1f} us {n / total * 100:5.1f}%  {_short(f)}")
    out.append("\n  inclusive time, project code (us per request)")
    shown = 0
    for f, n in inclusive.most_common():
        if not any(p in f for p in PROJECT_PREFIXES) or "site-packages" in f:
            continue
        out.append(f"  {n / total * us_per_request:7.1f} us {n / total * 100:5.1f}%  {_short(f)}")
        shown += 1
        if shown >= top:
            break
    out.append("\n  inclusive time, libraries (us per request)")
    shown = 0
    for f, n in inclusive.most_common():
        if "site-packages" not in f and "asyncio" not in f:
            continue
        out.append(f"  {n / total * us_per_request:7.1f} us {n / total * 100:5.1f}%  {_short(f)}")
        shown += 1
        if shown >= top // 2:
            break
    return "\n".join(out)


def _function(frame: str) -> str:
    """'func (file.py:12)' -> 'func (file.py)': aggregate a function's lines."""
    if frame.endswith(")") and ":" in frame:
        head, _, tail = frame.rpartition(":")
        if tail[:-1].isdigit():
            return head + ")"
    return frame


def cprofile_report(path: Path, requests: int, top: int) -> str:
    stats = pstats.Stats(str(path))
    rows = []
    for (filename, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = _short(f"{name} ({filename}:{line})")
        rows.append((where, nc, tt, ct))
    out = [f"cProfile: {requests} requests in the window (times inflated by tracing)"]
    out.append("\n  self time (us per request, calls per request)")
    for where, nc, tt, _ct in sorted(rows, key=lambda r: -r[2])[:top]:
        out.append(f"  {tt / requests * 1e6:7.1f} us {nc / requests:6.1f} calls  {where}")
    out.append("\n  inclusive time, project code (us per request, calls per request)")
    project = [r for r in rows if any(p in r[0] for p in PROJECT_PREFIXES)]
    for where, nc, _tt, ct in sorted(project, key=lambda r: -r[3])[:top]:
        out.append(f"  {ct / requests * 1e6:7.1f} us {nc / requests:6.1f} calls  {where}")
    return "\n".join(out)


def perf_report(
    pid: int, target: Target, args: argparse.Namespace, run_dir: Path, us_per_request: float
) -> str:
    """CPU by shared object (interpreter, kernel, numpy, uvloop, ...), from perf."""
    import shutil

    perf = shutil.which("perf")
    if perf is None:
        return "perf: not installed"
    data = run_dir / "perf.data"
    duration = max(1, int(args.seconds) - 1)

    def record() -> None:
        subprocess.run(
            [
                perf,
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "1999",
                "-p",
                str(pid),
                "-o",
                str(data),
                "--",
                "sleep",
                str(duration),
            ],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    measure(target, pid, args.concurrency, args.seconds, args.stream, record)
    report = subprocess.run(
        [perf, "report", "-i", str(data), "--sort", "dso", "--stdio"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    out = [f"perf (on-CPU samples only), CPU by library (us per request of {us_per_request:.0f})"]
    for line in report.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line:
            continue
        share, _, dso = line.partition("%")
        try:
            value = float(share)
        except ValueError:
            continue
        if value < 0.3:
            continue
        out.append(f"  {value / 100 * us_per_request:7.1f} us {value:5.1f}%  {dso.strip()}")
    return "\n".join(out)


def callgrind_run(run_dir: Path, target_for: Any, args: argparse.Namespace) -> str:
    """Instructions the gateway executes per request, counted by callgrind.

    Time per request moves by 15 % between runs of the same code on a shared virtual
    machine; the count of executed instructions does not (valgrind counts them, whatever
    else the machine does), so an A/B of a small change can be read from it. The gateway
    runs under ``valgrind --tool=callgrind`` with counting off through start-up and the
    warm-up, on for the measured window only (``callgrind_control -i``). Counting slows the
    gateway some fifty times: the window's request count, not its length, matters.
    """
    from marketplace.devenv import free_port

    out = run_dir / "callgrind.out"
    prefix = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}.%p",
    ]
    port = free_port()
    gateway = start_gateway(port, run_dir, prefix)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", gateway, 600, ok=(200, 404))
        target = target_for(port)
        measure(target, gateway.pid, args.concurrency, 10.0, args.stream)  # warm-up
        subprocess.run(["callgrind_control", "-i", "on", str(gateway.pid)], check=True)
        samples, cpu = measure(target, gateway.pid, args.concurrency, args.seconds, args.stream)
        subprocess.run(["callgrind_control", "-i", "off", str(gateway.pid)], check=True)
        subprocess.run(["callgrind_control", "-d", str(gateway.pid)], check=True)
    finally:
        gateway.stop()
    totals = []
    for dump in run_dir.glob("callgrind.out.*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                totals.append(int(line.split()[1]))
    instructions = max(totals, default=0)
    n = max(samples.total, 1)
    return (
        f"callgrind: {samples.total} requests at concurrency {args.concurrency} "
        f"({'streaming' if args.stream else 'non-streaming'}), errors {dict(samples.errors)}; "
        f"{instructions / n / 1e6:.3f} M instructions per request "
        f"(CPU under valgrind {cpu * 1e3:.1f} ms/request)"
    )


def gc_report(path: Path, samples: CellSamples, cpu: float, frozen: bool) -> str:
    import json

    data = json.loads(path.read_text())
    n = len(samples.latency)
    by_gen: dict[int, list[float]] = collections.defaultdict(list)
    for generation, seconds, _collected in data["pauses"]:
        by_gen[generation].append(seconds)
    label = "with gc.freeze() after start-up" if frozen else "as is"
    out = [
        f"GC {label}: {n} requests, {samples.completed_ok / samples.window:.0f} req/s, latency p50 "
        f"{pct(samples.latency, 50):.2f} ms p99 {pct(samples.latency, 99):.2f} ms p99.9 "
        f"{pct(samples.latency, 99.9):.2f} ms max {pct(samples.latency, 100):.2f} ms; "
        f"gateway CPU {cpu * 1e6:.0f} us/req; objects frozen: {data['frozen']}"
    ]
    for generation in sorted(by_gen):
        pauses = sorted(by_gen[generation])
        total = sum(pauses)
        out.append(
            f"  gen{generation}: {len(pauses)} collections "
            f"({len(pauses) / max(n, 1):.3f}/request), "
            f"median {pauses[len(pauses) // 2] * 1e3:.2f} ms, max {pauses[-1] * 1e3:.2f} ms, "
            f"{total / max(n, 1) * 1e6:.1f} us per request"
        )
    if "gen2_objects" in data:
        out.append(f"  oldest generation after the load: {data['gen2_objects']} objects, by type:")
        out.extend(f"    {count:8d}  {name}" for name, count in data["gen2_top_types"][:12])
        out.append(f"  packages imported after start-up: {', '.join(data['imported_since_start'])}")
    return "\n".join(out)


# --------------------------------------------------------------------------- driving


async def _load(target: Target, concurrency: int, seconds: float, stream: bool) -> CellSamples:
    import aiohttp

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=300),
        timeout=aiohttp.ClientTimeout(total=30),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    ) as session:
        return await run_load(session, target, "instant", stream, concurrency, seconds)


def measure(
    target: Target,
    gateway_pid: int,
    concurrency: int,
    seconds: float,
    stream: bool,
    during: Any = None,
) -> tuple[CellSamples, float]:
    """Run the load; call ``during()`` once it runs; return samples and CPU s/request."""

    async def run() -> tuple[CellSamples, float, float]:
        before = proc_cpu_seconds(gateway_pid)
        task = asyncio.ensure_future(_load(target, concurrency, seconds, stream))
        if during is not None:
            await asyncio.sleep(0.2)
            await asyncio.get_running_loop().run_in_executor(None, during)
        samples = await task
        after = proc_cpu_seconds(gateway_pid)
        return samples, before, after

    samples, before, after = asyncio_run(run())
    return samples, (after - before) / max(samples.total, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_gateway", description=__doc__)
    parser.add_argument(
        "--mode",
        choices=("py-spy", "cprofile", "both", "gc", "callgrind"),
        default="both",
        help="gc: garbage-collector pauses and latency, as is and with gc.freeze(); "
        "callgrind: machine instructions per request (valgrind), repeatable on a busy machine",
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--ingest", action="store_true", help="run the usage ingest loop too")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not give the gateway a CPU of its own (the rest share the other ones)",
    )
    parser.add_argument("--perf", action="store_true", help="also split CPU by library (perf)")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--what", default="cprofile", help=argparse.SUPPRESS)
    parser.add_argument("--gc-freeze", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve, args.out, args.what, args.gc_freeze)
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        print("run me under devenv (see the module docstring)", file=sys.stderr)
        return 2

    from marketplace.devenv import free_port
    from tests.support.upstream import UpstreamProcess

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = RUN_DIR / f"profile-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    bench_python = ensure_bench_venv() if args.mode in ("py-spy", "both") else None

    upstream = UpstreamProcess().start()
    procs: list[Proc] = []
    reports = []
    all_cpus = os.sched_getaffinity(0)
    pinning = not args.no_pin and len(all_cpus) >= 2
    gateway_cpus = {max(all_cpus)}
    other_cpus = all_cpus - gateway_cpus
    redis = redis_pid()
    if pinning:
        # Sampling profilers see a thread that is runnable but preempted as busy, on the
        # line it was preempted at: right after a loopback write that woke the receiver on
        # the same core. A core of its own for the gateway keeps that out of the profile.
        pin(os.getpid(), other_cpus)
        pin(upstream.pid, other_cpus)
        pin(redis, other_cpus)
        log(
            f"pinned: gateway -> CPU {sorted(gateway_cpus)}, load generator, upstream and "
            f"Redis -> CPU {sorted(other_cpus)}"
        )
    try:
        seeded = seed({"instant": upstream.url}, f"prof{stamp.replace('-', 't')}")
        if args.ingest:
            procs.append(start_ingest(run_dir))

        def target_for(port: int) -> Target:
            return Target(
                "switchyard",
                {"instant": f"http://127.0.0.1:{port}"},
                seeded.models,
                {"Authorization": f"Bearer {seeded.key}"},
            )

        if args.mode in ("py-spy", "both"):
            assert bench_python is not None
            port = free_port()
            gateway = start_gateway(port, run_dir)
            procs.append(gateway)
            wait_http(f"http://127.0.0.1:{port}/healthz", gateway, 60, ok=(200, 404))
            if pinning:
                pin(gateway.pid, gateway_cpus)
            target = target_for(port)
            measure(target, gateway.pid, args.concurrency, 2.0, args.stream)  # warm-up
            raw = run_dir / "py-spy.raw"
            duration = max(1, int(args.seconds) - 1)

            def record() -> None:
                subprocess.run(
                    [
                        str(bench_python.parent / "py-spy"),
                        "record",
                        "-p",
                        str(gateway.pid),
                        "-d",
                        str(duration),
                        "-r",
                        "250",
                        "-f",
                        "raw",
                        "-o",
                        str(raw),
                        "--nonblocking",
                    ],
                    check=False,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )

            # First the clean CPU per request (no sampler attached), then the sampled run.
            samples, cpu = measure(target, gateway.pid, args.concurrency, args.seconds, args.stream)
            log(
                f"py-spy run: {samples.completed_ok / samples.window:.0f} req/s, "
                f"p50 {pct(samples.latency, 50):.2f} ms, gateway CPU {cpu * 1e6:.0f} us/req, "
                f"errors {dict(samples.errors)}"
            )
            measure(target, gateway.pid, args.concurrency, args.seconds, args.stream, record)
            reports.append(pyspy_report(raw, cpu * 1e6, args.top))
            if args.perf:
                reports.append(perf_report(gateway.pid, target, args, run_dir, cpu * 1e6))
            gateway.stop()
            procs.remove(gateway)

        if args.mode in ("cprofile", "both"):
            port = free_port()
            out = run_dir / "gateway.pstats"
            gateway = start_instrumented_gateway(port, run_dir, out, "cprofile")
            procs.append(gateway)
            wait_http(f"http://127.0.0.1:{port}/healthz", gateway, 60, ok=(200, 404))
            if pinning:
                pin(gateway.pid, gateway_cpus)
            target = target_for(port)
            measure(target, gateway.pid, args.concurrency, 2.0, args.stream)  # warm-up
            gateway.popen.send_signal(signal.SIGUSR1)
            time.sleep(0.1)
            samples, cpu = measure(target, gateway.pid, args.concurrency, args.seconds, args.stream)
            gateway.popen.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not Path(str(out) + ".done").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            n = samples.total
            log(
                f"cProfile run: {samples.completed_ok / samples.window:.0f} req/s, "
                f"gateway CPU under cProfile "
                f"{cpu * 1e6:.0f} us/req, errors {dict(samples.errors)}"
            )
            reports.append(cprofile_report(out, n, args.top))
        if args.mode == "callgrind":
            reports.append(callgrind_run(run_dir, target_for, args))
        if args.mode == "gc":
            for freeze in (False, True):
                port = free_port()
                out = run_dir / f"gc-{'frozen' if freeze else 'default'}.json"
                gateway = start_instrumented_gateway(port, run_dir, out, "gc", freeze)
                procs.append(gateway)
                wait_http(f"http://127.0.0.1:{port}/healthz", gateway, 60, ok=(200, 404))
                if pinning:
                    pin(gateway.pid, gateway_cpus)
                target = target_for(port)
                measure(target, gateway.pid, args.concurrency, 2.0, args.stream)  # warm-up
                gateway.popen.send_signal(signal.SIGUSR1)
                time.sleep(0.1)
                samples, cpu = measure(
                    target, gateway.pid, args.concurrency, args.seconds, args.stream
                )
                gateway.popen.send_signal(signal.SIGUSR2)
                deadline = time.monotonic() + 30
                while not Path(str(out) + ".done").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                gateway.stop()
                procs.remove(gateway)
                reports.append(gc_report(out, samples, cpu, freeze))
    finally:
        for proc in reversed(procs):
            proc.stop()
        upstream.stop()
        if pinning:
            pin(redis, all_cpus)

    text = "\n\n".join(reports)
    (run_dir / "report.txt").write_text(text + "\n")
    print()
    print(text)
    print(f"\nraw data and report: {run_dir.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
