"""The gateway's side of the response cache: keep what a client received, answer a hit.

``AnswerTee`` forwards every ASGI message to the client and keeps a copy of a 200 answer
(JSON or SSE) up to a size limit; ``entry_from_answer`` turns that copy into a cache entry
(a complete ``chat.completion``, rebuilt from the chunks of a stream). ``send_hit`` answers
from an entry — as JSON, or replayed as SSE to a streaming request — marked as a hit, with
a zero cost and what the hit saved.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from billing.money import NANOS_PER_USD
from routing.gateway.http import Send, send_json, send_sse, start_sse


class AnswerTee:
    """A ``send`` that forwards everything and keeps a copy of a successful answer."""

    def __init__(self, send: Send, limit: int) -> None:
        self._send = send
        self._limit = limit
        self.status = 0
        self.body = bytearray()
        self.overflow = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and self.status == 200 and not self.overflow:
            self.body += message.get("body", b"")
            if len(self.body) > self._limit:
                self.overflow, self.body = True, bytearray()
        await self._send(message)


def entry_from_answer(
    tee: AnswerTee, *, stream: bool, cost: int, request_id: str
) -> dict[str, Any] | None:
    """A cache entry from what the client received, or None when it cannot be reused."""
    if tee.status != 200 or tee.overflow or not tee.body:
        return None
    answer: dict[str, Any] | None
    try:
        answer = _answer_from_sse(bytes(tee.body)) if stream else orjson.loads(bytes(tee.body))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if answer is None or not isinstance(answer.get("choices"), list) or not answer["choices"]:
        return None
    usage: dict[str, Any] = answer["usage"] if isinstance(answer.get("usage"), dict) else {}
    return {
        "answer": {
            "object": "chat.completion",
            "model": answer.get("model"),
            "choices": answer["choices"],
            "system_fingerprint": answer.get("system_fingerprint"),
        },
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "cost": cost,
        "rid": request_id,
        "at": time.time_ns() // 1_000_000,
    }


def _answer_from_sse(raw: bytes) -> dict[str, Any] | None:
    """A ``chat.completion`` rebuilt from a stream of text deltas (one choice, no tools)."""
    content: list[str] = []
    role, finish, model = "assistant", None, None
    usage: dict[str, Any] = {}
    done = False
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            done = True
            break
        chunk = orjson.loads(data)
        if "error" in chunk:
            return None
        model = chunk.get("model", model)
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                return None
            delta = choice.get("delta") or {}
            if set(delta) - {"role", "content"}:
                return None  # tool calls and other deltas are not rebuilt
            role = delta.get("role") or role
            if isinstance(delta.get("content"), str):
                content.append(delta["content"])
            finish = choice.get("finish_reason") or finish
    if not done:
        return None
    return {
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": role, "content": "".join(content)},
                "finish_reason": finish or "stop",
            }
        ],
        "usage": usage,
    }


def hit_headers(kind: str) -> dict[str, str]:
    return {"x-switchyard-cache": "hit", "x-switchyard-cache-kind": kind}


async def send_hit(
    send: Send,
    *,
    request_id: str,
    entry: dict[str, Any],
    kind: str,
    stream: bool,
    include_usage: bool,
    similarity: int | None,
) -> None:
    """Answer from a cache entry: free, marked, with the cost it saved."""
    answer = dict(entry["answer"])
    prompt_tokens, completion_tokens = entry["prompt_tokens"], entry["completion_tokens"]
    cache_info: dict[str, Any] = {
        "hit": kind,
        "source_request_id": entry["rid"],
        "saved_nanos": entry["cost"],
    }
    if similarity is not None:
        cache_info["similarity"] = similarity / 1000
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "cost": 0,
        "cost_nanos": 0,
        "cache": cache_info,
        "cache_saved": entry["cost"] / NANOS_PER_USD,
    }
    meta = {"request_id": request_id, "cache": cache_info}
    created = int(time.time())
    headers = hit_headers(kind)
    if not stream:
        body = {**answer, "id": request_id, "created": created, "usage": usage, "switchyard": meta}
        await send_json(send, 200, body, request_id, headers)
        return
    await start_sse(send, request_id, headers)
    base = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": answer.get("model"),
    }
    choice = answer["choices"][0]
    message = choice.get("message") or {}
    first = {
        **base,
        "choices": [
            {
                "index": 0,
                "delta": {"role": message.get("role", "assistant"), "content": ""},
                "finish_reason": None,
            }
        ],
    }
    text = {
        **base,
        "choices": [
            {"index": 0, "delta": {"content": message.get("content") or ""}, "finish_reason": None}
        ],
    }
    last = {
        **base,
        "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason")}],
    }
    out = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in (first, text, last))
    if include_usage:
        tail: dict[str, Any] = {**base, "choices": [], "usage": usage, "switchyard": meta}
        out += b"data: " + orjson.dumps(tail) + b"\n\n"
    await send_sse(send, out + b"data: [DONE]\n\n", more=False)
