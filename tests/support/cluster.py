"""Real processes for multi-replica and crash tests: gateway replicas and usage consumers.

Each child gets the test database (pytest-django's, so tests must use ``transactional_db``
to make their data visible) and the test Redis through ``DATABASE_URL`` / ``REDIS_URL``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
from django.conf import settings

from marketplace.devenv import ROOT, free_port, wait_for_port


def test_database_url() -> str:
    """A URL for the database the running test uses (pytest-django's test database)."""
    db = settings.DATABASES["default"]
    query = urlencode({k: v for k, v in (("host", db["HOST"]), ("port", db["PORT"])) if v})
    user = quote(str(db["USER"] or ""), safe="")
    password = quote(str(db["PASSWORD"] or ""), safe="")
    auth = f"{user}:{password}@" if user else ""
    return f"postgresql://{auth}/{db['NAME']}?{query}"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=test_database_url(),
        REDIS_URL=settings.REDIS_URL,
        OUTBOUND_ALLOWED_NETWORKS=",".join(settings.OUTBOUND_ALLOWED_NETWORKS),
        DJANGO_SETTINGS_MODULE="marketplace.settings",
        PYTHONUNBUFFERED="1",
        LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


@dataclass
class ChildProcess:
    args: list[str]
    env: dict[str, str]
    name: str
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))

    def start(self) -> ChildProcess:
        handle = self.log.open("ab")
        self.process = subprocess.Popen(
            self.args, env=self.env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye — a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class GatewayReplica(ChildProcess):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str, **kwargs: object) -> httpx.Client:
        return httpx.Client(  # type: ignore[arg-type]
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs
        )


def start_gateway(**env: str) -> GatewayReplica:
    """One uvicorn worker serving marketplace.asgi (the gateway beside Django)."""
    port = free_port()
    replica = GatewayReplica(
        args=[
            sys.executable,
            "-m",
            "uvicorn",
            "marketplace.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "5",
        ],
        env=child_env(**env),
        name=f"gateway-{port}",
        port=port,
    )
    replica.start()
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
    except TimeoutError:
        replica.stop()
        raise RuntimeError(f"gateway did not start:\n{replica.output()[-3000:]}") from None
    return replica


def start_ingest_consumer(name: str, **env: str) -> ChildProcess:
    return ChildProcess(
        args=[sys.executable, "manage.py", "ingest_usage", "--batch", "500", "--consumer", name],
        env=child_env(**env),
        name=name,
    ).start()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it is true; False after ``timeout`` (a test then fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
