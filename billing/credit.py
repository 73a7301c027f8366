"""Spendable credit in Redis: holds before a request, settlement after it.

The ledger in PostgreSQL is the truth about money that has been charged. The gateway
cannot ask PostgreSQL on every request, so Redis keeps, per organisation, the *spendable*
credit: ledger balance minus holds of requests in flight minus charges already made but
not yet ingested into the ledger. Every change is one atomic Lua script:

* ``reserve``: if spendable >= worst-case cost, subtract it (the hold). Fails closed.
* ``settle``: give back ``hold - actual`` and append the usage event to the stream, in
  the same script, so a charge and its event never part.
* ``adjust`` (after a grant, top-up or refund commits): add the delta if the key exists,
  and bump a version counter, so that a gateway initialising the key from the database
  at the same moment retries instead of storing a stale balance (see ``init``).

Amounts are compared with Lua numbers (doubles): exact up to 2**53 nanos, about
9 million USD per organisation, far above any prepaid balance.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from django.db import transaction

from marketplace.redis_client import sync_client

USAGE_STREAM = "sy:usage"
USAGE_GROUP = "ingest"


def credit_key(organization_id: int) -> str:
    return f"sy:credit:{organization_id}"


def credit_version_key(organization_id: int) -> str:
    return f"sy:credit:ver:{organization_id}"


_RESERVE = """
local v = redis.call('GET', KEYS[1])
if not v then return -1 end
if tonumber(v) < tonumber(ARGV[1]) then return 0 end
redis.call('DECRBY', KEYS[1], ARGV[1])
return 1
"""

_SETTLE = """
local refund = tonumber(ARGV[1])
if refund ~= 0 then redis.call('INCRBY', KEYS[1], ARGV[1]) end
if ARGV[2] ~= '' then redis.call('XADD', KEYS[2], '*', 'e', ARGV[2]) end
return 1
"""

_INIT = """
local ver = redis.call('GET', KEYS[2]) or '0'
if ver ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return 1
"""

_ADJUST = """
redis.call('INCR', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[1]) end
return 1
"""


def adjust_now(organization_id: int, delta: int) -> None:
    sync_client().eval(
        _ADJUST, 2, credit_key(organization_id), credit_version_key(organization_id), delta
    )


def adjust_after_commit(organization_id: int, delta: int) -> None:
    """Apply a committed ledger change to the spendable credit once the transaction commits."""
    transaction.on_commit(lambda: adjust_now(organization_id, delta))


def spendable(organization_id: int) -> int | None:
    """The spendable credit in Redis, or None when the gateway has not loaded it yet."""
    value = sync_client().get(credit_key(organization_id))
    return None if value is None else int(value)


class AsyncCredit:
    """The gateway's side: reserve and settle with one Redis round trip each."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._init = client.register_script(_INIT)

    async def reserve(
        self,
        organization_id: int,
        amount: int,
        load_balance: Callable[[int], Awaitable[int]],
    ) -> bool:
        """Hold ``amount`` nanos; False when the organisation cannot cover it.

        On the organisation's first request (no key yet) the balance is loaded from the
        ledger once, guarded by the version counter against a concurrent grant.
        """
        key = credit_key(organization_id)
        for _ in range(5):
            result = await self._reserve(keys=[key], args=[amount])
            if result != -1:
                return bool(result == 1)
            version = await self._client.get(credit_version_key(organization_id))
            balance = await load_balance(organization_id)
            await self._init(
                keys=[key, credit_version_key(organization_id)],
                args=[balance, (version or b"0").decode()],
            )
        return False

    async def settle(self, organization_id: int, *, refund: int, event: dict[str, Any]) -> None:
        """Return the unused part of a hold and emit the usage event, atomically."""
        payload = orjson.dumps(event).decode() if event else ""
        await self._settle(keys=[credit_key(organization_id), USAGE_STREAM], args=[refund, payload])

    async def release(self, organization_id: int, amount: int) -> None:
        """Give a whole hold back (the request was never answered)."""
        await self.settle(organization_id, refund=amount, event={})
