"""Validation of client request bodies, before anything is routed or reserved.

Hand-written rather than a schema library: it runs on every request, checks only what the
gateway relies on (OpenAI's types for the fields it reads, limits that protect vendors and
money) and passes the rest of the body through to the vendor untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from routing.errors import BadRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_JSON_DEPTH = 32


@dataclass(slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prompt_bytes: int
    message_count: int


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BadRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    # Only walk bodies that could be that deep (cheap bracket count first).
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and _depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(
            f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep"
        )
    return body


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _int_field(body: dict[str, Any], name: str, *, minimum: int, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"`{name}` must be an integer", param=name, code="invalid_type")
    if not minimum <= value <= maximum:
        raise BadRequest(
            f"`{name}` must be between {minimum} and {maximum}", param=name, code="invalid_value"
        )
    return value


def _number_field(body: dict[str, Any], name: str, *, minimum: float, maximum: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadRequest(f"`{name}` must be a number", param=name, code="invalid_type")
    if not minimum <= value <= maximum:
        raise BadRequest(
            f"`{name}` must be between {minimum} and {maximum}", param=name, code="invalid_value"
        )


def _content_bytes(content: Any, index: int) -> int:
    if isinstance(content, str):
        return len(content.encode("utf-8", "surrogatepass"))
    if content is None:
        return 0
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(
                    f"messages[{index}].content parts must be objects with a `type`",
                    param=f"messages[{index}].content",
                    code="invalid_type",
                )
            text = part.get("text")
            if part["type"] == "text" and not isinstance(text, str):
                raise BadRequest(
                    f"messages[{index}].content text parts need a string `text`",
                    param=f"messages[{index}].content",
                    code="invalid_type",
                )
            total += len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0
        return total
    raise BadRequest(
        f"messages[{index}].content must be a string or a list of parts",
        param=f"messages[{index}].content",
        code="invalid_type",
    )


def model_field(body: dict[str, Any]) -> str:
    """The model name for traces and events (``models[0]`` when only ``models`` is given;
    the routing policy parser checks ``models`` itself)."""
    model = body.get("model")
    listed = body.get("models")
    if model is None and isinstance(listed, list) and listed and isinstance(listed[0], str):
        model = listed[0]
    if not isinstance(model, str) or not model.strip():
        raise BadRequest(
            "`model` is required and must be a string",
            param="model",
            code="missing_model" if model is None else "invalid_type",
        )
    if len(model) > 300:
        raise BadRequest("`model` is too long", param="model", code="invalid_value")
    return model.strip()


def chat_request(body: dict[str, Any], *, max_messages: int) -> ChatRequest:
    """Check a chat completion body; raises ``BadRequest`` naming the offending field."""
    model = model_field(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "`messages` must be a non-empty list",
            param="messages",
            code="invalid_type" if messages is not None else "missing_messages",
        )
    if len(messages) > max_messages:
        raise BadRequest(
            f"at most {max_messages} messages are accepted",
            param="messages",
            code="too_many_messages",
        )
    prompt_bytes = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(
                f"messages[{index}] must be an object",
                param=f"messages[{index}]",
                code="invalid_type",
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(
                f"messages[{index}].role must be one of {sorted(ROLES)}",
                param=f"messages[{index}].role",
                code="invalid_value",
            )
        prompt_bytes += _content_bytes(message.get("content"), index)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("`stream` must be a boolean", param="stream", code="invalid_type")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise BadRequest(
            "`stream_options` must be an object", param="stream_options", code="invalid_type"
        )
    include_usage = bool(stream_options and stream_options.get("include_usage") is True)
    max_tokens = _int_field(body, "max_tokens", minimum=1, maximum=1_000_000)
    max_completion = _int_field(body, "max_completion_tokens", minimum=1, maximum=1_000_000)
    if max_completion is not None:
        max_tokens = min(max_tokens or max_completion, max_completion)
    _number_field(body, "temperature", minimum=0, maximum=2)
    _number_field(body, "top_p", minimum=0, maximum=1)
    _int_field(body, "n", minimum=1, maximum=1)
    return ChatRequest(
        body=body,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        prompt_bytes=prompt_bytes,
        message_count=len(messages),
    )


@dataclass(slots=True)
class EmbeddingsRequest:
    body: dict[str, Any]
    model: str
    token_bound: int


MAX_EMBEDDING_INPUTS = 2048


def embeddings_request(body: dict[str, Any]) -> EmbeddingsRequest:
    """Check an embeddings body (``input``: a string, strings, or token arrays)."""
    model = model_field(body)
    raw = body.get("input")
    if raw is None:
        raise BadRequest("`input` is required", param="input", code="missing_input")
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise BadRequest("`input` must not be empty", param="input", code="invalid_value")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise BadRequest(
            f"at most {MAX_EMBEDDING_INPUTS} inputs are accepted",
            param="input",
            code="too_many_inputs",
        )
    bound = 0
    if all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        bound = len(items)  # one array of token ids
    else:
        for index, item in enumerate(items):
            if isinstance(item, str):
                if not item:
                    raise BadRequest(
                        f"input[{index}] is empty", param="input", code="invalid_value"
                    )
                bound += len(item.encode("utf-8", "surrogatepass")) + 2
            elif isinstance(item, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in item
            ):
                bound += len(item)
            else:
                raise BadRequest(
                    "`input` must be a string, a list of strings or token arrays",
                    param="input",
                    code="invalid_type",
                )
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise BadRequest(
            "`encoding_format` must be float or base64",
            param="encoding_format",
            code="invalid_value",
        )
    _int_field(body, "dimensions", minimum=1, maximum=65_536)
    return EmbeddingsRequest(body=body, model=model, token_bound=bound)
