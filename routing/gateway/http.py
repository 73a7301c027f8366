"""Small ASGI helpers for the gateway (no framework on the hot path)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from routing.errors import BadRequest, PayloadTooLarge

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_HEADER_BYTES = 16_384


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def request_headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    total = 0
    for key, value in scope["headers"]:
        total += len(key) + len(value)
        headers[key.decode("latin-1").lower()] = value.decode("latin-1")
    if total > MAX_HEADER_BYTES:
        raise BadRequest("the request headers are too large", code="headers_too_large")
    return headers


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes before reading it all."""
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
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def encode_headers(extra: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]


async def send_json(
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
        *encode_headers(extra),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def start_sse(send: Send, request_id: str, extra: dict[str, str] | None) -> None:
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        (b"x-request-id", request_id.encode()),
        *encode_headers(extra),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def send_sse(send: Send, data: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


def cancelled_or_gone(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError | ClientGone)
