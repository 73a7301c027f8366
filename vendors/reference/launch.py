"""Start reference vendor servers as subprocesses (for tests, the dev runner and benchmarks).

    with start_reference_vendor("smollm2", api_key="s3cret") as vendor:
        httpx.post(f"{vendor.base_url}/chat/completions",
                   headers={"Authorization": "Bearer s3cret"},
                   json={"model": vendor.model, "messages": [...]})

Each server runs in its own process, as a real vendor's would: a model crash, a slow
request or a kill in a failure test never takes the caller down, and the caller's event
loop never competes with inference for the GIL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from vendors.reference.models import MODEL_NAMES, PROJECT_ROOT, ReferenceKind

# Not anchored at a line start: with --verbose, llama.cpp's log thread shares the file and
# may leave a partial line before ours. The newline proves the line was written whole.
READY_PATTERN: Final = re.compile(r"READY (http://\S+)\r?\n")
STOP_GRACE_SECONDS: Final = 10.0
LOG_TAIL_CHARS: Final = 4000


class ReferenceVendorError(RuntimeError):
    """A reference vendor server did not start; the message carries its log's tail."""


class ReferenceVendor:
    """A running reference vendor server process.

    ``base_url`` is the OpenAI base URL (``http://127.0.0.1:PORT/v1``), ``root_url`` the
    same without ``/v1`` (for ``/health``), and ``model`` the upstream model name to send.
    """

    def __init__(
        self,
        *,
        kind: ReferenceKind,
        root_url: str,
        model: str,
        api_key: str | None,
        process: subprocess.Popen[bytes],
        log_path: Path,
        owns_log: bool,
    ) -> None:
        self.kind = kind
        self.root_url = root_url
        self.base_url = f"{root_url}/v1"
        self.model = model
        self.api_key = api_key
        self.process = process
        self.log_path = log_path
        self._owns_log = owns_log

    def __repr__(self) -> str:
        return f"<ReferenceVendor {self.kind} {self.base_url} pid={self.process.pid}>"

    @property
    def headers(self) -> dict[str, str]:
        """Request headers that authenticate to this server (empty without an API key)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait up to 10 s, then SIGKILL. Safe to call twice."""
        _terminate(self.process)
        if self._owns_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_reference_vendor(
    kind: ReferenceKind,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    parallel: int = 2,
    ctx: int = 2048,
    log_path: Path | None = None,
    alias: str | None = None,
    verbose: bool = False,
    timeout: float = 60.0,
) -> ReferenceVendor:
    """Start a reference vendor server in a subprocess and wait until it answers.

    ``kind`` is ``"smollm2"`` or ``"gemma"`` (chat, llama.cpp) or ``"minilm"`` (embeddings).
    ``port=0`` lets the server bind a free port itself (no pick-then-bind race); the real
    address comes back on its READY line. ``parallel`` and ``ctx`` (total context shared
    by the slots) apply to chat models. The server's stdout and stderr go to ``log_path``
    (a temporary file, deleted on ``stop()``, when None). The server stops by itself if this
    process dies. Raises :class:`ReferenceVendorError` with the log's tail when the server
    exits early or is not ready within ``timeout`` seconds.
    """
    if kind not in MODEL_NAMES:
        raise ValueError(
            f"unknown reference vendor kind {kind!r}; use one of {sorted(MODEL_NAMES)}"
        )
    command = [sys.executable, "-m"]
    if kind == "minilm":
        command += ["vendors.reference.embeddings"]
    else:
        command += ["vendors.reference.llm", "--model", kind]
        command += ["--parallel", str(parallel), "--ctx", str(ctx)]
        if verbose:
            command.append("--verbose")
    command += ["--host", host, "--port", str(port), "--exit-with-parent"]
    if alias:
        command += ["--alias", alias]

    env = dict(os.environ)
    # The key travels in the environment, not argv, so `ps` does not show it.
    env.pop("REFERENCE_VENDOR_API_KEY", None)
    if api_key:
        env["REFERENCE_VENDOR_API_KEY"] = api_key
    # `-m vendors.reference...` must resolve to this checkout whatever the caller's cwd.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"

    owns_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"switchyard-{kind}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)

    with log_path.open("ab") as log:
        start_offset = log.tell()  # a reused log file may hold an older READY line
        process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=PROJECT_ROOT,
        )
    try:
        root_url = _wait_for_ready(process, log_path, start_offset, timeout, keep_log=not owns_log)
    except BaseException:
        _terminate(process)
        if owns_log:
            log_path.unlink(missing_ok=True)
        raise
    return ReferenceVendor(
        kind=kind,
        root_url=root_url,
        model=alias or MODEL_NAMES[kind],
        api_key=api_key,
        process=process,
        log_path=log_path,
        owns_log=owns_log,
    )


def _wait_for_ready(
    process: subprocess.Popen[bytes],
    log_path: Path,
    start_offset: int,
    timeout: float,
    *,
    keep_log: bool,
) -> str:
    """Return the root URL from the server's READY line, or raise with the log's tail."""
    # A temporary log is deleted when start-up fails, so only a kept one is worth naming.
    log_name = f"log {log_path}" if keep_log else "its log"
    deadline = time.monotonic() + timeout
    while True:
        output = _read_from(log_path, start_offset)
        match = READY_PATTERN.search(output)
        if match:
            return match.group(1)
        if process.poll() is not None:
            raise ReferenceVendorError(
                f"{_describe(process)} exited with status {process.returncode} before it was "
                f"ready; {log_name}:\n{output[-LOG_TAIL_CHARS:]}"
            )
        if time.monotonic() > deadline:
            raise ReferenceVendorError(
                f"{_describe(process)} was not ready within {timeout:.0f}s; {log_name}:\n"
                f"{output[-LOG_TAIL_CHARS:]}"
            )
        time.sleep(0.05)


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", errors="replace")


def _describe(process: subprocess.Popen[bytes]) -> str:
    args = process.args if isinstance(process.args, list) else [str(process.args)]
    return f"reference vendor `{' '.join(str(a) for a in args[1:])}` (pid {process.pid})"


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process, wait for a clean exit, SIGKILL it after the grace period."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
