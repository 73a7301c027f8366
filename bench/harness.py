"""Shared pieces of the chaos, soak and replica benchmarks (not a benchmark itself).

Processes on loopback (gateway replicas, fake upstreams, the usage ingest), a tagged set of
endpoints and customers created through the project's services, and a client that sends
one chat request and tells what it saw: the request id, the cost it was told, whether the
answer or stream was complete. Everything here runs under ``marketplace.devenv exec``
(``DATABASE_URL`` and ``REDIS_URL`` set).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OUTBOUND_ALLOWED_NETWORKS", "127.0.0.0/8")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
RESULTS_DIR = ROOT / "bench" / "results"
RUN_DIR = ROOT / "var" / "bench-run"

PROMPT = " ".join(f"word{i}" for i in range(20))  # the fake upstream echoes 20 tokens
MAX_TOKENS = 20


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def require_devenv(module: str) -> None:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per control call
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        raise SystemExit(
            "run me under devenv: .venv/bin/python -m marketplace.devenv --data-dir var/bench "
            f"exec -- .venv/bin/python -m {module}"
        )


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A child process that can be killed (-9) and started again with the same command."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    port: int | None = None
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        handle = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT
        )
        handle.close()
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def wait_ready(self, timeout: float = 180.0) -> None:
        """For HTTP servers: until ``/healthz`` answers."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited early:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                url = f"http://127.0.0.1:{self.port}/healthz"
                if httpx.get(url, timeout=2.0, trust_env=False).status_code:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout}s")


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING", **extra}


def gateway(port: int, run_dir: Path, name: str = "gateway", **env: str) -> Proc:
    """One uvicorn worker serving marketplace.asgi, as in production (uvloop, httptools)."""
    cmd = [str(PYTHON), "-m", "uvicorn", "marketplace.asgi:application"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"]
    cmd += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
    cmd += ["--no-proxy-headers"]  # as docker-compose.yml runs it
    return Proc(name, cmd, run_dir / f"{name}.log", child_env(**env), port=port)


def ingest_loop(run_dir: Path) -> Proc:
    """The Celery task's loop without Celery (``bench.ingest_loop``)."""
    return Proc(
        "ingest", [str(PYTHON), "-m", "bench.ingest_loop"], run_dir / "ingest.log", child_env()
    )


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------- seeding


@dataclass
class Customer:
    organization_id: int
    keys: list[str]
    key_ids: list[int]
    credit_nanos: int


def seed(
    upstream_urls: list[str], tag: str, credits_usd: list[str], keys_per_customer: int = 1
) -> list[Customer]:
    """Endpoints tagged ``tag`` (one vendor each, so ``tag:<tag>`` falls back across them)
    and customers with the given credit, created through the services."""
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from billing.money import usd_to_nanos
    from billing.services import credit_grant
    from marketplace.services import api_key_create, organization_create
    from vendors.services import endpoint_approve, endpoint_create, vendor_approve, vendor_create

    call_command("migrate", interactive=False, verbosity=0)
    for i, url in enumerate(upstream_urls):
        vendor = vendor_approve(vendor=vendor_create(name=f"{tag} v{i}", slug=f"{tag}-v{i}"))
        endpoint = endpoint_create(
            vendor=vendor,
            slug="chat",
            base_url=f"{url}/v1",
            upstream_model="fake-small",
            price_input=usd_to_nanos("0.1"),
            price_output=usd_to_nanos("0.2"),
            capacity=10_000,
            context_length=8192,
            tags=(tag,),
        )
        endpoint_approve(endpoint=endpoint)
    customers = []
    for i, credit in enumerate(credits_usd):
        org = organization_create(name=f"{tag} customer {i}", slug=f"{tag}-c{i}")
        amount = usd_to_nanos(credit)
        credit_grant(organization=org, amount=amount, reason="benchmark credit")
        created = [
            api_key_create(organization=org, name=f"bench {k}") for k in range(keys_per_customer)
        ]
        keys, key_ids = [c.plaintext for c in created], [c.api_key.pk for c in created]
        customers.append(Customer(org.pk, keys, key_ids, amount))
    connection.close()
    return customers


# --------------------------------------------------------------------------- the client


@dataclass
class Seen:
    """What the client saw of one HTTP request."""

    begin_ms: int
    end_ms: int = 0
    status: int = 0
    request_id: str = ""
    outcome: str = "broken"  # ok | partial | refused | broken
    cost: int | None = None  # nano-USD the answer said it cost
    code: str = ""  # the error code, or the exception's name
    replayed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def chat_body(tag: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": f"tag:{tag}",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def chat(session: Any, url: str, key: str, body: bytes, stream: bool, **headers: str) -> Seen:
    """POST one chat completion; never raises (a failure is what it saw)."""
    import orjson

    seen = Seen(begin_ms=time.time_ns() // 1_000_000)
    try:
        async with session.post(
            url,
            data=body,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                **headers,
            },
        ) as resp:
            seen.status = resp.status
            seen.request_id = resp.headers.get("x-request-id", "")
            seen.replayed = resp.headers.get("idempotent-replayed") == "true"
            if resp.status != 200:
                data = await resp.read()
                seen.outcome = "refused"
                with contextlib.suppress(Exception):
                    seen.code = orjson.loads(data)["error"]["code"]
            elif not stream:
                data = await resp.read()
                answer = orjson.loads(data)
                seen.cost = int(answer["usage"]["cost_nanos"])
                seen.outcome = "ok"
            else:
                done = False
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    if b'"cost_nanos"' in data:
                        seen.cost = int(orjson.loads(data)["usage"]["cost_nanos"])
                    elif b'"stream_interrupted"' in data:
                        seen.outcome = "partial"
                        seen.code = "stream_interrupted"
                if done and seen.cost is not None:
                    seen.outcome = "ok"
                elif seen.outcome != "partial":
                    seen.code = "no [DONE]"
    except Exception as exc:
        seen.outcome = "broken" if seen.outcome != "partial" else "partial"
        seen.code = seen.code or type(exc).__name__
    seen.end_ms = time.time_ns() // 1_000_000
    return seen


def least_squares_slope(points: list[tuple[float, float]]) -> float:
    """Slope of y over x by ordinary least squares (0 with fewer than two points)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx
