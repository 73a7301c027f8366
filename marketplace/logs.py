"""Structured JSON logs carrying the request id on every line.

The gateway and a Django middleware put the current request id into a context variable;
``RequestIdFilter`` copies it onto every record and ``JsonFormatter`` writes one JSON
object per line. Secrets never reach the logs: API keys and vendor secrets are not logged
anywhere, and ``scrub`` masks anything that looks like a key in messages all the same.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.http import HttpRequest, HttpResponse

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

_SECRET_PATTERNS = re.compile(r"(sy-[0-9a-f]{8}-)[A-Za-z0-9_\-]{8,}|(Bearer\s+)\S+")
_TRUSTED_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def scrub(text: str) -> str:
    return _SECRET_PATTERNS.sub(lambda m: (m.group(1) or m.group(2)) + "[redacted]", text)


def accept_request_id(candidate: str | None, *, trusted: bool) -> str | None:
    """A client-supplied X-Request-ID, if the deployment trusts it and it is well-formed."""
    if trusted and candidate and _TRUSTED_ID.match(candidate):
        return candidate
    return None


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            payload["request_id"] = request_id
        if record.exc_info:
            payload["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(payload, ensure_ascii=False)


class RequestIdMiddleware:
    """Django side: give every page request an id (or accept a trusted one) and echo it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        from django.conf import settings

        request_id = (
            accept_request_id(
                request.headers.get("X-Request-ID"), trusted=settings.TRUST_REQUEST_ID_HEADER
            )
            or f"req-{secrets.token_hex(12)}"
        )
        token = request_id_var.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response["X-Request-ID"] = request_id
        return response
