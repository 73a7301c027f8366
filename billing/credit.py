"""Spendable credit in Redis: holds before a request, settlement after it.

The ledger in PostgreSQL is the truth about money that has been charged. The gateway
cannot ask PostgreSQL on every request, so Redis keeps, per organisation, the *spendable*
credit: ledger balance minus holds of requests in flight minus charges already made but
not yet ingested into the ledger. The gateway's scripts (``routing.live``) hold and settle
against it atomically; this module owns the key names and the control plane's side:

* ``adjust`` (after a grant, top-up or refund commits): add the delta if the key exists,
  and bump a version counter, so that a gateway initialising the key from the database
  at the same moment retries instead of storing a stale balance.

Amounts are compared with Lua numbers (doubles): exact up to 2**53 nanos, about
9 million USD per organisation, far above any prepaid balance.
"""

from __future__ import annotations

from django.db import transaction

from marketplace.redis_client import sync_client

USAGE_STREAM = "sy:usage"
USAGE_GROUP = "ingest"


def credit_key(organization_id: int) -> str:
    return f"sy:credit:{organization_id}"


def credit_version_key(organization_id: int) -> str:
    return f"sy:credit:ver:{organization_id}"


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
