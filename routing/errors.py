"""Errors of the data plane, answered in OpenAI's shape: {"error": {message, type, code}}."""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """An error answered to the client; ``code`` is stable and documented in docs/api.md."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "body_too_large"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class InsufficientCredit(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_credit"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class UpstreamFailed(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class NoCapacity(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "no_available_endpoint"


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "unavailable"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"
