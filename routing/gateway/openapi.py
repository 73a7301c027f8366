"""The gateway's OpenAPI 3 document, served at ``GET /v1/openapi.json``.

Built and serialised once per process (limits come from settings), so serving it costs a
dictionary lookup and a send. It describes what the gateway itself guarantees: the request
fields it reads and checks (``routing.gateway.validate``, ``routing.policy``), the fields it
adds to the vendor's answer, and its OpenAI-shaped errors with their status codes
(docs/api.md lists every code). Everything else in a body passes through to the vendor,
hence ``additionalProperties: true``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from django.conf import settings

from routing.gateway.validate import MAX_EMBEDDING_INPUTS, ROLES

ERROR_STATUSES: dict[int, str] = {
    400: "Bad input: `invalid_json`, `invalid_type`, `invalid_value`, `missing_*`, ...",
    401: "No, an unknown, a revoked or an expired API key",
    402: "`insufficient_credit`, `key_credit_limit`, `organization_budget` or "
    "`orchestration_budget_exhausted`",
    403: "`insufficient_scope`: the key's scopes do not include this API",
    404: "`model_not_found`, `no_matching_endpoint`, `generation_not_found`, `tool_not_found`",
    409: "`idempotency_in_progress`: the first request with this Idempotency-Key still runs",
    413: "`body_too_large`",
    422: "`idempotency_key_reused`: the Idempotency-Key was used with another body",
    429: "`rate_limited` or `too_many_auth_failures`: see `retry-after`",
    502: "`upstream_failed`, `deadline_exceeded`, `retry_budget_exhausted`",
    503: "`no_available_endpoint`, `state_unavailable`, `auth_unavailable`, "
    "`privacy_guard_unavailable`",
}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/Error{status}"} for status in statuses}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Up to 255 printable ASCII characters; a retry within 24 h with the same "
    "key and body returns the stored answer and is not charged again",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
}

NAME = {"type": "string", "minLength": 1}
NAMES = {"type": "array", "items": NAME}
STRING_OR_LIST = {"oneOf": [NAME, NAMES]}


def _schemas() -> dict[str, Any]:
    price = {"type": "number", "minimum": 0, "description": "USD per million tokens"}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "code": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                    },
                }
            },
        },
        "Provider": {
            "type": "object",
            "description": "Routing preferences; unknown fields are a 400 naming the field",
            "properties": {
                "order": NAMES,
                "only": NAMES,
                "ignore": NAMES,
                "allow_fallbacks": {"type": "boolean"},
                "sort": {
                    "type": "string",
                    "enum": ["price", "latency", "throughput", "quality", "cascade"],
                },
                "max_price": {
                    "type": "object",
                    "properties": {"prompt": price, "completion": price},
                },
                "data_collection": {"type": "string", "enum": ["allow", "deny"]},
                "zdr": {"type": "boolean"},
                "region": STRING_OR_LIST,
                "require_parameters": {"type": "boolean"},
                "min_quality": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "additionalProperties": False,
        },
        "Cascade": {
            "type": "object",
            "properties": {
                "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                "max_tiers": {"type": "integer", "minimum": 2},
            },
        },
        "Message": {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"type": "string", "enum": sorted(ROLES)},
                "content": {
                    "oneOf": [
                        {"type": "string"},
                        {"type": "null"},
                        {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["type"],
                                "properties": {
                                    "type": {"type": "string"},
                                    "text": {"type": "string"},
                                },
                            },
                        },
                    ]
                },
            },
            "additionalProperties": True,
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                "model": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 300,
                    "description": "`vendor/endpoint[@version]`, `tag:<name>[+<name>]` or "
                    "`auto`, with an optional `:floor` or `:nitro` suffix",
                },
                "models": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "messages": {
                    "type": "array",
                    "items": _ref("Message"),
                    "minItems": 1,
                    "maxItems": settings.GATEWAY_MAX_MESSAGES,
                },
                "stream": {"type": "boolean"},
                "stream_options": {
                    "type": "object",
                    "properties": {"include_usage": {"type": "boolean"}},
                },
                "max_tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                "n": {"type": "integer", "minimum": 1, "maximum": 1},
                "provider": _ref("Provider"),
                "cascade": _ref("Cascade"),
                "session_id": {"type": "string"},
                "user": {"type": "string"},
            },
            "additionalProperties": True,
        },
        "Usage": {
            "type": "object",
            "properties": {
                "prompt_tokens": {"type": "integer", "minimum": 0},
                "completion_tokens": {"type": "integer", "minimum": 0},
                "total_tokens": {"type": "integer", "minimum": 0},
                "cost": {"type": "number", "minimum": 0, "description": "USD"},
                "cost_nanos": {"type": "integer", "minimum": 0, "description": "nano-USD"},
            },
        },
        "Switchyard": {
            "type": "object",
            "required": ["request_id"],
            "properties": {
                "request_id": {"type": "string"},
                "vendor": {"type": "string"},
                "endpoint": {"type": "string"},
                "attempts": {"type": "integer", "minimum": 1},
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "model", "choices"],
            "properties": {
                "id": {"type": "string", "description": "Switchyard's request id"},
                "object": {"type": "string"},
                "model": {"type": "string", "description": "the endpoint that served it"},
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": _ref("Usage"),
                "switchyard": _ref("Switchyard"),
            },
        },
        "EmbeddingsRequest": {
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": {"type": "string", "minLength": 1, "maxLength": 300},
                "input": {
                    "oneOf": [
                        {"type": "string", "minLength": 1},
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_EMBEDDING_INPUTS,
                            "items": {"type": "string", "minLength": 1},
                        },
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_EMBEDDING_INPUTS,
                            "items": {"type": "integer"},
                        },
                    ]
                },
                "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                "dimensions": {"type": "integer", "minimum": 1, "maximum": 65_536},
                "provider": _ref("Provider"),
            },
            "additionalProperties": True,
        },
        "Embeddings": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string"},
                "model": {"type": "string"},
                "data": {"type": "array", "items": {"type": "object"}},
                "usage": _ref("Usage"),
                "switchyard": _ref("Switchyard"),
            },
        },
        "ToolList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "function"],
                        "properties": {
                            "type": {"const": "function"},
                            "function": {
                                "type": "object",
                                "required": ["name", "description", "parameters"],
                                "properties": {
                                    "name": {"type": "string", "pattern": "^[a-z0-9_]{1,64}$"},
                                    "description": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                },
            },
        },
        "ToolCallRequest": {
            "type": "object",
            "properties": {
                "arguments": {
                    "type": "object",
                    "required": ["input"],
                    "properties": {
                        "input": {"type": "string", "minLength": 1},
                        "instructions": {"type": "string"},
                        "domain": {"type": "string"},
                        "max_tokens": {"type": "integer", "minimum": 1},
                    },
                },
                "provider": {"type": "object"},
            },
        },
        "ToolResult": {
            "type": "object",
            "required": ["id", "object", "tool", "output"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "tool.result"},
                "tool": {"type": "string"},
                "output": {"type": "string"},
                "model": {"type": "string"},
                "usage": {"type": "object"},
                "cost_nanos": {"type": "integer"},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "object", "owned_by", "kind"],
                        "properties": {
                            "id": {"type": "string"},
                            "object": {"type": "string", "enum": ["model"]},
                            "created": {"type": "integer"},
                            "owned_by": {"type": "string"},
                            "kind": {"type": "string", "enum": ["chat", "embeddings", "tag"]},
                        },
                    },
                },
            },
        },
        "Generation": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "object",
                    "description": "the route trace: candidates, scores, quotes, attempts",
                }
            },
        },
        "FeedbackRequest": {
            "type": "object",
            "required": ["id", "score"],
            "properties": {
                "id": {"type": "string", "minLength": 1, "description": "a request id"},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "comment": {"type": "string"},
            },
        },
        "Feedback": {
            "type": "object",
            "required": ["id", "score", "recorded"],
            "properties": {
                "id": {"type": "string"},
                "score": {"type": "number"},
                "recorded": {"type": "boolean"},
            },
        },
    }


def build_document() -> dict[str, Any]:
    """The gateway's OpenAPI 3.1 document as a dictionary."""
    post_errors = (400, 401, 402, 403, 404, 409, 413, 422, 429, 502, 503)
    # Server-sent events: `chat.completion.chunk` objects, then `data: [DONE]` (not JSON).
    sse: dict[str, Any] = {}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Switchyard gateway",
            "version": "1.0.0",
            "description": "The OpenAI-compatible API (docs/api.md). Every error is "
            '`{"error": {"message", "type", "code", "param"}}`; nothing is charged for one.',
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "operationId": "chat_completions",
                    "summary": "A chat completion, routed to the best endpoint",
                    "parameters": [IDEMPOTENCY_KEY],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}},
                    },
                    "responses": {
                        "200": {
                            "description": "The vendor's answer with Switchyard's fields "
                            "(with `stream: true`, server-sent events)",
                            "content": {
                                "application/json": {"schema": _ref("ChatCompletion")},
                                "text/event-stream": sse,
                            },
                        },
                        **_errors(*post_errors),
                    },
                }
            },
            "/v1/embeddings": {
                "post": {
                    "operationId": "embeddings",
                    "summary": "Embeddings, routed to an embeddings endpoint",
                    "parameters": [IDEMPOTENCY_KEY],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("EmbeddingsRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("Embeddings"), "The vendor's vectors"),
                        **_errors(*post_errors),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "models",
                    "summary": "Endpoints and capability tags this key may use",
                    "responses": {
                        "200": _json(_ref("ModelList"), "Models"),
                        **_errors(401, 403, 429, 503),
                    },
                }
            },
            "/v1/tools": {
                "get": {
                    "operationId": "tools",
                    "summary": "One OpenAI function tool per capability this key may use",
                    "responses": {
                        "200": _json(_ref("ToolList"), "Tools"),
                        **_errors(401, 403, 429, 503),
                    },
                }
            },
            "/v1/tools/{name}": {
                "post": {
                    "operationId": "tool_call",
                    "summary": "Run one tool: a routed, billed, traced request to a specialist",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[a-z0-9_]{1,64}$"},
                        },
                        IDEMPOTENCY_KEY,
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ToolCallRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("ToolResult"), "The specialist's answer"),
                        **_errors(*post_errors),
                    },
                }
            },
            "/v1/generation": {
                "get": {
                    "operationId": "generation",
                    "summary": "The route trace of one of your requests",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1},
                        }
                    ],
                    "responses": {
                        "200": _json(_ref("Generation"), "The trace"),
                        **_errors(400, 401, 403, 404, 429, 503),
                    },
                }
            },
            "/v1/feedback": {
                "post": {
                    "operationId": "feedback",
                    "summary": "Rate one of your answered requests (0..1)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("FeedbackRequest")}},
                    },
                    "responses": {
                        "200": _json(_ref("Feedback"), "Recorded"),
                        **_errors(400, 401, 403, 404, 413, 429, 503),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
            "responses": {
                f"Error{status}": _error_response(text) for status, text in ERROR_STATUSES.items()
            },
        },
    }


@cache
def document_bytes() -> bytes:
    """The document serialised once; every ``GET /v1/openapi.json`` sends these bytes."""
    return orjson.dumps(build_document())
