"""Conformance: call a new endpoint the way the gateway will, before it goes live.

A chat endpoint must answer a plain chat completion with a valid body and integer
``usage``, and stream one with parseable SSE chunks that end with ``data: [DONE]`` and
carry a usage chunk when ``stream_options.include_usage`` is sent (the gateway meters
streams by it). Logprobs support and the model listing are recorded but not required.
An embeddings endpoint must answer ``/embeddings`` with one vector per input and usage.

Every call goes through ``vendors.probes.VendorClient`` (SSRF guard, no redirects, 1 MiB
cap, deadlines); each check records its latency and, when it fails, a message the vendor
can act on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from vendors.models import ConformanceReport, Endpoint
from vendors.probes import (
    VendorCallError,
    VendorClient,
    VendorResponse,
    VendorUnreachableError,
    chat_answer,
    client_for,
    elapsed_ms,
    truncate,
)
from vendors.ssrf import UnsafeURLError, check_url

PROMPT: Final = "Say hello in one short sentence."
MAX_TOKENS: Final = 8
EMBEDDING_INPUTS: Final = ("Switchyard conformance check.", "A second, different input.")
_SSE_FIELDS: Final = (b"data", b"event", b"id", b"retry")


@dataclass(slots=True)
class Check:
    name: str
    passed: bool
    detail: str
    latency_ms: int | None = None
    required: bool = True
    unreachable: bool = False  # nothing answered: later calls would only wait again

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "required": self.required,
            "detail": truncate(self.detail, 500),
            "latency_ms": self.latency_ms,
        }


class CheckFailed(Exception):
    """A shape problem found while validating an answer."""


def _failed(
    names: tuple[str, ...], detail: str, latency: int | None, exc: Exception
) -> list[Check]:
    unreachable = isinstance(exc, VendorUnreachableError)
    return [Check(name, False, detail, latency, unreachable=unreachable) for name in names]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _usage_problem(usage: Any, fields: tuple[str, ...]) -> str | None:
    if not isinstance(usage, dict):
        return "'usage' is missing or not an object"
    for name in fields:
        if not _is_count(usage.get(name)):
            return (
                f"usage.{name} is missing or not a non-negative integer (got {usage.get(name)!r})"
            )
    if "total_tokens" in usage and not _is_count(usage["total_tokens"]):
        return "usage.total_tokens is not a non-negative integer"
    return None


def _chat_body(endpoint: Endpoint, **extra: Any) -> dict[str, Any]:
    return {
        "model": endpoint.upstream_model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


def _post_json(client: VendorClient, path: str, body: dict[str, Any]) -> tuple[Any, int]:
    """POST and parse a JSON object answer; ``VendorCallError`` for anything else."""
    response: VendorResponse = client.call("POST", path, json_body=body)
    if not response.ok:
        raise VendorCallError(response.error_summary(), status=response.status)
    data = response.json()
    if not isinstance(data, dict):
        raise VendorCallError("the answer is JSON but not an object")
    return data, response.latency_ms


# --------------------------------------------------------------------------- chat


def _check_chat(client: VendorClient, endpoint: Endpoint) -> list[Check]:
    started = time.monotonic()
    try:
        data, latency = _post_json(client, "chat/completions", _chat_body(endpoint))
    except VendorCallError as exc:
        detail = f"the chat completion failed: {exc}"
        return _failed(("chat", "chat.usage"), detail, elapsed_ms(started), exc)
    checks = []
    try:
        answer = chat_answer(data)
        choice = data["choices"][0]
        if "finish_reason" not in choice:
            raise CheckFailed("choices[0].finish_reason is missing")
        checks.append(
            Check(
                "chat",
                True,
                f"answered {len(answer)} characters (finish_reason={choice['finish_reason']})",
                latency,
            )
        )
    except (VendorCallError, CheckFailed) as exc:
        checks.append(
            Check("chat", False, f"the chat completion has the wrong shape: {exc}", latency)
        )
    problem = _usage_problem(data.get("usage"), ("prompt_tokens", "completion_tokens"))
    usage = data.get("usage") or {}
    checks.append(
        Check("chat.usage", False, problem, latency)
        if problem
        else Check(
            "chat.usage",
            True,
            f"prompt_tokens={usage['prompt_tokens']}, "
            f"completion_tokens={usage['completion_tokens']}",
            latency,
        )
    )
    return checks


def _sse_payloads(raw: Iterator[bytes]) -> Iterator[bytes]:
    """The ``data:`` payloads of an SSE body; ``CheckFailed`` for a line that is not SSE."""
    buffer = b""
    for piece in raw:
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            payload = _sse_data(line)
            if payload is not None:
                yield payload
    payload = _sse_data(buffer)
    if payload is not None:
        yield payload


def _sse_data(line: bytes) -> bytes | None:
    line = line.rstrip(b"\r")
    if not line or line.startswith(b":"):
        return None
    field, _, value = line.partition(b":")
    if field not in _SSE_FIELDS:
        preview = line[:60].decode("utf-8", "replace")
        raise CheckFailed(f"a line of the stream is not an SSE field: {preview!r}")
    if field != b"data":
        return None
    return value[1:] if value.startswith(b" ") else value


def _check_stream(client: VendorClient, endpoint: Endpoint) -> list[Check]:
    body = _chat_body(endpoint, stream=True, stream_options={"include_usage": True})
    started = time.monotonic()
    chunks = 0
    content = 0
    done = False
    usage: Any = None
    first_chunk_ms: int | None = None
    try:
        with client.open("POST", "chat/completions", json_body=body) as (response, started):
            if not 200 <= response.status_code < 300:
                raw = b"".join(client.iter_bytes(response, started))
                summary = VendorResponse(response.status_code, response.headers, raw, 0)
                raise VendorCallError(summary.error_summary(), status=response.status_code)
            content_type = response.headers.get("content-type", "")
            if "text/event-stream" not in content_type:
                raise CheckFailed(
                    f"the Content-Type is {content_type or 'missing'!r}, not text/event-stream"
                )
            for payload in _sse_payloads(client.iter_bytes(response, started)):
                if payload.strip() == b"[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    preview = payload[:60].decode("utf-8", "replace")
                    raise CheckFailed(
                        f"chunk {chunks + 1} is not valid JSON: {preview!r}"
                    ) from None
                chunks += 1
                if first_chunk_ms is None:
                    first_chunk_ms = elapsed_ms(started)
                if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
                    raise CheckFailed(f"chunk {chunks} has no 'choices' list")
                for choice in chunk["choices"]:
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                        content += 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (VendorCallError, CheckFailed) as exc:
        where = f" after {chunks} chunk{'' if chunks == 1 else 's'}" if chunks else ""
        detail = f"the stream failed{where}: {exc}"
        return _failed(("stream", "stream.usage"), detail, elapsed_ms(started), exc)
    latency = elapsed_ms(started)
    if not done:
        stream = Check(
            "stream", False, f"the stream ended after {chunks} chunks without data: [DONE]", latency
        )
    elif content == 0:
        stream = Check("stream", False, "the stream carried no content delta", latency)
    else:
        detail = f"{chunks} chunks (first after {first_chunk_ms} ms), ended with [DONE]"
        stream = Check("stream", True, detail, latency)
    if usage is None:
        problem: str | None = "no usage chunk although stream_options.include_usage was sent"
    else:
        problem = _usage_problem(usage, ("prompt_tokens", "completion_tokens"))
    stream_usage = (
        Check("stream.usage", False, problem, latency)
        if problem
        else Check(
            "stream.usage",
            True,
            f"usage chunk: prompt_tokens={usage['prompt_tokens']}, "
            f"completion_tokens={usage['completion_tokens']}",
            latency,
        )
    )
    return [stream, stream_usage]


def _check_logprobs(client: VendorClient, endpoint: Endpoint) -> Check:
    started = time.monotonic()
    try:
        data, latency = _post_json(
            client, "chat/completions", _chat_body(endpoint, logprobs=True, top_logprobs=1)
        )
    except VendorCallError as exc:
        latency = elapsed_ms(started)
        return Check("logprobs", False, f"not supported: {exc}", latency, required=False)
    try:
        entries = data["choices"][0]["logprobs"]["content"]
        ok = (
            isinstance(entries, list)
            and entries
            and all(
                isinstance(e, dict)
                and isinstance(e.get("logprob"), int | float)
                and not isinstance(e.get("logprob"), bool)
                for e in entries
            )
        )
    except (KeyError, IndexError, TypeError):
        ok = False
    if ok:
        return Check("logprobs", True, f"supported ({len(entries)} tokens)", latency, False)
    return Check("logprobs", False, "not supported: no choices[0].logprobs.content", latency, False)


def _check_models(client: VendorClient, endpoint: Endpoint) -> Check:
    started = time.monotonic()
    try:
        response = client.call("GET", "models")
        if not response.ok:
            raise VendorCallError(response.error_summary(), status=response.status)
        data = response.json()
        ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
    except (VendorCallError, AttributeError, TypeError) as exc:
        detail = f"no model list: {exc}"
        return Check("models", False, detail, elapsed_ms(started), required=False)
    listed = endpoint.upstream_model in ids
    detail = (
        f"{endpoint.upstream_model!r} is listed"
        if listed
        else f"{endpoint.upstream_model!r} is not among the {len(ids)} listed models"
    )
    return Check("models", listed, detail, response.latency_ms, required=False)


# --------------------------------------------------------------------------- embeddings


def _check_embeddings(client: VendorClient, endpoint: Endpoint) -> list[Check]:
    body = {
        "model": endpoint.upstream_model,
        "input": list(EMBEDDING_INPUTS),
        "encoding_format": "float",
    }
    started = time.monotonic()
    try:
        data, latency = _post_json(client, "embeddings", body)
    except VendorCallError as exc:
        detail = f"the embeddings call failed: {exc}"
        return _failed(("embeddings", "embeddings.usage"), detail, elapsed_ms(started), exc)
    try:
        items = data.get("data")
        if not isinstance(items, list) or len(items) != len(EMBEDDING_INPUTS):
            raise CheckFailed(f"'data' must list one embedding per input ({len(EMBEDDING_INPUTS)})")
        sizes = set()
        for item in items:
            vector = item.get("embedding") if isinstance(item, dict) else None
            if not isinstance(vector, list) or not vector:
                raise CheckFailed("an item of 'data' has no 'embedding' list of numbers")
            if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
                raise CheckFailed("an embedding contains something other than numbers")
            sizes.add(len(vector))
        if len(sizes) != 1:
            raise CheckFailed(f"the embeddings have different sizes: {sorted(sizes)}")
        if sorted(item.get("index") for item in items) != list(range(len(items))):
            raise CheckFailed("the items' 'index' values are not 0..n-1")
        shape = Check("embeddings", True, f"{len(items)} vectors of {sizes.pop()} numbers", latency)
    except CheckFailed as exc:
        shape = Check("embeddings", False, f"the answer has the wrong shape: {exc}", latency)
    problem = _usage_problem(data.get("usage"), ("prompt_tokens",))
    usage = (
        Check("embeddings.usage", False, problem, latency)
        if problem
        else Check(
            "embeddings.usage", True, f"prompt_tokens={data['usage']['prompt_tokens']}", latency
        )
    )
    return [shape, usage]


# --------------------------------------------------------------------------- the report


def _run_checks(endpoint: Endpoint) -> list[Check]:
    try:
        check_url(endpoint.base_url)
    except UnsafeURLError as exc:
        return [Check("url", False, f"the URL is refused: {exc}")]
    checks = [Check("url", True, "the URL may be called")]
    steps: list[Callable[[VendorClient, Endpoint], Check | list[Check]]]
    if endpoint.kind == Endpoint.Kind.EMBEDDINGS:
        steps = [_check_embeddings]
    else:
        steps = [_check_chat, _check_stream, _check_logprobs, _check_models]
    with client_for(endpoint) as client:
        for step in steps:
            result = step(client, endpoint)
            new = result if isinstance(result, list) else [result]
            checks.extend(new)
            if any(c.unreachable for c in new):
                break  # every further call would wait for the same timeout
    return checks


def conformance_check(endpoint: Endpoint) -> ConformanceReport:
    """Call ``endpoint`` and return an unsaved report (see ``endpoint_check_conformance``)."""
    checks = _run_checks(endpoint)
    logprobs = next((c for c in checks if c.name == "logprobs"), None)
    return ConformanceReport(
        endpoint=endpoint,
        passed=all(c.passed for c in checks if c.required),
        checks=[c.as_dict() for c in checks],
        supports_logprobs=None if logprobs is None else logprobs.passed,
    )
