"""The process-wide synchronous Redis client of the control plane and the workers."""

from __future__ import annotations

import redis
from django.conf import settings

_client: redis.Redis | None = None


def sync_client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)
    return _client


def reset_client() -> None:
    """Forget the client (tests that point REDIS_URL elsewhere)."""
    global _client
    _client = None
