"""A fault-injecting fake OpenAI upstream: a real HTTP server on loopback.

Switchyard's gateway talks to vendor upstreams over HTTP, so its error mapping, retries,
fallback and streaming relay can only be tested honestly against a server that really
speaks HTTP and really misbehaves (resets sockets, hangs before the first byte, cuts a
stream in the middle of a chunked body...). Mocking the HTTP client would hide exactly
the bugs we care about. This module provides that server, built on ``aiohttp.web``.

Endpoints (OpenAI shape)
------------------------
* ``POST /v1/chat/completions`` -- non-streaming, or ``stream: true`` as SSE.
  The answer echoes the words of the last user message (``"ok"`` if there are none),
  truncated to ``max_tokens``/``max_completion_tokens`` (default 16; ``finish_reason`` is
  ``"length"`` when truncated, else ``"stop"``). ``usage.prompt_tokens`` is the number of
  whitespace-separated words over all messages (min 1); ``completion_tokens`` is the number
  of words produced. Streaming sends exactly one ``chat.completion.chunk`` per word (the
  first carries ``role``, the last carries ``finish_reason``), then, if
  ``stream_options.include_usage`` is true, a chunk with ``choices: []`` and ``usage``, then
  ``data: [DONE]``. ``logprobs: true`` (+ optional ``top_logprobs``) adds per-token logprob
  objects whose ``logprob`` is the configured mean (default -0.1).
* ``POST /v1/embeddings`` -- deterministic unit vectors derived from each input
  (``dimensions`` honoured, default 8; ``encoding_format: "base64"`` supported because the
  official client asks for it by default).
* ``GET /v1/models`` and ``GET /health``.

Faults
------
Chosen per request with the ``X-Fault`` header and/or server-wide with a script (see the
control API). A spec is a comma-separated list of tokens, e.g. ``"delay:200,status:503"``:

=============================  ==========================================================
``status:<code>``              error with an OpenAI-style body. Retry-After via
                               ``status:429;retry_after=2`` or a separate ``retry_after=2``
                               token (also sends ``retry-after-ms``).
``delay:<ms>``                 wait before answering (no header is sent until then).
``ttfb-hang``                  never answer; ends when the client disconnects or the
                               server stops (the connection is then dropped).
``reset``                      drop the TCP connection with an RST, no response at all.
``malformed-json``             200 with a truncated, non-JSON body.
``wrong-shape``                200 with valid JSON lacking ``choices``/``usage``/``data``
                               (stream: chunks without ``choices``).
``cut-stream:<n>``             stream: send ``n`` data chunks then close without
                               ``[DONE]``; non-stream: send headers announcing the full
                               length and only the first ``n`` bytes, then close.
``invalid-sse``                garbage lines mixed into the SSE stream.
``trickle:<ms>``               pause ``ms`` between stream chunks (non-stream: between 8
                               slices of the body). Alias ``slow-stream-chunk-delay:<ms>``.
``oversize:<bytes>``           a valid-looking body of at least ``bytes`` bytes.
``none`` / ``ok`` / empty      no fault (useful inside scripts).
=============================  ==========================================================

Control API (never under ``/v1``, never faulted, never authenticated)
--------------------------------------------------------------------
* ``POST /_control/script`` ``{"faults": ["status:500", "none"], "path": "/v1/",
  "append": false}`` -- one entry per upcoming request whose path starts with ``path``
  (default ``/v1/``, so health probes do not eat entries); when exhausted, normal again.
  A script entry and an ``X-Fault`` header on the same request are combined.
* ``POST /_control/reset`` -- clear counters, script, recorded requests, and restore the
  startup delay / logprob mean.
* ``GET /_control/stats`` -- ``total``, ``by_path``, ``by_fault``, ``in_flight``,
  ``max_in_flight``, ``client_disconnects``, ``auth_failures``, ``script_remaining``,
  ``delay_ms``.
* ``GET /_control/requests`` -- the last N (default 100) requests: method, path, query,
  headers, parsed body, applied fault.
* ``POST /_control/delay`` ``{"ms": 50}`` -- base latency added to every ``/v1`` answer.
* ``POST /_control/config`` ``{"delay_ms": 50, "logprob_mean": -2.0}``.

Running it
----------
* In-process (tests): ``with FaultUpstream() as up: ...`` or ``fault_upstream()`` /
  ``start_fault_upstream()``; the server runs in a background thread with its own loop.
* In an existing event loop: ``await UpstreamServer(...).start()``.
* As a process: ``python -m tests.support.upstream --port N [--delay-ms 50] [--api-key K]``
  prints ``READY http://127.0.0.1:N`` once listening; ``UpstreamProcess`` wraps that.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import itertools
import math
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from aiohttp import web

try:  # orjson is a project dependency; the fallback only keeps the module importable.
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads: Callable[[bytes | str], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is installed in the project venv
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads

__all__ = [
    "DEFAULT_MODELS",
    "FaultPlan",
    "FaultSpecError",
    "FaultUpstream",
    "UpstreamProcess",
    "UpstreamServer",
    "UpstreamState",
    "build_app",
    "fault_upstream",
    "main",
    "parse_faults",
    "start_fault_upstream",
]

DEFAULT_MODELS: tuple[str, ...] = ("fake-small", "fake-embed")
DEFAULT_MAX_TOKENS = 16
DEFAULT_EMBEDDING_DIMS = 8
DEFAULT_LOGPROB_MEAN = -0.1
DEFAULT_RECORD_LIMIT = 100
DEFAULT_SCRIPT_PATH = "/v1/"
FAULT_HEADER = "X-Fault"

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_TRICKLE_SLICES = 8  # non-stream bodies are dribbled out in this many slices
_PAD_PIECE = 64 * 1024  # oversize bodies are written in pieces this big
_PAD_MARKER = "\x00PAD\x00"
_SSE_DONE = b"data: [DONE]\n\n"
# Lines a broken upstream might emit; each one trips a different kind of SSE parser bug.
_SSE_GARBAGE: tuple[bytes, ...] = (
    b"data: {this is not json\n\n",
    b"this line is not an SSE field at all\n\n",
    b'data: {"object": "chat.completion.chunk", "choices": "not-a-list"}\n\n',
    b"retry: banana\nevent: ???\n\n",
)


# --------------------------------------------------------------------------- faults


class FaultSpecError(ValueError):
    """A fault spec (header or script entry) that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Everything that should go wrong with one response (the parsed form of a spec)."""

    status: int | None = None
    retry_after: float | None = None
    delay_ms: float = 0.0
    hang: bool = False
    reset: bool = False
    malformed_json: bool = False
    wrong_shape: bool = False
    cut_stream: int | None = None
    invalid_sse: bool = False
    trickle_ms: float = 0.0
    oversize: int | None = None
    labels: tuple[str, ...] = ()

    def merged(self, other: FaultPlan) -> FaultPlan:
        """Combine two plans; ``other`` wins where both set the same scalar."""
        if not other.labels:
            return self
        if not self.labels:
            return other
        return FaultPlan(
            status=other.status if other.status is not None else self.status,
            retry_after=other.retry_after if other.retry_after is not None else self.retry_after,
            delay_ms=self.delay_ms + other.delay_ms,
            hang=self.hang or other.hang,
            reset=self.reset or other.reset,
            malformed_json=self.malformed_json or other.malformed_json,
            wrong_shape=self.wrong_shape or other.wrong_shape,
            cut_stream=other.cut_stream if other.cut_stream is not None else self.cut_stream,
            invalid_sse=self.invalid_sse or other.invalid_sse,
            trickle_ms=other.trickle_ms or self.trickle_ms,
            oversize=other.oversize if other.oversize is not None else self.oversize,
            labels=self.labels + other.labels,
        )


NO_FAULT = FaultPlan()
_NO_FAULT_TOKENS = frozenset({"", "none", "ok", "normal"})


def _number(token: str, raw: str, *, minimum: float = 0.0) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise FaultSpecError(f"fault {token!r}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value < minimum:
        raise FaultSpecError(f"fault {token!r}: value must be >= {minimum:g}")
    return value


def _integer(token: str, raw: str, *, minimum: int = 0) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise FaultSpecError(f"fault {token!r}: {raw!r} is not an integer") from None
    if value < minimum:
        raise FaultSpecError(f"fault {token!r}: value must be >= {minimum}")
    return value


@functools.lru_cache(maxsize=1024)
def parse_faults(spec: str | None) -> FaultPlan:
    """Parse a comma-separated fault spec (see the module docstring) into a :class:`FaultPlan`.

    Cached because the same few specs are sent thousands of times in chaos/bench runs.
    Raises :class:`FaultSpecError` on unknown kinds or bad arguments, so a typo in a test
    fails loudly instead of silently producing a healthy response.
    """
    if spec is None:
        return NO_FAULT
    fields: dict[str, Any] = {}
    labels: list[str] = []
    for raw_token in spec.split(","):
        token = raw_token.strip().lower()
        if token in _NO_FAULT_TOKENS:
            continue
        kind, _, arg = token.partition(":")
        if kind.startswith("retry_after="):  # standalone modifier: "status:429,retry_after=2"
            fields["retry_after"] = _number(token, kind.split("=", 1)[1])
        elif kind == "status":
            code_raw, *options = arg.replace(";", ":").split(":")
            code = _integer(token, code_raw, minimum=100)
            if code > 599:
                raise FaultSpecError(f"fault {token!r}: status must be 100..599")
            fields["status"] = code
            for option in options:
                name, _, value = option.partition("=")
                if name.strip() != "retry_after":
                    raise FaultSpecError(f"fault {token!r}: unknown option {name!r}")
                fields["retry_after"] = _number(token, value)
        elif kind == "delay":
            fields["delay_ms"] = fields.get("delay_ms", 0.0) + _number(token, arg)
        elif kind in ("ttfb-hang", "hang"):
            fields["hang"] = True
        elif kind == "reset":
            fields["reset"] = True
        elif kind == "malformed-json":
            fields["malformed_json"] = True
        elif kind == "wrong-shape":
            fields["wrong_shape"] = True
        elif kind == "cut-stream":
            fields["cut_stream"] = _integer(token, arg or "1")
        elif kind == "invalid-sse":
            fields["invalid_sse"] = True
        elif kind in ("trickle", "slow-stream-chunk-delay"):
            fields["trickle_ms"] = _number(token, arg)
        elif kind == "oversize":
            fields["oversize"] = _integer(token, arg, minimum=1)
        else:
            raise FaultSpecError(f"unknown fault kind {kind!r} in {spec!r}")
        labels.append(token)
    if not labels:
        return NO_FAULT
    return FaultPlan(labels=tuple(labels), **fields)


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class _ScriptEntry:
    path_prefix: str
    plan: FaultPlan


@dataclass(slots=True)
class UpstreamState:
    """Configuration and counters of one server.

    Only ever touched from the server's event loop (handlers and control endpoints), so it
    needs no locking even when the server runs in a background thread.
    """

    api_key: str | None = None
    delay_ms: float = 0.0
    logprob_mean: float = DEFAULT_LOGPROB_MEAN
    models: tuple[str, ...] = DEFAULT_MODELS
    record_limit: int = DEFAULT_RECORD_LIMIT
    # Startup values, restored by /_control/reset.
    initial_delay_ms: float = 0.0
    initial_logprob_mean: float = DEFAULT_LOGPROB_MEAN
    # Counters.
    total: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    by_fault: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    client_disconnects: int = 0
    auth_failures: int = 0
    # Client (address, port) pairs requests came from: one per TCP connection a client opened.
    peers: set[Any] = field(default_factory=set)
    script: deque[_ScriptEntry] = field(default_factory=deque)
    recorded: deque[dict[str, Any]] = field(default_factory=deque)
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.initial_delay_ms = self.delay_ms
        self.initial_logprob_mean = self.logprob_mean
        self.recorded = deque(maxlen=self.record_limit)

    def reset(self) -> None:
        """Forget counters, script and recorded requests; restore startup config."""
        self.total = 0
        self.by_path.clear()
        self.by_fault.clear()
        # Requests still being served keep running, so the peak restarts from them.
        self.max_in_flight = self.in_flight
        self.client_disconnects = 0
        self.auth_failures = 0
        self.peers.clear()
        self.script.clear()
        self.recorded.clear()
        self.delay_ms = self.initial_delay_ms
        self.logprob_mean = self.initial_logprob_mean

    def stats(self) -> dict[str, Any]:
        """Snapshot served by ``GET /_control/stats``."""
        return {
            "total": self.total,
            "by_path": dict(self.by_path),
            "by_fault": dict(self.by_fault),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "client_disconnects": self.client_disconnects,
            "auth_failures": self.auth_failures,
            "connections": len(self.peers),
            "script_remaining": len(self.script),
            "delay_ms": self.delay_ms,
            "logprob_mean": self.logprob_mean,
        }

    def next_scripted(self, path: str) -> FaultPlan:
        """Pop the head of the script if it targets ``path``; entries never skip ahead."""
        if self.script and path.startswith(self.script[0].path_prefix):
            return self.script.popleft().plan
        return NO_FAULT


# --------------------------------------------------------------------------- payloads


def _error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error object for ``status``."""
    kinds: dict[int, tuple[str, str | None]] = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("permission_error", None),
        404: ("invalid_request_error", "not_found"),
        408: ("timeout", None),
        413: ("invalid_request_error", "request_too_large"),
        422: ("invalid_request_error", None),
        429: ("requests", "rate_limit_exceeded"),
    }
    err_type, code = kinds.get(status, ("server_error" if status >= 500 else "api_error", None))
    return {
        "error": {
            "message": message or f"Injected upstream fault: HTTP {status}",
            "type": err_type,
            "param": None,
            "code": code,
        }
    }


class _BadRequest(Exception):
    """Raised by payload builders; turned into a 400 with an OpenAI error body."""


def _text_of(content: Any) -> str:
    """Text of a message ``content`` (string or list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _positive_int(body: dict[str, Any], *names: str, default: int) -> int:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest(f"'{name}' must be a positive integer")
        return value
    return default


def _logprob_entry(token: str, mean: float, top: int) -> dict[str, Any]:
    tops = [{"token": token, "logprob": mean, "bytes": list(token.encode())}]
    # Alternatives are strictly less likely than the chosen token, as in a real model.
    tops += [
        {"token": f"alt{i}", "logprob": mean - i, "bytes": list(f"alt{i}".encode())}
        for i in range(1, top)
    ]
    return {
        "token": token,
        "logprob": mean,
        "bytes": list(token.encode()),
        "top_logprobs": tops[:top],
    }


@dataclass(slots=True)
class _Reply:
    """What an endpoint wants to send before faults are applied."""

    obj: Any = None  # JSON object for a plain response
    events: list[Any] | None = None  # chunk objects for an SSE response
    status: int = 200


def _chat_reply(body: Any, state: UpstreamState, request_no: int) -> _Reply:
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array")
    max_tokens = _positive_int(
        body, "max_completion_tokens", "max_tokens", default=DEFAULT_MAX_TOKENS
    )
    prompt_words = 0
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise _BadRequest("each message must be an object")
        text = _text_of(message.get("content"))
        prompt_words += len(text.split())
        if message.get("role") == "user":
            last_user = text
    words = last_user.split() or ["ok"]
    finish_reason = "length" if len(words) > max_tokens else "stop"
    words = words[:max_tokens]
    tokens = [words[0], *(" " + w for w in words[1:])]
    usage = {
        "prompt_tokens": max(prompt_words, 1),
        "completion_tokens": len(tokens),
        "total_tokens": max(prompt_words, 1) + len(tokens),
    }
    want_logprobs = body.get("logprobs") is True
    top = body.get("top_logprobs") or 0
    top = top if isinstance(top, int) and not isinstance(top, bool) and top > 0 else 0
    mean = state.logprob_mean
    cid = f"chatcmpl-fake-{request_no}"
    created = int(time.time())

    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        events: list[Any] = []
        last = len(tokens) - 1
        for i, token in enumerate(tokens):
            delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
            chunk: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": (
                            {"content": [_logprob_entry(token, mean, top)]}
                            if want_logprobs
                            else None
                        ),
                        "finish_reason": finish_reason if i == last else None,
                    }
                ],
            }
            if include_usage:
                chunk["usage"] = None  # what OpenAI sends on content chunks in this mode
            events.append(chunk)
        if include_usage:
            events.append(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        return _Reply(events=events)

    return _Reply(
        obj={
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fault-upstream",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                    "logprobs": (
                        {"content": [_logprob_entry(t, mean, top) for t in tokens], "refusal": None}
                        if want_logprobs
                        else None
                    ),
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
    )


def _embedding_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text`` (same input, same vector, across runs)."""
    raw = hashlib.shake_256(text.encode()).digest(dims * 2)
    values = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dims}H", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _embeddings_reply(body: Any, state: UpstreamState) -> _Reply:
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' is required")
    raw_input = body.get("input")
    inputs: list[Any]
    if isinstance(raw_input, str):
        inputs = [raw_input]
    elif isinstance(raw_input, list) and raw_input:
        # A flat list of ints is one pre-tokenised input; anything else is a batch.
        inputs = [raw_input] if all(isinstance(x, int) for x in raw_input) else raw_input
    else:
        raise _BadRequest("'input' must be a string or a non-empty array")
    dims = _positive_int(body, "dimensions", default=DEFAULT_EMBEDDING_DIMS)
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for index, item in enumerate(inputs):
        if isinstance(item, str):
            tokens += len(item.split())
            vector = _embedding_vector(item, dims)
        elif isinstance(item, list):
            tokens += len(item)
            vector = _embedding_vector(" ".join(map(str, item)), dims)
        else:
            raise _BadRequest("each input must be a string or an array of token ids")
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = max(tokens, 1)
    return _Reply(
        obj={
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _models_reply(state: UpstreamState) -> _Reply:
    return _Reply(
        obj={
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fault-upstream"}
                for m in state.models
            ],
        }
    )


def _wrong_shape(obj: Any) -> Any:
    """Keep only the envelope of an answer: valid JSON a client cannot use."""
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in ("choices", "usage", "data")}
    return {"object": "unexpected"}


def _sse(event: Any) -> bytes:
    return b"data: " + _dumps(event) + b"\n\n"


# --------------------------------------------------------------------------- the app

_JSON_HEADERS = {"Content-Type": "application/json"}


class _App:
    """Request handlers bound to one :class:`UpstreamState`."""

    def __init__(self, state: UpstreamState) -> None:
        self.state = state
        # Futures of requests sleeping in delay/hang/trickle; resolved with True on stop so
        # shutdown is immediate instead of waiting for every sleeper (or a timeout).
        self._sleepers: set[asyncio.Future[bool]] = set()
        self._closing = False

    # -- lifecycle helpers -------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Wake every sleeping handler so it drops its connection right away."""
        self._closing = True
        for fut in list(self._sleepers):
            if not fut.done():
                fut.set_result(True)

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` (``inf`` = until stop); return True if the server is stopping.

        A bare future + ``call_later`` instead of ``asyncio.wait_for`` because benchmarks
        run a delay on every request and this avoids creating a task per sleep.
        """
        if self._closing:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        handle = None
        if math.isfinite(seconds):
            handle = loop.call_later(seconds, _resolve, fut, False)
        self._sleepers.add(fut)
        try:
            return await fut
        finally:
            self._sleepers.discard(fut)
            if handle is not None:
                handle.cancel()

    # -- entry points ------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "embeddings")

    async def models(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "models")

    async def health(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "health")

    async def _serve(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        state = self.state
        path = request.path
        request_no = next(state.seq)
        state.total += 1
        if request.transport is not None:
            state.peers.add(request.transport.get_extra_info("peername"))
        state.by_path[path] = state.by_path.get(path, 0) + 1
        state.in_flight += 1
        if state.in_flight > state.max_in_flight:
            state.max_in_flight = state.in_flight
        try:
            raw = await request.read() if request.body_exists else b""
            body: Any = None
            if raw:
                try:
                    body = _loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
            record: dict[str, Any] = {
                "seq": request_no,
                "method": request.method,
                "path": path,
                "query": request.query_string,
                # str(): the keys are multidict istr, which orjson refuses as dict keys.
                "headers": {str(k): v for k, v in request.headers.items()},
                "body": body,
                "fault": None,
            }
            state.recorded.append(record)

            is_api = path.startswith("/v1/")
            if (
                is_api
                and state.api_key is not None
                and request.headers.get("Authorization") != f"Bearer {state.api_key}"
            ):
                state.auth_failures += 1
                return _json_response(_error_body(401, "Incorrect API key provided."), status=401)

            try:
                plan = state.next_scripted(path).merged(
                    parse_faults(request.headers.get(FAULT_HEADER))
                )
            except FaultSpecError as exc:
                return _json_response(_error_body(400, f"bad {FAULT_HEADER}: {exc}"), 400)
            if plan.labels:
                record["fault"] = ",".join(plan.labels)
                for label in plan.labels:
                    state.by_fault[label] = state.by_fault.get(label, 0) + 1
            return await self._respond(request, endpoint, body, plan, request_no, is_api)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client hangs up (handler_cancellation),
            # which is how a gateway timing out on a delay/hang shows up here.
            state.client_disconnects += 1
            raise
        finally:
            state.in_flight -= 1

    async def _respond(
        self,
        request: web.Request,
        endpoint: str,
        body: Any,
        plan: FaultPlan,
        request_no: int,
        is_api: bool,
    ) -> web.StreamResponse:
        state = self.state
        delay_ms = plan.delay_ms + (state.delay_ms if is_api else 0.0)
        if delay_ms > 0 and await self._pause(delay_ms / 1000.0):
            return _drop(request, rst=True)
        if plan.hang:
            await self._pause(math.inf)
            return _drop(request, rst=True)
        if plan.reset:
            return _drop(request, rst=True)

        headers = {"x-request-id": f"req_fake_{request_no}"}
        if plan.labels:
            headers["x-upstream-fault"] = ",".join(plan.labels)

        if plan.status is not None:
            if plan.retry_after is not None:
                ra = plan.retry_after
                headers["Retry-After"] = str(int(ra)) if ra == int(ra) else str(ra)
                headers["retry-after-ms"] = str(int(ra * 1000))
            return _json_response(_error_body(plan.status), plan.status, headers)
        if plan.malformed_json:
            # Truncated mid-string: starts like a completion, so only a real parse fails.
            return web.Response(
                body=b'{"id": "chatcmpl-malformed", "object": "chat.completion", '
                b'"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok',
                content_type="application/json",
                headers=headers,
            )

        try:
            if endpoint == "chat":
                reply = _chat_reply(body, state, request_no)
            elif endpoint == "embeddings":
                reply = _embeddings_reply(body, state)
            elif endpoint == "models":
                reply = _models_reply(state)
            else:
                reply = _Reply(obj={"status": "ok"})
        except _BadRequest as exc:
            return _json_response(_error_body(400, str(exc)), 400, headers)

        if reply.events is not None or plan.invalid_sse:
            return await self._write_stream(request, reply, plan, headers)
        return await self._write_body(request, reply, plan, headers)

    async def _write_stream(
        self, request: web.Request, reply: _Reply, plan: FaultPlan, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send an SSE answer, applying wrong-shape/oversize/invalid-sse/cut/trickle."""
        events = reply.events if reply.events is not None else [reply.obj]
        if plan.wrong_shape:
            events = [_wrong_shape(e) for e in events]
        encoded = [_sse(e) for e in events]
        if plan.oversize is not None:
            encoded = _oversize_stream(encoded, events, plan.oversize)
        if plan.invalid_sse:
            encoded[1:1] = _SSE_GARBAGE  # after one good chunk, so the stream "starts fine"
        if plan.cut_stream is None:
            encoded.append(_SSE_DONE)

        resp = web.StreamResponse(
            status=200,
            headers={
                **headers,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
            },
        )
        await resp.prepare(request)
        if plan.cut_stream is not None:
            encoded = encoded[: plan.cut_stream]
        if plan.trickle_ms > 0 or plan.oversize is not None:
            for i, chunk in enumerate(encoded):
                if i and plan.trickle_ms > 0 and await self._pause(plan.trickle_ms / 1000):
                    return _drop(request, rst=True)
                await resp.write(chunk)
        elif encoded:
            # One write (one chunked frame, one syscall) keeps the benchmark path cheap.
            await resp.write(b"".join(encoded))
        if plan.cut_stream is not None:
            # FIN rather than RST: the client must receive the chunks already sent.
            return _drop(request, rst=False)
        await resp.write_eof()
        return resp

    async def _write_body(
        self, request: web.Request, reply: _Reply, plan: FaultPlan, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send a JSON answer, applying wrong-shape/oversize/cut/trickle."""
        obj = _wrong_shape(reply.obj) if plan.wrong_shape else reply.obj
        if plan.oversize is None and plan.cut_stream is None and plan.trickle_ms <= 0:
            return _json_response(obj, reply.status, headers)

        pieces, total = (
            _oversize_body(obj, plan.oversize) if plan.oversize is not None else _sliced(obj)
        )
        resp = web.StreamResponse(
            status=reply.status, headers={**headers, "Content-Type": "application/json"}
        )
        resp.content_length = total  # announce the full size even if we then cut
        await resp.prepare(request)
        budget = total if plan.cut_stream is None else min(plan.cut_stream, total - 1)
        sent = 0
        for i, piece in enumerate(pieces):
            if sent >= budget:
                break
            if i and plan.trickle_ms > 0 and await self._pause(plan.trickle_ms / 1000):
                return _drop(request, rst=True)
            piece = piece[: budget - sent]
            await resp.write(piece)
            sent += len(piece)
        if plan.cut_stream is not None:
            return _drop(request, rst=False)
        await resp.write_eof()
        return resp

    # -- control API -------------------------------------------------------------------

    async def control_script(self, request: web.Request) -> web.Response:
        data = await _control_json(request)
        faults = data.get("faults")
        if not isinstance(faults, list):
            return _json_response({"error": "'faults' must be a list of fault specs"}, 400)
        prefix = data.get("path", DEFAULT_SCRIPT_PATH)
        if not isinstance(prefix, str):
            return _json_response({"error": "'path' must be a string"}, 400)
        try:
            entries = [
                _ScriptEntry(prefix, parse_faults(None if f is None else str(f))) for f in faults
            ]
        except FaultSpecError as exc:
            return _json_response({"error": str(exc)}, 400)
        if not data.get("append", False):
            self.state.script.clear()
        self.state.script.extend(entries)
        return _json_response({"queued": len(self.state.script)})

    async def control_reset(self, request: web.Request) -> web.Response:
        self.state.reset()
        return _json_response({"ok": True})

    async def control_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.state.stats())

    async def control_requests(self, request: web.Request) -> web.Response:
        return _json_response({"requests": list(self.state.recorded)})

    async def control_delay(self, request: web.Request) -> web.Response:
        data = await _control_json(request)
        ms = data.get("ms")
        if not isinstance(ms, int | float) or isinstance(ms, bool) or ms < 0:
            return _json_response({"error": "'ms' must be a number >= 0"}, 400)
        self.state.delay_ms = float(ms)
        return _json_response({"delay_ms": self.state.delay_ms})

    async def control_config(self, request: web.Request) -> web.Response:
        data = await _control_json(request)
        if "delay_ms" in data:
            self.state.delay_ms = float(data["delay_ms"])
        if "logprob_mean" in data:
            self.state.logprob_mean = float(data["logprob_mean"])
        if "models" in data:
            self.state.models = tuple(str(m) for m in data["models"])
        return _json_response(
            {
                "delay_ms": self.state.delay_ms,
                "logprob_mean": self.state.logprob_mean,
                "models": list(self.state.models),
            }
        )


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_dumps(obj), status=status, headers={**_JSON_HEADERS, **(headers or {})}
    )


async def _control_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        data = _loads(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="control body must be JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="control body must be a JSON object")
    return data


def _drop(request: web.Request, *, rst: bool) -> web.StreamResponse:
    """Close the client connection without (finishing) a response.

    ``rst=True`` sets SO_LINGER 0 so the kernel sends a TCP RST (what a crashed upstream or
    a load balancer resetting looks like); ``rst=False`` is an orderly FIN that still
    delivers bytes already written (used to cut a stream mid-body).

    The returned dummy response is never sent: aiohttp sees the closed transport when it
    tries to write it and treats that as a premature client disconnection (debug log
    only), which is exactly the quiet path we want.
    """
    transport = request.transport
    if transport is not None and not transport.is_closing():
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, AttributeError, TypeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    return web.Response()


def _sliced(obj: Any) -> tuple[list[bytes], int]:
    body = _dumps(obj)
    step = max(1, math.ceil(len(body) / _TRICKLE_SLICES))
    return [body[i : i + step] for i in range(0, len(body), step)], len(body)


def _oversize_body(obj: Any, size: int) -> tuple[Iterator[bytes], int]:
    """A JSON body of at least ``size`` bytes, produced lazily in 64 KiB pieces.

    The padding goes into the assistant message for completions (so a relaying gateway
    really has to carry it) and into an ``x_padding`` field otherwise.
    """
    padded = dict(obj) if isinstance(obj, dict) else {"value": obj}
    choices = padded.get("choices")
    if isinstance(choices, list) and choices and "message" in choices[0]:
        choice = dict(choices[0])
        choice["message"] = {**choice["message"], "content": _PAD_MARKER}
        padded["choices"] = [choice, *choices[1:]]
    else:
        padded["x_padding"] = _PAD_MARKER
    # orjson escapes the NUL bytes of the marker, so split on the escaped form.
    marker = _dumps(_PAD_MARKER)[1:-1]
    prefix, suffix = _dumps(padded).split(marker, 1)
    pad = max(0, size - len(prefix) - len(suffix))

    def pieces() -> Iterator[bytes]:
        yield prefix
        block = b"x" * _PAD_PIECE
        full, rest = divmod(pad, _PAD_PIECE)
        for _ in range(full):
            yield block
        if rest:
            yield block[:rest]
        yield suffix

    return pieces(), len(prefix) + pad + len(suffix)


def _oversize_stream(encoded: list[bytes], events: list[Any], size: int) -> list[bytes]:
    """Insert 64 KiB content chunks before the usage chunk until ``size`` bytes are queued."""
    template = next(
        (e for e in events if isinstance(e, dict) and e.get("choices")),
        {"object": "chat.completion.chunk"},
    )
    pad_event = dict(template)
    if isinstance(template.get("choices"), list):
        pad_event["choices"] = [
            {"index": 0, "delta": {"content": "x" * _PAD_PIECE}, "finish_reason": None}
        ]
    else:
        pad_event["x_padding"] = "x" * _PAD_PIECE
    pad_chunk = _sse(pad_event)
    have = sum(len(c) for c in encoded)
    count = max(0, math.ceil((size - have) / len(pad_chunk)))
    # Content chunks go before the trailing usage chunk (if any), where a model would put them.
    split = len(encoded) - 1 if events and not events[-1].get("choices", True) else len(encoded)
    return encoded[:split] + [pad_chunk] * count + encoded[split:]


def build_app(state: UpstreamState) -> tuple[web.Application, Callable[[], None]]:
    """Build the aiohttp application for ``state``.

    Returns the app and a ``begin_shutdown`` callable that wakes sleeping handlers; call it
    before cleaning up the runner so hung/delayed requests do not hold shutdown hostage.
    """
    handlers = _App(state)
    # Large client_max_size: gateways may forward big prompts, and the default 1 MiB would
    # turn them into 413s that no real OpenAI-compatible upstream would send.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(
        [
            web.post("/v1/chat/completions", handlers.chat),
            web.post("/v1/embeddings", handlers.embeddings),
            web.get("/v1/models", handlers.models),
            web.get("/health", handlers.health),
            web.post("/_control/script", handlers.control_script),
            web.post("/_control/reset", handlers.control_reset),
            web.get("/_control/stats", handlers.control_stats),
            web.get("/_control/requests", handlers.control_requests),
            web.post("/_control/delay", handlers.control_delay),
            web.post("/_control/config", handlers.control_config),
        ]
    )
    return app, handlers.begin_shutdown


# --------------------------------------------------------------------------- servers


class UpstreamServer:
    """The server inside an already running event loop (``await start()`` / ``stop()``)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        delay_ms: float = 0.0,
        logprob_mean: float = DEFAULT_LOGPROB_MEAN,
        models: Sequence[str] = DEFAULT_MODELS,
        record_limit: int = DEFAULT_RECORD_LIMIT,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.state = UpstreamState(
            api_key=api_key,
            delay_ms=delay_ms,
            logprob_mean=logprob_mean,
            models=tuple(models),
            record_limit=record_limit,
        )
        self._runner: web.AppRunner | None = None
        self._begin_shutdown: Callable[[], None] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:8123``."""
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> UpstreamServer:
        """Bind and start serving; ``port=0`` picks a free port (see ``.port``)."""
        app, self._begin_shutdown = build_app(self.state)
        # handler_cancellation: a client hanging up cancels its handler, so in-flight
        # counts stay true and hung requests do not pile up across a long chaos run.
        # access_log=None: logging every request would dominate the benchmark profile.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.requested_port, backlog=2048)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        """Drop hung/delayed requests, close all connections and release the port."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._begin_shutdown is not None:
            self._begin_shutdown()
        await runner.cleanup()


class _ControlClient:
    """Synchronous helpers over the control API (shared by thread and process servers)."""

    _client: httpx.Client | None = None
    api_key: str | None = None

    @property
    def url(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        """OpenAI base URL to hand to a client or gateway: ``http://127.0.0.1:PORT/v1``."""
        return self.url + "/v1"

    @property
    def auth_headers(self) -> dict[str, str]:
        """``Authorization`` header for the configured key (empty if auth is off)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _control(self) -> httpx.Client:
        if self._client is None:
            # trust_env=False: a developer's HTTP(S)_PROXY must never capture loopback calls.
            self._client = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)
        return self._client

    def _close_control(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        resp = self._control().request(method, path, json=payload)
        resp.raise_for_status()
        return resp.json()

    def stats(self) -> dict[str, Any]:
        """Counters: total, by_path, by_fault, in_flight, max_in_flight, ... ."""
        result: dict[str, Any] = self._call("GET", "/_control/stats")
        return result

    def script(
        self, faults: Iterable[str | None], *, path: str = DEFAULT_SCRIPT_PATH, append: bool = False
    ) -> int:
        """Fault the next requests under ``path`` in order (``None``/"none" = healthy).

        Returns how many entries are now queued.
        """
        result = self._call(
            "POST", "/_control/script", {"faults": list(faults), "path": path, "append": append}
        )
        return int(result["queued"])

    def reset(self) -> None:
        """Clear counters, script and recorded requests; restore startup delay."""
        self._call("POST", "/_control/reset")

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Recorded requests, oldest first, optionally only those whose path is ``path``."""
        items: list[dict[str, Any]] = self._call("GET", "/_control/requests")["requests"]
        return [r for r in items if path is None or r["path"] == path]

    def last_request(self, path: str | None = None) -> dict[str, Any] | None:
        """The most recent recorded request (optionally for ``path``), or None."""
        items = self.requests(path)
        return items[-1] if items else None

    def set_delay(self, ms: float) -> None:
        """Base latency in ms added to every ``/v1`` answer (0 to disable)."""
        self._call("POST", "/_control/delay", {"ms": ms})

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change ``delay_ms``, ``logprob_mean`` and/or ``models`` at runtime."""
        result: dict[str, Any] = self._call("POST", "/_control/config", settings)
        return result


class FaultUpstream(_ControlClient):
    """The fake upstream running in a background thread with its own event loop.

    Made for synchronous tests (and async ones: the server never shares the test's loop)::

        with FaultUpstream(api_key="sk-up") as up:
            up.script(["status:503"])
            ...  # point the gateway at up.base_url
            assert up.stats()["by_fault"] == {"status:503": 1}
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        delay_ms: float = 0.0,
        logprob_mean: float = DEFAULT_LOGPROB_MEAN,
        models: Sequence[str] = DEFAULT_MODELS,
        record_limit: int = DEFAULT_RECORD_LIMIT,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self._server = UpstreamServer(
            host=host,
            port=port,
            api_key=api_key,
            delay_ms=delay_ms,
            logprob_mean=logprob_mean,
            models=models,
            record_limit=record_limit,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def url(self) -> str:
        """Root URL (control API and ``/health`` live here)."""
        return self._server.url

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server.port is None:
            raise RuntimeError("server not started")
        return self._server.port

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> FaultUpstream:
        """Start the server thread; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FaultUpstream already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fault-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("fault upstream did not start in time")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("fault upstream failed to start") from self._startup_error
        return self

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._server.start())
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            # Anything still pending (should be nothing after server.stop) is cancelled
            # and awaited so the loop closes without "Task was destroyed" warnings.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, join the thread and close the control client. Idempotent."""
        self._close_control()
        thread, loop = self._thread, self._loop
        self._thread = None
        if thread is None or loop is None:
            return
        if thread.is_alive() and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._server.stop(), loop)
            try:
                future.result(timeout)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = None

    def __enter__(self) -> FaultUpstream:
        return self.start() if self._thread is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_fault_upstream(**kwargs: Any) -> FaultUpstream:
    """Create and start a :class:`FaultUpstream` (caller must ``stop()`` it).

    Pytest-independent, so ``tests/conftest.py`` can wrap it in a fixture::

        @pytest.fixture
        def upstream():
            up = start_fault_upstream()
            yield up
            up.stop()
    """
    return FaultUpstream(**kwargs).start()


@contextlib.contextmanager
def fault_upstream(**kwargs: Any) -> Iterator[FaultUpstream]:
    """Context manager form of :func:`start_fault_upstream`."""
    up = start_fault_upstream(**kwargs)
    try:
        yield up
    finally:
        up.stop()


class UpstreamProcess(_ControlClient):
    """The fake upstream as a child process (``python -m tests.support.upstream``).

    For benchmarks (the upstream must not share the GIL with the load generator) and for
    multi-process tests. Same control helpers as :class:`FaultUpstream`.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        delay_ms: float = 0.0,
        api_key: str | None = None,
        logprob_mean: float = DEFAULT_LOGPROB_MEAN,
        uvloop: bool = True,
    ) -> None:
        self.api_key = api_key
        self._args = ["--port", str(port), "--delay-ms", str(delay_ms)]
        self._args += ["--logprob-mean", str(logprob_mean)]
        if api_key:
            self._args += ["--api-key", api_key]
        if not uvloop:
            self._args.append("--no-uvloop")
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Root URL as announced by the child's READY line."""
        if self._url is None:
            raise RuntimeError("process not started")
        return self._url

    @property
    def pid(self) -> int | None:
        """PID of the child, if running."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 20.0) -> UpstreamProcess:
        """Spawn the child and wait for its ``READY <url>`` line."""
        if self._proc is not None:
            raise RuntimeError("UpstreamProcess already started")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.upstream", *self._args],
            cwd=_PROJECT_ROOT,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    self.stop()
                    raise RuntimeError("upstream process did not report READY in time")
                byte = os.read(self._proc.stdout.fileno(), 1)
                if not byte:
                    self.stop()
                    raise RuntimeError("upstream process exited before READY")
                line += byte
        text = line.decode().strip()
        if not text.startswith("READY "):
            self.stop()
            raise RuntimeError(f"unexpected first line from upstream process: {text!r}")
        self._url = text.split(" ", 1)[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the child (graceful aiohttp shutdown), SIGKILL if it lingers."""
        self._close_control()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> UpstreamProcess:
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


async def _serve_forever(args: argparse.Namespace) -> None:
    server = UpstreamServer(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        delay_ms=args.delay_ms,
        logprob_mean=args.logprob_mean,
        models=args.model or DEFAULT_MODELS,
        record_limit=args.record_limit,
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``python -m tests.support.upstream --port N``."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.upstream",
        description="Fault-injecting fake OpenAI upstream (prints 'READY <url>' when up).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="base latency per answer")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--logprob-mean", type=float, default=DEFAULT_LOGPROB_MEAN)
    parser.add_argument("--model", action="append", help="model id for /v1/models (repeat)")
    parser.add_argument("--record-limit", type=int, default=DEFAULT_RECORD_LIMIT)
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    args = parser.parse_args(argv)

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:  # uvloop roughly doubles throughput for the benchmark upstream
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
            loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
