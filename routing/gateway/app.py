"""The gateway's ASGI application: ``/v1/chat/completions`` and ``/v1/models``.

One request: authenticate the key (in-process cache) -> read and validate the body ->
route over the in-memory snapshot -> hold the worst-case cost in Redis (one round trip) ->
call the vendor (shared aiohttp session), falling back to the next candidate on a failure
before the first byte -> settle the hold and emit the usage event (one round trip) ->
answer with ``usage.cost`` and the vendor that served it. No database query in steady
state: the snapshot and keys are loaded once and refreshed through Redis pub/sub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from billing.credit import AsyncCredit
from billing.money import NANOS_PER_USD, request_cost
from billing.selectors import organization_balance_by_id
from marketplace import invalidation
from routing.errors import (
    BadRequest,
    GatewayError,
    InsufficientCredit,
    MethodNotAllowed,
    NoCapacity,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UpstreamFailed,
)
from routing.gateway.auth import KeyCache, KeyInfo
from routing.gateway.upstream import UpstreamPool, check_literal, upstream_headers
from routing.gateway.validate import ChatRequest, chat_request, parse_json
from routing.router import Candidate, route
from routing.snapshot import Snapshot, load_snapshot
from vendors.ssrf import UnsafeURLError

logger = logging.getLogger("switchyard.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Chat templates add a few tokens per message around the content; the hold must cover them.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_BASE = 16
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def prompt_token_bound(request: ChatRequest) -> int:
    """An upper bound of the prompt's tokens: a token never covers less than one byte."""
    return (
        request.prompt_bytes
        + TEMPLATE_TOKENS_PER_MESSAGE * request.message_count
        + TEMPLATE_TOKENS_BASE
    )


@dataclass
class Attempt:
    endpoint: str
    outcome: str
    status: int | None = None
    latency_ms: int = 0
    detail: str = ""


@dataclass
class Served:
    """What the client received, for settlement."""

    candidate: Candidate
    hold: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    outcome: str = "success"
    cost: int = 0
    attempts: list[Attempt] = field(default_factory=list)


class _Retryable(Exception):
    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.detail)
        self.attempt = attempt


class _ClientError(Exception):
    """The vendor refused the request as invalid (a 4xx other than rate limiting)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class GatewayApp:
    def __init__(self) -> None:
        self.keys = KeyCache(ttl=settings.GATEWAY_KEY_CACHE_SECONDS)
        self.upstreams = UpstreamPool()
        self._snapshot: Snapshot | None = None
        self._snapshot_at = 0.0
        self._snapshot_lock: asyncio.Lock | None = None
        self._redis: aioredis.Redis | None = None
        self._credit: AsyncCredit | None = None
        self._listener: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_balance = sync_to_async(_organization_balance, thread_sensitive=False)

    # --- lifecycle ------------------------------------------------------------------------

    def _ensure_loop_state(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop = loop
        self._redis = aioredis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)
        self._credit = AsyncCredit(self._redis)
        self._snapshot_lock = asyncio.Lock()
        self._listener = loop.create_task(self._listen_for_invalidations())

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._ensure_loop_state()
                except Exception as exc:  # pragma: no cover - reported to the server
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self.upstreams.close()
        if self._redis is not None:
            await self._redis.aclose()
        self._loop = None

    async def _listen_for_invalidations(self) -> None:
        """Drop cached keys and reload the routing table when the control plane says so."""
        assert self._redis is not None
        while True:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(invalidation.CHANNEL)
                # Anything published while we were not subscribed is lost: start afresh.
                self.keys.clear()
                self._snapshot_at = 0.0
                async for message in pubsub.listen():
                    data = message.get("data")
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    if text.startswith("key:"):
                        self.keys.forget(text[4:])
                    elif text == invalidation.SNAPSHOT:
                        self._snapshot_at = 0.0
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("invalidation listener lost Redis; retrying", exc_info=True)
                await asyncio.sleep(0.5)

    async def snapshot(self) -> Snapshot:
        now = time.monotonic()
        fresh = now - self._snapshot_at < settings.GATEWAY_SNAPSHOT_REFRESH_SECONDS
        if self._snapshot is not None and fresh:
            return self._snapshot
        assert self._snapshot_lock is not None
        async with self._snapshot_lock:
            if self._snapshot is None or time.monotonic() - self._snapshot_at >= (
                settings.GATEWAY_SNAPSHOT_REFRESH_SECONDS
            ):
                try:
                    self._snapshot = await sync_to_async(_load_snapshot, thread_sensitive=False)()
                    self._snapshot_at = time.monotonic()
                except Exception:
                    if self._snapshot is None:
                        raise Unavailable("the routing table cannot be loaded") from None
                    # The database is away: keep serving the last routing table.
                    logger.warning("snapshot refresh failed; serving the cached one", exc_info=True)
                    self._snapshot_at = time.monotonic()
        return self._snapshot

    # --- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._ensure_loop_state()
        request_id = f"gen-{uuid.uuid4().hex}"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        try:
            if path == "/v1/chat/completions":
                if method != "POST":
                    raise MethodNotAllowed("use POST for /v1/chat/completions")
                await self._chat(scope, receive, send, headers, request_id)
            elif path == "/v1/models":
                if method != "GET":
                    raise MethodNotAllowed("use GET for /v1/models")
                await self._models(send, headers, request_id)
            else:
                raise NotFound(f"no such route: {path}", code="unknown_url")
        except GatewayError as exc:
            await _send_json(send, exc.status, exc.body(), request_id, exc.headers)
        except Exception:
            logger.exception("unhandled gateway error (request %s)", request_id)
            err = GatewayError("an internal error occurred; the request was not charged")
            await _send_json(send, 500, err.body(), request_id)

    async def _models(self, send: Send, headers: dict[str, str], request_id: str) -> None:
        key = await self.keys.authenticate(headers.get("authorization"))
        snapshot = await self.snapshot()
        data = []
        tags: set[str] = set()
        for endpoint in snapshot.endpoints:
            if not endpoint.visible_to(key.organization_id):
                continue
            tags.update(endpoint.tags)
            data.append(
                {
                    "id": endpoint.full_slug,
                    "object": "model",
                    "created": 0,
                    "owned_by": endpoint.vendor_slug,
                    "kind": endpoint.kind,
                }
            )
        data.extend(
            {
                "id": f"tag:{tag}",
                "object": "model",
                "created": 0,
                "owned_by": "switchyard",
                "kind": "tag",
            }
            for tag in sorted(tags)
        )
        await _send_json(send, 200, {"object": "list", "data": data}, request_id)

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        limit = settings.GATEWAY_MAX_BODY_BYTES
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest("invalid Content-Length", code="invalid_header")
            if int(declared) > limit:
                raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _chat(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        started = time.monotonic()
        key = await self.keys.authenticate(headers.get("authorization"))
        content_type = headers.get("content-type", "application/json")
        if "json" not in content_type:
            raise BadRequest("send the body as application/json", code="invalid_content_type")
        body = parse_json(await self._read_body(receive, headers))
        request = chat_request(body, max_messages=settings.GATEWAY_MAX_MESSAGES)
        snapshot = await self.snapshot()
        candidates = route(snapshot, model=request.model, organization_id=key.organization_id)
        attempts: list[Attempt] = []
        assert self._credit is not None
        last_error: GatewayError | None = None
        for candidate in candidates:
            max_tokens = request.max_tokens or min(
                settings.GATEWAY_DEFAULT_MAX_TOKENS, candidate.endpoint.context_length
            )
            prompt_bound = prompt_token_bound(request)
            hold = request_cost(
                prompt_bound, max_tokens, candidate.price_input, candidate.price_output
            )
            try:
                reserved = await self._credit.reserve(key.organization_id, hold, self._load_balance)
            except aioredis.RedisError:
                raise Unavailable(
                    "the gateway cannot reach its state store; nothing was charged",
                    code="state_unavailable",
                ) from None
            if not reserved:
                raise InsufficientCredit(
                    "your organisation's credit does not cover this request "
                    f"(up to ${hold / NANOS_PER_USD:.6f} at the quoted price); top up or lower "
                    "max_tokens"
                )
            served = Served(candidate=candidate, hold=hold, attempts=attempts)
            try:
                await self._call(send, request, max_tokens, prompt_bound, served, request_id)
            except _Retryable as exc:
                attempts.append(exc.attempt)
                await self._credit.release(key.organization_id, hold)
                last_error = UpstreamFailed(
                    f"the vendor failed: {exc.attempt.detail}", code="upstream_failed"
                )
                continue
            except _ClientError as exc:
                await self._credit.release(key.organization_id, hold)
                raise BadRequest(
                    f"the vendor refused the request: {exc.message}", code="upstream_rejected"
                ) from None
            except BaseException:
                # Cancelled (the client went away) or a bug: the hold goes back, uncharged
                # unless bytes were delivered, in which case settle what was delivered.
                await self._settle(key, request, served, request_id, started, stream=request.stream)
                raise
            await self._settle(key, request, served, request_id, started, stream=request.stream)
            return
        if last_error is None:
            raise NoCapacity("no endpoint is available for this model right now")
        await self._emit_failure(key, request, attempts, request_id, started)
        raise last_error

    async def _call(
        self,
        send: Send,
        request: ChatRequest,
        max_tokens: int,
        prompt_bound: int,
        served: Served,
        request_id: str,
    ) -> None:
        endpoint = served.candidate.endpoint
        upstream_body = dict(request.body)
        upstream_body["model"] = endpoint.upstream_model
        upstream_body.pop("max_completion_tokens", None)
        upstream_body["max_tokens"] = max_tokens
        if request.stream:
            upstream_body["stream_options"] = {"include_usage": True}
        url = f"{endpoint.base_url}/chat/completions"
        t0 = time.monotonic()
        attempt = Attempt(endpoint=endpoint.full_slug, outcome="error")
        try:
            check_literal(url)
            response = await asyncio.wait_for(
                self.upstreams.session().post(
                    url,
                    data=orjson.dumps(upstream_body),
                    headers=upstream_headers(endpoint.secret, request_id),
                    allow_redirects=False,
                ),
                timeout=settings.GATEWAY_FIRST_BYTE_TIMEOUT,
            )
        except UnsafeURLError as exc:
            attempt.detail = f"refused by the outbound guard: {exc}"
            raise _Retryable(attempt) from None
        except TimeoutError:
            attempt.outcome, attempt.detail = "timeout", "no answer before the first-byte deadline"
            raise _Retryable(attempt) from None
        except aiohttp.ClientError as exc:
            attempt.outcome, attempt.detail = (
                "connect_error",
                f"cannot reach the vendor ({type(exc).__name__})",
            )
            raise _Retryable(attempt) from None
        attempt.status = response.status
        try:
            if response.status != 200:
                text = (await response.content.read(4096)).decode("utf-8", "replace")
                attempt.latency_ms = int((time.monotonic() - t0) * 1000)
                if (
                    response.status in RETRYABLE_STATUS
                    or response.status >= 500
                    or response.status in (401, 403)
                ):
                    attempt.detail = f"HTTP {response.status}"
                    raise _Retryable(attempt)
                raise _ClientError(response.status, _vendor_error_message(text))
            if request.stream:
                await self._relay_stream(
                    send, response, request, prompt_bound, served, request_id, attempt, t0
                )
            else:
                await self._relay_json(send, response, served, request_id, attempt, t0)
        finally:
            response.release()

    async def _relay_json(
        self,
        send: Send,
        response: aiohttp.ClientResponse,
        served: Served,
        request_id: str,
        attempt: Attempt,
        t0: float,
    ) -> None:
        limit = settings.GATEWAY_MAX_UPSTREAM_BODY_BYTES
        try:
            raw = await asyncio.wait_for(
                response.content.read(limit + 1), timeout=settings.GATEWAY_TOTAL_TIMEOUT
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            attempt.outcome, attempt.detail = (
                "read_error",
                f"the answer broke off ({type(exc).__name__})",
            )
            raise _Retryable(attempt) from None
        if len(raw) > limit:
            attempt.outcome, attempt.detail = "invalid", "the answer is larger than the limit"
            raise _Retryable(attempt)
        try:
            body = orjson.loads(raw)
            usage = body["usage"]
            prompt_tokens = int(usage["prompt_tokens"])
            completion_tokens = int(usage["completion_tokens"])
            if not isinstance(body["choices"], list) or prompt_tokens < 0 or completion_tokens < 0:
                raise ValueError("bad shape")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            attempt.outcome, attempt.detail = (
                "invalid",
                "the vendor's answer is not a valid completion",
            )
            raise _Retryable(attempt) from None
        attempt.outcome = "success"
        attempt.latency_ms = int((time.monotonic() - t0) * 1000)
        served.attempts.append(attempt)
        served.prompt_tokens, served.completion_tokens = prompt_tokens, completion_tokens
        cost = _charge(served)
        candidate = served.candidate
        body["id"] = request_id
        body["model"] = candidate.endpoint.full_slug
        usage["cost"] = cost / NANOS_PER_USD
        usage["cost_nanos"] = cost
        body["switchyard"] = {
            "request_id": request_id,
            "vendor": candidate.endpoint.vendor_slug,
            "endpoint": candidate.endpoint.full_slug,
            "attempts": len(served.attempts),
        }
        await _send_json(send, 200, body, request_id, _route_headers(served))

    async def _relay_stream(
        self,
        send: Send,
        response: aiohttp.ClientResponse,
        request: ChatRequest,
        prompt_bound: int,
        served: Served,
        request_id: str,
        attempt: Attempt,
        t0: float,
    ) -> None:
        """Pass SSE chunks through as they arrive; never truncate silently.

        Until the first chunk reaches the client a failure is retryable (fallback);
        after that the client gets an error event and pays only for what it received.
        """
        started_client = False
        usage: dict[str, Any] | None = None
        chunks_sent = 0
        deadline = t0 + settings.GATEWAY_TOTAL_TIMEOUT
        content = response.content
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                line = await asyncio.wait_for(content.readline(), timeout=remaining)
                if not line:
                    raise aiohttp.ClientPayloadError("the stream ended without [DONE]")
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                if b'"usage"' in data:
                    chunk = orjson.loads(data)
                    if isinstance(chunk.get("usage"), dict) and not chunk.get("choices"):
                        usage = chunk
                        continue
                if not started_client:
                    orjson.loads(data)  # the first chunk must be JSON before we commit to it
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": _sse_headers(request_id, served),
                        }
                    )
                    started_client = True
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + data + b"\n\n",
                        "more_body": True,
                    }
                )
                chunks_sent += 1
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError, ValueError) as exc:
            attempt.outcome = "stream_broken"
            attempt.detail = f"the stream broke off ({type(exc).__name__})"
            if not started_client:
                raise _Retryable(attempt) from None
            served.attempts.append(attempt)
            served.outcome = "partial"
            served.prompt_tokens = prompt_bound
            served.completion_tokens = chunks_sent
            _charge(served)
            error = {
                "error": {
                    "message": "the vendor's stream broke off; you are charged only for "
                    "the tokens you received",
                    "type": "upstream_error",
                    "code": "stream_interrupted",
                }
            }
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + orjson.dumps(error) + b"\n\n",
                    "more_body": False,
                }
            )
            return
        attempt.outcome = "success"
        attempt.latency_ms = int((time.monotonic() - t0) * 1000)
        served.attempts.append(attempt)
        if usage is not None:
            u = usage["usage"]
            served.prompt_tokens = int(u.get("prompt_tokens", prompt_bound))
            served.completion_tokens = int(u.get("completion_tokens", chunks_sent))
        else:
            served.prompt_tokens, served.completion_tokens = prompt_bound, chunks_sent
        cost = _charge(served)
        if not started_client:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": _sse_headers(request_id, served),
                }
            )
        tail = b""
        if request.include_usage and usage is not None:
            usage["id"] = request_id
            usage["usage"]["cost"] = cost / NANOS_PER_USD
            usage["usage"]["cost_nanos"] = cost
            usage["switchyard"] = {
                "request_id": request_id,
                "vendor": served.candidate.endpoint.vendor_slug,
                "endpoint": served.candidate.endpoint.full_slug,
            }
            tail = b"data: " + orjson.dumps(usage) + b"\n\n"
        await send(
            {"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": False}
        )

    async def _settle(
        self,
        key: KeyInfo,
        request: ChatRequest,
        served: Served,
        request_id: str,
        started: float,
        *,
        stream: bool,
    ) -> None:
        assert self._credit is not None
        cost = served.cost
        candidate = served.candidate
        event = None
        if served.attempts and served.attempts[-1].outcome in ("success", "stream_broken"):
            event = {
                "rid": request_id,
                "org": key.organization_id,
                "key": key.key_id,
                "ep": candidate.endpoint.id,
                "vendor": candidate.endpoint.vendor_id,
                "model": request.model,
                "pt": served.prompt_tokens,
                "ct": served.completion_tokens,
                "pin": candidate.price_input,
                "pout": candidate.price_output,
                "cost": cost,
                "ms": int((time.monotonic() - started) * 1000),
                "att": len(served.attempts),
                "out": served.outcome,
                "stream": stream,
                "ts": time.time(),
            }
        else:
            cost = 0
        await self._credit.settle(key.organization_id, refund=served.hold - cost, event=event or {})

    async def _emit_failure(
        self,
        key: KeyInfo,
        request: ChatRequest,
        attempts: list[Attempt],
        request_id: str,
        started: float,
    ) -> None:
        """Record a request every vendor failed (no charge) for the customer's dashboards."""
        assert self._credit is not None
        event = {
            "rid": request_id,
            "org": key.organization_id,
            "key": key.key_id,
            "ep": None,
            "vendor": None,
            "model": request.model,
            "pt": 0,
            "ct": 0,
            "pin": 0,
            "pout": 0,
            "cost": 0,
            "ms": int((time.monotonic() - started) * 1000),
            "att": len(attempts),
            "out": "failed",
            "stream": request.stream,
            "ts": time.time(),
        }
        with contextlib.suppress(aioredis.RedisError):
            await self._credit.settle(key.organization_id, refund=0, event=event)


def _charge(served: Served) -> int:
    """The charge at the quoted price, never more than the hold the customer agreed to."""
    candidate = served.candidate
    cost = request_cost(
        served.prompt_tokens,
        served.completion_tokens,
        candidate.price_input,
        candidate.price_output,
    )
    served.cost = min(cost, served.hold)
    return served.cost


def _organization_balance(organization_id: int) -> int:
    try:
        return organization_balance_by_id(organization_id)
    finally:
        connection.close()


def _load_snapshot() -> Snapshot:
    try:
        return load_snapshot()
    finally:
        connection.close()


def _vendor_error_message(text: str) -> str:
    with contextlib.suppress(Exception):
        parsed = orjson.loads(text)
        message = parsed.get("error", {}).get("message")
        if isinstance(message, str):
            return message[:500]
    return text[:200] or "no details"


def _route_headers(served: Served) -> dict[str, str]:
    candidate = served.candidate
    return {
        "x-switchyard-vendor": candidate.endpoint.vendor_slug,
        "x-switchyard-endpoint": candidate.endpoint.full_slug,
        "x-switchyard-price": (
            f"input={candidate.price_input};output={candidate.price_output};unit=nano-usd-per-1m"
        ),
        "x-switchyard-attempts": str(len(served.attempts)),
    }


def _sse_headers(request_id: str, served: Served) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        (b"x-request-id", request_id.encode()),
    ]
    headers += [(k.encode(), v.encode()) for k, v in _route_headers(served).items()]
    return headers


async def _send_json(
    send: Send,
    status: int,
    body: dict[str, Any],
    request_id: str,
    extra: dict[str, str] | None = None,
) -> None:
    payload = orjson.dumps(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if extra:
        headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
