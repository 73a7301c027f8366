"""Failed authentications per client IP: guessing keys is refused after a few tries.

Only the failure path touches Redis (one pipelined INCR + EXPIRE on a counter per IP and
minute, shared by every replica), so a request with a good key costs no extra round trip.
An IP over the limit is remembered in-process until its window ends and refused before its
key is even looked at: a key guessed right while blocked is refused too, so a blocked
guesser learns nothing. Each replica learns of the block on its first failure from that IP.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import redis.asyncio as aioredis
from django.conf import settings

from routing.errors import RateLimited

logger = logging.getLogger("switchyard.gateway")

WINDOW_SECONDS = 60
COUNTER_PREFIX = "sy:authfail:"


def _now() -> int:
    return time.time_ns() // 1_000_000_000


class AuthFailureLimiter:
    def __init__(self, redis: aioredis.Redis, *, max_blocked: int = 100_000) -> None:
        self._redis = redis
        self._blocked: OrderedDict[str, int] = OrderedDict()  # ip -> epoch second it ends
        self._max = max_blocked

    def check(self, ip: str) -> None:
        """Refuse ``ip`` while it is blocked (no I/O: a dictionary look-up)."""
        until = self._blocked.get(ip)
        if until is None:
            return
        now = _now()
        if until <= now:
            del self._blocked[ip]
            return
        raise _refusal(until - now)

    async def failed(self, ip: str) -> None:
        """Count one failed authentication of ``ip``; raise when it is over the limit."""
        limit = settings.GATEWAY_AUTH_FAILURES_PER_MINUTE
        if limit <= 0:
            return
        now = _now()
        window = now // WINDOW_SECONDS
        key = f"{COUNTER_PREFIX}{ip}:{window}"
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, 2 * WINDOW_SECONDS)
            count, _ = await pipe.execute()
        except Exception:
            # Redis away: the 401 still goes out; the limit is best effort, not a gate.
            logger.warning("auth failure counter unavailable", exc_info=True)
            return
        if int(count) <= limit:
            return
        until = (window + 1) * WINDOW_SECONDS
        self._blocked[ip] = until
        self._blocked.move_to_end(ip)
        while len(self._blocked) > self._max:
            self._blocked.popitem(last=False)
        raise _refusal(until - now)


def _refusal(seconds: int) -> RateLimited:
    seconds = max(1, seconds)
    return RateLimited(
        f"too many failed authentications from your address; retry after {seconds} seconds",
        code="too_many_auth_failures",
        headers={"retry-after": str(seconds)},
    )
