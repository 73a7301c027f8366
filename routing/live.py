"""Live state shared by every gateway replica, in Redis, in as few round trips as possible.

One request makes two round trips in steady state:

* ``reserve`` (one Lua script) checks, in this order, the key's rate limit, the endpoint's
  circuit breaker, a capacity slot, the organisation's spendable credit and the key's
  credit limit; only if every check passes does it write anything: the credit hold, the
  key's spend, a capacity lease and the endpoint's utilisation.
* ``settle`` (one Lua script) returns the unused hold, frees the lease, updates the
  circuit breaker, latency and request counters, appends the usage event to the stream and
  stores the route trace — all or nothing.

A failed attempt (fallback) costs one more round trip: ``release``.

Capacity leases are members of a sorted set scored by their expiry, so the slots of a
gateway replica that died (``kill -9``) free themselves after ``lease_ttl`` seconds.
Routing reads no Redis at all: ``LiveCache`` refreshes a local copy of the per-endpoint
numbers a few times a second in the background.

Amounts are compared with Lua numbers (doubles): exact up to 2**53 nanos (about 9 million
USD), far above any balance or hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple, cast

import orjson
import redis.asyncio as aioredis

from billing.credit import USAGE_STREAM, credit_key
from routing.resp import RespClient
from vendors.pricing import LIVE_UTILISATION_FIELD, live_key

logger = logging.getLogger("switchyard.live")

# Each endpoint's live numbers are one hash, ``live_key(id)`` = ``sy:ep:<id>``, so that a
# script reads them in one HMGET and writes them in one HSET. Its fields:
INFLIGHT = "n"  # leases held now
UTILISATION = LIVE_UTILISATION_FIELD  # "u": smoothed utilisation (EWMA)
CIRCUIT = "cb"  # opened-at epoch seconds (absent = closed)
FAILURES = "f"  # consecutive failures
COOLDOWN = "cd"  # epoch seconds until which a 429 asked us to wait
LATENCY = "l"  # EWMA latency in ms
REQUESTS = "r"  # requests served (exploration counts)
OUTCOMES = "ok"  # EWMA of success (1) / vendor failure (0)
THROUGHPUT = "t"  # EWMA of completion tokens per second of a served request (``:nitro``)
# What the router reads, in ``EndpointNumbers`` order.
NUMBER_FIELDS = (
    INFLIGHT,
    UTILISATION,
    CIRCUIT,
    COOLDOWN,
    LATENCY,
    REQUESTS,
    OUTCOMES,
    THROUGHPUT,
)
# zset endpoint -> epoch seconds of the last change to its hash: every script that writes
# one touches it, so a refresh reads only the endpoints that changed. Its members are also
# every endpoint that has live numbers (the sweep and a full read go through them).
TOUCHED = "sy:live:touched"

UTILISATION_ALPHA = 0.3
LATENCY_ALPHA = 0.2


def slots_key(endpoint_id: int) -> str:
    return f"sy:slots:{endpoint_id}"


def trial_key(endpoint_id: int) -> str:
    return f"sy:cbtrial:{endpoint_id}"


def ratelimit_key(key_id: int, window: int) -> str:
    return f"sy:rl:{key_id}:{window}"


def tpm_key(key_id: int, window: int) -> str:
    return f"sy:tpm:{key_id}:{window}"


AFFINITY_TTL_SECONDS = 600


def affinity_key(organization_id: int, session: str) -> str:
    import hashlib

    return f"sy:aff:{organization_id}:{hashlib.sha256(session.encode()).hexdigest()[:32]}"


def orgspend_key(organization_id: int, period: str) -> str:
    return f"sy:orgspend:{organization_id}:{period}"


def keyspend_key(key_id: int, period: str) -> str:
    return f"sy:keyspend:{key_id}:{period}"


def trace_json(trace: dict[str, Any]) -> bytes:
    """A route trace as JSON; one that cannot be serialised becomes a note saying so.

    A trace is an explanation; the settlement it travels with is money. A value orjson
    refuses (an integer beyond 64 bits that some check let through, say) must never stop a
    settlement, and with it the release of the request's hold and capacity slot.
    """
    try:
        return orjson.dumps(trace)
    except (TypeError, ValueError) as exc:
        logger.error("route trace not serialisable (%s); stored without its details", exc)
        return orjson.dumps(
            {"error": f"the trace could not be serialised ({exc})", "outcome": trace.get("outcome")}
        )


def trace_key(request_id: str) -> str:
    return f"sy:trace:{request_id}"


# Every stored trace is also appended here, for ``routing.traces`` to keep in PostgreSQL.
TRACE_STREAM = "sy:traces"


class Verdict(IntEnum):
    OK = 1
    NO_CREDIT = 0
    CREDIT_UNKNOWN = -1
    FULL = -2
    RATE_LIMITED = -3
    CIRCUIT_OPEN = -4
    KEY_LIMIT = -5
    COOLING_DOWN = -6
    KEY_SPEND_UNKNOWN = -7
    RETRY_BUDGET = -8
    ORG_SPEND_UNKNOWN = -9
    ORG_BUDGET = -10


RETRY_RETRYING = "sy:rb:retry"  # zset: retry attempts in flight (lease expiry as score)

# Every request's credit hold is a member of HOLDS scored by its lease's expiry, written by
# reserve and removed by settle or release: ``<lease>|<endpoint>|<credit key>|<hold>|<key
# spend key>|<org spend key>`` (the spend keys '' when not limited), so that the sweep can
# give back the hold and the slot of a request whose gateway died from the member alone.
# HOLDS also counts the requests in flight for the retry budget. An orchestrated request's
# budget hold (whose amount its legs draw down) is a member of BUDGETS, its amount in
# HOLD_INFO.
HOLDS = "sy:holds"
BUDGETS = "sy:budgets"
HOLD_INFO = "sy:holdinfo"
# Reads a HOLDS member; the lease is whatever precedes the last five fields.
HOLD_PATTERN = "^(.*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$"


_RESERVE = """
local credit, slots, rl, keyspend, trial = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local tpm_key, tpm = KEYS[6], tonumber(ARGV[14])
local hold, capacity, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now, lease_ttl, ep = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local rpm, rl_ttl, key_limit = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local alpha, cooldown, trial_ttl = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local spend_ttl, attempt = tonumber(ARGV[13]), tonumber(ARGV[15])
local budget_ratio, budget_min = tonumber(ARGV[16]), tonumber(ARGV[17])
local orgspend, org_budget, org_ttl = KEYS[7], tonumber(ARGV[18]), tonumber(ARGV[19])
local budget_lease = ARGV[20]
-- Leases expire at their score: what is held now scores above now. (Expired ones stay
-- until the sweep gives their holds back.)
local unexpired = '(' .. ARGV[4]

-- Retry budget shared by every replica (Envoy's rule): retries in flight may not exceed
-- max(budget_min, budget_ratio * requests in flight), so a failing vendor cannot multiply
-- the load on the others. A request in flight holds one lease (a failed attempt's is
-- released before the next is reserved), so the holds count the requests.
if attempt > 0 then
  redis.call('ZREMRANGEBYSCORE', 'sy:rb:retry', '-inf', now)
  local active = redis.call('ZCOUNT', 'sy:holds', unexpired, '+inf')
  local retrying = redis.call('ZCARD', 'sy:rb:retry')
  if retrying >= math.max(budget_min, budget_ratio * active) then return {-8, 0, 0} end
end

-- A request counts once against the key's requests per minute: a fallback hop (attempt > 0)
-- is the same request, already counted, and is neither refused nor counted again.
local used = 0
if rpm > 0 then
  used = tonumber(redis.call('GET', rl) or '0')
  if used >= rpm and attempt == 0 then return {-3, 0, redis.call('TTL', rl)} end
end
local tokens_used = 0
if tpm > 0 then
  tokens_used = tonumber(redis.call('GET', tpm_key) or '0')
  if tokens_used >= tpm then return {-3, 0, redis.call('TTL', tpm_key)} end
end
local live = 'sy:ep:' .. ep
local state = redis.call('HMGET', live, 'cd', 'cb', 'u')
local wait, opened = state[1], state[2]
if wait and tonumber(wait) > now then return {-6, 0, 0} end
local half_open = false
if opened then
  if now - tonumber(opened) < cooldown then return {-4, 0, 0} end
  if not redis.call('SET', trial, lease, 'NX', 'EX', trial_ttl) then return {-4, 0, 0} end
  half_open = true
end
local n = redis.call('ZCOUNT', slots, unexpired, '+inf')
if n >= capacity then
  if half_open then redis.call('DEL', trial) end
  return {-2, 0, 0}
end
local balance = redis.call('GET', credit)
if not balance then
  if half_open then redis.call('DEL', trial) end
  return {-1, 0, 0}
end
-- A leg of an orchestrated request draws first on the budget held for the whole request
-- (see budget_open); beyond it, on the spendable credit like any request.
local take, budget_info = 0, nil
if budget_lease ~= '' then
  budget_info = redis.call('HGET', 'sy:holdinfo', budget_lease)
  if budget_info then
    take = math.min(tonumber(string.match(budget_info, '^[^|]*|([^|]*)')), hold)
  end
end
if tonumber(balance) + take < hold then
  if half_open then redis.call('DEL', trial) end
  return {0, 0, 0}
end
if key_limit >= 0 then
  local spent = redis.call('GET', keyspend)
  if not spent then
    if half_open then redis.call('DEL', trial) end
    return {-7, 0, 0}
  end
  if tonumber(spent) + hold > key_limit then
    if half_open then redis.call('DEL', trial) end
    return {-5, 0, 0}
  end
end
if org_budget >= 0 then
  local org_spent = redis.call('GET', orgspend)
  if not org_spent then
    if half_open then redis.call('DEL', trial) end
    return {-9, 0, 0}
  end
  if tonumber(org_spent) + hold > org_budget then
    if half_open then redis.call('DEL', trial) end
    return {-10, 0, 0}
  end
end

redis.call('DECRBY', credit, hold - take)
if take > 0 then
  local bcredit, bamount, brest = string.match(budget_info, '^([^|]*)|([^|]*)|(.*)$')
  redis.call('HSET', 'sy:holdinfo', budget_lease,
    bcredit .. '|' .. string.format('%d', tonumber(bamount) - take) .. '|' .. brest)
end
local spend_key, org_key = '', ''
if key_limit >= 0 then spend_key = keyspend end
if org_budget >= 0 then
  org_key = orgspend
  redis.call('INCRBY', orgspend, hold)
  redis.call('EXPIRE', orgspend, org_ttl)
end
-- Remember the hold, with what to give back, so that it comes back by itself if this
-- gateway dies (sweep_holds). ARGV[1], not ``hold``: a number would print as 1e+14.
local held = lease .. '|' .. ep .. '|' .. credit .. '|' .. ARGV[1] .. '|' .. spend_key .. '|'
  .. org_key
redis.call('ZADD', 'sy:holds', now + lease_ttl, held)
if key_limit >= 0 then
  redis.call('INCRBY', keyspend, hold)
  redis.call('EXPIRE', keyspend, spend_ttl)
end
if rpm > 0 and attempt == 0 then
  used = redis.call('INCR', rl)
  if used == 1 then redis.call('EXPIRE', rl, rl_ttl) end
end
redis.call('ZADD', slots, now + lease_ttl, lease)
if attempt > 0 then redis.call('ZADD', 'sy:rb:retry', now + lease_ttl, lease) end
local u = tonumber(state[3] or '0')
redis.call('HSET', live, 'n', n + 1, 'u', u + alpha * ((n + 1) / capacity - u))
redis.call('ZADD', 'sy:live:touched', now, ep)
return {1, rpm - used, half_open and 1 or 0, tpm - tokens_used, held}
"""

# Shared tail of release and settle: free the lease, update the endpoint's live numbers
# (one HMGET, one HSET) and its circuit.
_FINISH = """
-- ``held``: the hold's member of sy:holds (reserve returned it). ``unexpired``: '(' .. now.
-- ``flags``: 1 if the reservation was a retry (its lease is in sy:rb:retry), + 2 if it was
-- a half-open circuit's trial (its lease may be the trial key's value); otherwise neither
-- can hold the lease, and the two commands are skipped. ``latency`` < 0: not measured;
-- ``served`` = 1 counts a request served (settle), whose ``completion`` tokens over its
-- latency make the throughput average.
local function finish(slots, trial, lease, held, ep, capacity, now, unexpired, alpha, failed,
                      threshold, flags, latency, lat_alpha, served, completion)
  redis.call('ZREM', 'sy:holds', held)
  redis.call('ZREM', slots, lease)
  if flags % 2 == 1 then redis.call('ZREM', 'sy:rb:retry', lease) end
  local n = redis.call('ZCOUNT', slots, unexpired, '+inf')
  local live = 'sy:ep:' .. ep
  local state = redis.call('HMGET', live, 'u', 'ok', 'l', 'f', 'r', 't')
  local u = tonumber(state[1] or '0')
  local fields = {'n', n, 'u', u + alpha * (n / capacity - u)}
  local was_trial = flags >= 2 and redis.call('GET', trial) == lease
  if was_trial then redis.call('DEL', trial) end
  if failed == 1 then
    local fails = tonumber(state[4] or '0') + 1
    fields[#fields + 1], fields[#fields + 2] = 'f', fails
    if was_trial or fails >= threshold then
      fields[#fields + 1], fields[#fields + 2] = 'cb', now
    end
    local ok = tonumber(state[2] or '1')
    fields[#fields + 1], fields[#fields + 2] = 'ok', ok + 0.1 * (0 - ok)
  elseif failed == 0 then
    -- The scripts open a circuit only beside a failure count (above) and close both
    -- together: with no count there is no circuit to close, unless this was the trial of
    -- one (opened some other way), which always closes it.
    if state[4] or flags >= 2 then redis.call('HDEL', live, 'f', 'cb') end
    local ok = tonumber(state[2] or '1')
    fields[#fields + 1], fields[#fields + 2] = 'ok', ok + 0.1 * (1 - ok)
  end
  if latency >= 0 then
    local l = tonumber(state[3] or latency)
    fields[#fields + 1], fields[#fields + 2] = 'l', l + lat_alpha * (latency - l)
  end
  if served == 1 then
    fields[#fields + 1], fields[#fields + 2] = 'r', tonumber(state[5] or '0') + 1
    if latency > 0 and completion > 0 then
      local tps = completion * 1000 / latency
      local t = tonumber(state[6] or tps)
      fields[#fields + 1], fields[#fields + 2] = 't', t + lat_alpha * (tps - t)
    end
  end
  redis.call('HSET', live, unpack(fields))
  redis.call('ZADD', 'sy:live:touched', now, ep)
end
"""

_RELEASE = (
    _FINISH
    + """
local credit, slots, keyspend, trial, orgspend = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local hold, lease, now, ep = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local capacity, alpha, failed = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local threshold, retry_until = tonumber(ARGV[8]), tonumber(ARGV[9])
local flags, held = tonumber(ARGV[10]), ARGV[11]
redis.call('INCRBY', credit, hold)
if keyspend ~= '' then redis.call('DECRBY', keyspend, hold) end
if orgspend ~= '' then redis.call('DECRBY', orgspend, hold) end
finish(slots, trial, lease, held, ep, capacity, now, '(' .. ARGV[3], alpha, failed, threshold,
       flags, -1, 0, 0, 0)
if retry_until > now then redis.call('HSET', 'sy:ep:' .. ep, 'cd', retry_until) end
return 1
"""
)

# Shared by settle and the spool replay: Redis's copy of a trace, and its entry in the
# capped stream that ``routing.traces`` moves to PostgreSQL (``LiveState._put_trace`` is the
# same two commands for the traces written outside a script).
STORE_TRACE = """
local function store_trace(key, stream, json, ttl, maxlen)
  redis.call('SET', key, json, 'EX', ttl)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 't', json)
end
"""

_SETTLE = (
    _FINISH
    + STORE_TRACE
    + """
local credit, slots, keyspend, trial = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stream, trace, tpm_key, affinity = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local orgspend, traces = KEYS[9], KEYS[10]
local refund, lease, now, ep = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local capacity, alpha, failed = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local threshold, latency, lat_alpha = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local event, trace_json, trace_ttl = ARGV[11], ARGV[12], tonumber(ARGV[13])
local tokens, held, flags = tonumber(ARGV[14]), ARGV[16], tonumber(ARGV[17])
if affinity ~= '' and failed == 0 then redis.call('SET', affinity, ep, 'EX', ARGV[15]) end
if tpm_key ~= '' and tokens > 0 then
  redis.call('INCRBY', tpm_key, tokens)
  redis.call('EXPIRE', tpm_key, 61)
end
if tonumber(refund) ~= 0 then
  redis.call('INCRBY', credit, refund)
  if keyspend ~= '' then redis.call('DECRBY', keyspend, refund) end
  if orgspend ~= '' then redis.call('DECRBY', orgspend, refund) end
end
finish(slots, trial, lease, held, ep, capacity, now, '(' .. ARGV[3], alpha, failed, threshold,
       flags, latency, lat_alpha, 1, tonumber(ARGV[19]))
if event ~= '' then redis.call('XADD', stream, '*', 'e', event) end
if trace_json ~= '' then store_trace(trace, traces, trace_json, trace_ttl, ARGV[18]) end
return 1
"""
)

# Give back the holds of requests whose gateway died before settling (their lease expired),
# and of orchestrated requests' budgets likewise.
# Shared by the sweep and the spool replay: return ``amount`` to an organisation's credit
# and take it off the key's and organisation's spend ('' = not limited), for the keys Redis
# still has (after a data loss they are rebuilt from the ledger).
GIVE_BACK = """
local function give_back(credit, amount, keyspend, orgspend)
  if redis.call('EXISTS', credit) == 1 then redis.call('INCRBY', credit, amount) end
  if keyspend ~= '' and redis.call('EXISTS', keyspend) == 1 then
    redis.call('DECRBY', keyspend, amount)
  end
  if orgspend ~= '' and redis.call('EXISTS', orgspend) == 1 then
    redis.call('DECRBY', orgspend, amount)
  end
end
"""

_SWEEP = (
    GIVE_BACK
    + """
local now = ARGV[1]
-- A budget's amount (or that of a hold written by an older gateway, before holds carried
-- their amounts) is in sy:holdinfo.
local function give_back_info(lease)
  local info = redis.call('HGET', 'sy:holdinfo', lease)
  if info then
    local credit, amount, keyspend, orgspend = string.match(info, '^([^|]*)|([^|]*)|([^|]*)|?(.*)$')
    give_back(credit, amount, keyspend, orgspend or '')
  end
  redis.call('HDEL', 'sy:holdinfo', lease)
end
-- Each expired hold names its lease's endpoint: free that slot there and recount the
-- in-flight number the routers read, or the endpoint would look busier than it is (full,
-- at worst) until a script next touches it. The work follows the expired holds, not the
-- endpoints: this script holds Redis for every replica while it runs.
local recount = {}
local expired = redis.call('ZRANGEBYSCORE', 'sy:holds', '-inf', now, 'LIMIT', 0, 500)
for _, held in ipairs(expired) do
  local lease, ep, credit, amount, keyspend, orgspend = string.match(held, ARGV[2])  -- HOLD_PATTERN
  if lease then
    give_back(credit, amount, keyspend, orgspend)
    redis.call('ZREM', 'sy:slots:' .. ep, lease)
    recount[ep] = true
  else
    give_back_info(held)
  end
  redis.call('ZREM', 'sy:holds', held)
end
local budgets = redis.call('ZRANGEBYSCORE', 'sy:budgets', '-inf', now, 'LIMIT', 0, 500)
for _, lease in ipairs(budgets) do
  give_back_info(lease)
  redis.call('ZREM', 'sy:budgets', lease)
end
for ep in pairs(recount) do
  local n = redis.call('ZCOUNT', 'sy:slots:' .. ep, '(' .. now, '+inf')
  redis.call('HSET', 'sy:ep:' .. ep, 'n', n)
  redis.call('ZADD', 'sy:live:touched', now, ep)
end
return #expired + #budgets
"""
)

# Orchestrated requests: one hold for the whole request, taken before its first step.
# It lives in sy:budgets, its amount in sy:holdinfo, so the sweep returns it if the gateway
# dies; each leg's reserve moves what it needs from it (see _RESERVE), budget_close returns
# the rest.
_BUDGET_OPEN = """
local credit, lease = KEYS[1], ARGV[1]
local amount, expires = tonumber(ARGV[2]), tonumber(ARGV[3])
local balance = redis.call('GET', credit)
if not balance then return -1 end
if tonumber(balance) < amount then return 0 end
redis.call('DECRBY', credit, amount)
redis.call('ZADD', 'sy:budgets', expires, lease)
redis.call('HSET', 'sy:holdinfo', lease, credit .. '|' .. ARGV[2] .. '||')
return 1
"""

_BUDGET_CLOSE = """
local lease = ARGV[1]
local info = redis.call('HGET', 'sy:holdinfo', lease)
if not info then return -1 end
local credit, amount = string.match(info, '^([^|]*)|([^|]*)')
if redis.call('EXISTS', credit) == 1 then redis.call('INCRBY', credit, amount) end
redis.call('ZREM', 'sy:budgets', lease)
redis.call('ZREM', 'sy:holds', lease)  -- opened by an older gateway
redis.call('HDEL', 'sy:holdinfo', lease)
return tonumber(amount)
"""

_INIT_CREDIT = """
local ver = redis.call('GET', KEYS[2]) or '0'
if ver ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return 1
"""


@dataclass(frozen=True, slots=True)
class LiveConfig:
    lease_ttl: int = 300  # > the total request deadline: a live request never outlives it
    circuit_threshold: int = 5
    circuit_cooldown: float = 30.0
    trial_ttl: int = 60
    trace_ttl: int = 3600  # Redis's copy; PostgreSQL keeps traces longer (routing.traces)
    trace_stream_maxlen: int = 200_000  # entries waiting for ingest; the oldest go beyond
    retry_budget_ratio: float = 0.2
    retry_budget_min: int = 3


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one successful ``reserve`` holds; given back to ``release`` or ``settle``."""

    organization_id: int
    endpoint_id: int
    capacity: int
    hold: int
    lease: str
    held: str  # the hold's member of HOLDS
    keyspend: str  # '' when the key has no credit limit
    half_open_trial: bool
    ratelimit_remaining: int
    retry: bool = False  # reserved by a fallback hop (counted in the shared retry budget)
    tpm_key: str = ""  # '' when the key has no tokens-per-minute limit
    tokens_remaining: int = 0
    orgspend: str = ""  # '' when the organisation has no monthly budget


@dataclass(frozen=True, slots=True)
class ReserveResult:
    verdict: Verdict
    reservation: Reservation | None = None
    retry_after: int = 0


class LiveState:
    """The gateway's Redis scripts (one client per event loop)."""

    def __init__(
        self,
        client: aioredis.Redis,
        config: LiveConfig | None = None,
        *,
        fast: RespClient | None = None,
    ) -> None:
        self.client = client
        self.config = config or LiveConfig()
        # The hot path's scripts (reserve, release, settle) go through ``fast`` when given:
        # one pipelined connection, a fraction of redis-py's CPU per call.
        self.fast = fast
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)
        self._settle = client.register_script(_SETTLE)
        self._init_credit = client.register_script(_INIT_CREDIT)
        self._sweep = client.register_script(_SWEEP)
        self._budget_open = client.register_script(_BUDGET_OPEN)
        self._budget_close = client.register_script(_BUDGET_CLOSE)
        if fast is not None:
            for text in (_RESERVE, _RELEASE, _SETTLE):
                fast.preload(text)

    async def _hot(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        if self.fast is not None:
            return await self.fast.evalsha(script.sha, script.script, keys, args)
        return await script(keys=keys, args=args)

    def _hot_now(self, script: Any, keys: list[Any], args: list[Any]) -> Awaitable[Any]:
        if self.fast is not None:
            return self.fast.evalsha_now(script.sha, script.script, keys, args)
        return cast(Awaitable[Any], script(keys=keys, args=args))  # sent when awaited

    async def init_credit(self, organization_id: int, balance: int, version: bytes | None) -> None:
        from billing.credit import credit_version_key

        await self._init_credit(
            keys=[credit_key(organization_id), credit_version_key(organization_id)],
            args=[balance, (version or b"0").decode()],
        )

    async def init_keyspend(self, key_id: int, period: str, spent: int, ttl: int) -> None:
        await self.client.set(keyspend_key(key_id, period), spent, nx=True, ex=ttl)

    async def init_orgspend(self, organization_id: int, period: str, spent: int, ttl: int) -> None:
        await self.client.set(orgspend_key(organization_id, period), spent, nx=True, ex=ttl)

    async def credit_version(self, organization_id: int) -> bytes | None:
        from billing.credit import credit_version_key

        value = await self.client.get(credit_version_key(organization_id))
        return value.encode() if isinstance(value, str) else value

    async def reserve(
        self,
        *,
        organization_id: int,
        key_id: int,
        endpoint_id: int,
        capacity: int,
        hold: int,
        lease: str,
        rate_limit_rpm: int | None,
        key_credit_limit: int | None,
        rate_limit_tpm: int | None = None,
        attempt: int = 0,
        org_budget: int | None = None,
        org_period: str = "",
        org_period_ttl: int = 0,
        key_period: str,
        key_period_ttl: int,
        budget_lease: str = "",
    ) -> ReserveResult:
        now = time.time()
        window = int(now // 60)
        keyspend = keyspend_key(key_id, key_period) if key_credit_limit is not None else ""
        result = await self._hot(
            self._reserve,
            keys=[
                credit_key(organization_id),
                slots_key(endpoint_id),
                ratelimit_key(key_id, window),
                keyspend or "sy:none",
                trial_key(endpoint_id),
                tpm_key(key_id, window),
                orgspend_key(organization_id, org_period) if org_budget is not None else "sy:none",
            ],
            args=[
                hold,
                capacity,
                lease,
                repr(now),
                self.config.lease_ttl,
                endpoint_id,
                rate_limit_rpm or 0,
                61,
                -1 if key_credit_limit is None else key_credit_limit,
                UTILISATION_ALPHA,
                self.config.circuit_cooldown,
                self.config.trial_ttl,
                key_period_ttl,
                rate_limit_tpm or 0,
                attempt,
                self.config.retry_budget_ratio,
                self.config.retry_budget_min,
                -1 if org_budget is None else org_budget,
                org_period_ttl,
                budget_lease,
            ],
        )
        verdict = Verdict(int(result[0]))
        if verdict is not Verdict.OK:
            retry = int(result[2]) if verdict is Verdict.RATE_LIMITED else 0
            return ReserveResult(verdict, retry_after=max(retry, 1) if retry else 0)
        return ReserveResult(
            verdict,
            Reservation(
                organization_id=organization_id,
                endpoint_id=endpoint_id,
                capacity=capacity,
                hold=hold,
                lease=lease,
                held=_text(result[4]),
                keyspend=keyspend,
                half_open_trial=bool(int(result[2])),
                retry=attempt > 0,
                ratelimit_remaining=int(result[1]),
                tpm_key=tpm_key(key_id, window) if rate_limit_tpm else "",
                tokens_remaining=int(result[3]),
                orgspend=orgspend_key(organization_id, org_period)
                if org_budget is not None
                else "",
            ),
        )

    async def release(
        self, reservation: Reservation, *, vendor_failed: bool | None, retry_until: float = 0.0
    ) -> None:
        """Give a whole hold back; ``vendor_failed`` feeds the circuit breaker (None: neutral)."""
        await self._hot(
            self._release,
            keys=[
                credit_key(reservation.organization_id),
                slots_key(reservation.endpoint_id),
                reservation.keyspend,
                trial_key(reservation.endpoint_id),
                reservation.orgspend,
            ],
            args=[
                reservation.hold,
                reservation.lease,
                repr(time.time()),
                reservation.endpoint_id,
                reservation.capacity,
                UTILISATION_ALPHA,
                _failed_flag(vendor_failed),
                self.config.circuit_threshold,
                repr(retry_until),
                _finish_flags(reservation),
                reservation.held,
            ],
        )

    async def settle(self, reservation: Reservation, **settlement: Any) -> None:
        """Charge ``cost`` (never more than the hold), free the slot, emit event and trace;
        ``tokens`` count towards the key's tokens-per-minute limit (see ``settle_now``)."""
        await self.settle_now(reservation, **settlement)

    def settle_now(
        self,
        reservation: Reservation,
        *,
        cost: int,
        vendor_failed: bool,
        latency_ms: float | None,
        event: dict[str, Any] | None,
        request_id: str,
        trace: dict[str, Any] | None,
        tokens: int = 0,
        completion_tokens: int = 0,
        affinity_key: str | None = None,
    ) -> Awaitable[Any]:
        """``settle``, written to Redis before this returns (on the gateway's pipelined
        client): the caller sends its answer and then awaits the result, so the answer
        never waits for Redis, and Redis has the settlement before the client has the
        answer. A Redis error is raised by the await."""
        return self._hot_now(
            self._settle,
            keys=[
                credit_key(reservation.organization_id),
                slots_key(reservation.endpoint_id),
                reservation.keyspend,
                trial_key(reservation.endpoint_id),
                USAGE_STREAM,
                trace_key(request_id),
                reservation.tpm_key,
                affinity_key or "",
                reservation.orgspend,
                TRACE_STREAM,
            ],
            args=[
                reservation.hold - cost,
                reservation.lease,
                repr(time.time()),
                reservation.endpoint_id,
                reservation.capacity,
                UTILISATION_ALPHA,
                _failed_flag(vendor_failed),
                self.config.circuit_threshold,
                -1 if latency_ms is None else latency_ms,
                LATENCY_ALPHA,
                orjson.dumps(event).decode() if event else "",
                trace_json(trace).decode() if trace else "",
                self.config.trace_ttl,
                tokens,
                AFFINITY_TTL_SECONDS,
                reservation.held,
                _finish_flags(reservation),
                self.config.trace_stream_maxlen,
                completion_tokens,
            ],
        )

    async def emit(
        self, *, event: dict[str, Any], request_id: str, trace: dict[str, Any] | None
    ) -> None:
        """Record a request that holds nothing (every vendor failed): event and trace only."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(USAGE_STREAM, {"e": orjson.dumps(event)})
        if trace:
            self._put_trace(pipe, request_id, trace)
        await pipe.execute()

    async def budget_open(
        self, organization_id: int, amount: int, lease: str, ttl: float
    ) -> Verdict:
        """Hold ``amount`` of the organisation's credit for a whole orchestrated request.

        OK, NO_CREDIT, or CREDIT_UNKNOWN (load the balance, ``init_credit``, try again).
        """
        result = await self._budget_open(
            keys=[credit_key(organization_id)], args=[lease, amount, repr(time.time() + ttl)]
        )
        return {1: Verdict.OK, 0: Verdict.NO_CREDIT}.get(int(result), Verdict.CREDIT_UNKNOWN)

    async def budget_remaining(self, lease: str) -> int:
        """What is left of a budget hold (0 once closed or swept)."""
        info = await self.client.hget(HOLD_INFO, lease)
        if info is None:
            return 0
        text = info.decode() if isinstance(info, bytes) else str(info)
        return int(text.split("|")[1])

    async def budget_close(self, lease: str) -> int:
        """Return what is left of a budget hold to the credit; safe to repeat."""
        return max(int(await self._budget_close(keys=[], args=[lease])), 0)

    async def sweep_holds(self) -> int:
        """Return expired holds (their gateway died mid-request) to the credit; any replica
        may run it, each expired hold is returned once."""
        return int(await self._sweep(keys=[], args=[repr(time.time()), HOLD_PATTERN]))

    async def affinity(self, key: str) -> int | None:
        value = await self.client.get(key)
        return int(value) if value is not None else None

    async def store_trace(self, request_id: str, trace: dict[str, Any]) -> None:
        """Write (or rewrite) a trace: Redis's copy and the stream to PostgreSQL."""
        pipe = self.client.pipeline(transaction=True)
        self._put_trace(pipe, request_id, trace)
        await pipe.execute()

    def _put_trace(self, pipe: Any, request_id: str, trace: dict[str, Any]) -> None:
        text = trace_json(trace)
        pipe.set(trace_key(request_id), text, ex=self.config.trace_ttl)
        pipe.xadd(
            TRACE_STREAM,
            {"t": text},
            maxlen=self.config.trace_stream_maxlen,
            approximate=True,
        )

    async def trace(self, request_id: str) -> dict[str, Any] | None:
        raw = await self.client.get(trace_key(request_id))
        if raw is None:
            return None
        loaded: dict[str, Any] = orjson.loads(raw)
        return loaded


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _finish_flags(reservation: Reservation) -> int:
    """The ``flags`` argument of the scripts' ``finish`` (see there)."""
    return (1 if reservation.retry else 0) + (2 if reservation.half_open_trial else 0)


# The platform's health probe (``vendors.services.endpoint_probe_health``, Celery beat every
# 30 s) feeds the same circuit as requests do. A failed probe counts as a failure: enough of
# them in a row open the circuit (an open one restarts its cooldown), so an endpoint that
# died while nobody called it is skipped before a customer's request finds out. A healthy
# probe closes an open circuit once its cooldown is over, standing in for the trial request,
# unless a trial is in flight (its outcome decides); it leaves a closed circuit's failure
# count alone (a model can answer the probe and still fail real requests).
_PROBE = """
local live, trial = KEYS[1], KEYS[2]
local ok, now, threshold, cooldown = ARGV[1] == '1', tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local state = redis.call('HMGET', live, 'f', 'cb')
local opened = state[2] and tonumber(state[2])
if ok then
  if opened and now - opened >= cooldown and redis.call('EXISTS', trial) == 0 then
    redis.call('HDEL', live, 'f', 'cb')
    redis.call('ZADD', 'sy:live:touched', now, ARGV[5])
    return 'closed'
  end
  return opened and 'open' or 'closed'
end
local fails = tonumber(state[1] or '0') + 1
if opened or fails >= threshold then
  redis.call('HSET', live, 'f', fails, 'cb', now)
  redis.call('ZADD', 'sy:live:touched', now, ARGV[5])
  return 'open'
end
redis.call('HSET', live, 'f', fails)
return 'closed'
"""


def record_health_probe(
    client: Any,
    endpoint_id: int,
    *,
    ok: bool,
    threshold: int,
    cooldown: float,
    now: float | None = None,
) -> str:
    """Feed one health probe's outcome to the endpoint's circuit (see ``_PROBE``) with a
    synchronous Redis client; returns the circuit's state after it, ``open`` or ``closed``."""
    state = client.eval(
        _PROBE,
        2,
        live_key(endpoint_id),
        trial_key(endpoint_id),
        "1" if ok else "0",
        repr(time.time() if now is None else now),
        threshold,
        cooldown,
        endpoint_id,
    )
    return state.decode() if isinstance(state, bytes) else str(state)


def _failed_flag(vendor_failed: bool | None) -> int:
    if vendor_failed is None:
        return -1
    return 1 if vendor_failed else 0


class EndpointNumbers(NamedTuple):
    """What the router may know about an endpoint without asking Redis.

    A named tuple: a refresh makes one per endpoint (10,000 every 250 ms in a large
    marketplace), and a frozen dataclass costs a ``__setattr__`` per field to build.
    """

    inflight: int = 0
    utilisation: float = 0.0
    circuit_opened_at: float | None = None
    cooldown_until: float = 0.0
    latency_ms: float | None = None
    requests: int = 0
    success_ratio: float | None = None
    throughput_tps: float | None = None


def read_numbers(ids: list[bytes], rows: list[list[bytes | None]]) -> dict[int, EndpointNumbers]:
    """Endpoints' live hashes (their ``NUMBER_FIELDS``, None where absent) as numbers.

    Parsed as two JSON arrays, ids and values, in two C calls: one parse per field (70,000
    per refresh over 10,000 endpoints) took 125 ms of the event loop. orjson reads an int or
    a float without a conversion of our own, and refuses "nan" and "inf"; where any value
    (or an id) is not a finite number, the rows are read field by field instead, leaving
    those fields (or rows) out. An endpoint with none of the fields but its success ratio
    has no numbers (as one with no hash at all).
    """
    if not ids:
        return {}
    keys, flat = _parse_all_at_once(ids, rows) or _parse_one_by_one(ids, rows)
    numbers = {}
    values = iter(flat)
    grouped = zip(*[values] * len(NUMBER_FIELDS), strict=False)  # lengths checked
    for ep, (n, u, cb, cd, lat, r, ok, t) in zip(keys, grouped, strict=True):
        if ep is None or (
            n is None and u is None and cb is None and cd is None and lat is None and r is None
        ):
            continue  # not an endpoint id, or nothing but a success ratio
        numbers[ep] = EndpointNumbers(  # positionally: the fields in their order
            int(n or 0), u or 0.0, cb, cd or 0.0, lat, int(r or 0), ok, t
        )
    return numbers


_Parsed = tuple[list[int | None], list[int | float | None]]
_INT, _NUMBER_OR_NONE = frozenset((int,)), frozenset((int, float, type(None)))


def _parse_all_at_once(ids: list[bytes], rows: list[list[bytes | None]]) -> _Parsed | None:
    """Ids and values (row after row) in two C parses; None if anything is not as stored."""
    try:
        keys = orjson.loads(b"[" + b",".join(ids) + b"]")
        flat = orjson.loads(
            b"[" + b",".join([b"null" if v is None else v for row in rows for v in row]) + b"]"
        )
    except orjson.JSONDecodeError:
        return None
    if (
        len(keys) != len(ids)
        or len(rows) != len(ids)
        or len(flat) != len(NUMBER_FIELDS) * len(ids)  # a value with a comma, a short row
        or not set(map(type, keys)) <= _INT
        or not set(map(type, flat)) <= _NUMBER_OR_NONE  # (map and set: C loops)
    ):
        return None
    return keys, flat


def _parse_one_by_one(ids: list[bytes], rows: list[list[bytes | None]]) -> _Parsed:
    """The same, one field at a time: an id that is not one is None (its row skipped), a
    value that is not a finite number None (that field left out)."""
    keys: list[int | None] = []
    flat: list[int | float | None] = []
    for field, row in zip(ids, rows, strict=False):
        if len(row) != len(NUMBER_FIELDS):
            continue
        ep = _finite_or_none(field)
        keys.append(ep if type(ep) is int else None)
        flat.extend(_finite_or_none(raw) for raw in row)
    return keys, flat


def _finite_or_none(raw: bytes | None) -> int | float | None:
    if raw is None:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if type(value) in (int, float) and math.isfinite(value) else None


def read_numbers_now(client: Any, endpoint_ids: list[int]) -> dict[int, EndpointNumbers]:
    """The live numbers of ``endpoint_ids``, read with a synchronous redis-py client (the
    dashboards' tasks and pages): one pipelined HMGET per endpoint."""
    pipe = client.pipeline(transaction=False)
    for ep in endpoint_ids:
        pipe.hmget(live_key(ep), NUMBER_FIELDS)
    rows = pipe.execute()
    return read_numbers([str(ep).encode() for ep in endpoint_ids], rows)


# The endpoints whose live numbers changed since ARGV[1] (epoch seconds), at most ARGV[2] of
# them (more: the ids alone, and the caller reads everything), each with its numbers
# (``NUMBER_FIELDS``): one round trip, one consistent read.
_CHANGED = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
local out = {ids}
if #ids >= tonumber(ARGV[2]) then return out end
for i, ep in ipairs(ids) do
  out[i + 1] = redis.call('HMGET', 'sy:ep:' .. ep, unpack(ARGV, 3))
end
return out
"""

# ARGV: now, the number of ids that follow of endpoints that no longer exist, those ids, then
# the ids of endpoints that exist. Forget the live state of the first, except while a request
# still holds one of their slots (the next prune takes those); drop the expired leases of the
# others and recount them if any were. (The hold sweep frees the slot of every hold it gives
# back; this catches a lease whose hold did not name its endpoint: an older gateway's.)
_PRUNE = """
local now, gone, pruned = ARGV[1], tonumber(ARGV[2]), 0
for i = 3, #ARGV do
  local ep = ARGV[i]
  local slots = 'sy:slots:' .. ep
  local trimmed = redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if i <= gone + 2 then
    if redis.call('EXISTS', slots) == 0 then
      redis.call('DEL', 'sy:ep:' .. ep, 'sy:cbtrial:' .. ep)
      redis.call('ZREM', 'sy:live:touched', ep)
      pruned = pruned + 1
    end
  elseif trimmed > 0 then
    redis.call('HSET', 'sy:ep:' .. ep, 'n', redis.call('ZCARD', slots))
    redis.call('ZADD', 'sy:live:touched', now, ep)
  end
end
return pruned
"""


def prune_live_state(client: Any, existing: Callable[[list[int]], set[int]]) -> int:
    """Drop the live numbers of endpoints that were deleted (synchronous redis-py client;
    ``existing`` says which of some endpoint ids still exist). Without it the full refresh
    and the hold sweep go through every endpoint that ever served a request."""
    script = client.register_script(_PRUNE)
    pruned = 0
    cursor: int | bytes = 0
    while True:
        cursor, found = client.zscan(TOUCHED, cursor, count=500)
        ids = [int(member) for member, _score in found if member.isdigit()]
        # Members that are not endpoint ids were not written by the scripts: drop them too.
        junk = [member for member, _score in found if not member.isdigit()]
        if junk:
            client.zrem(TOUCHED, *junk)
        if ids:
            kept = existing(ids)
            gone = sorted(set(ids) - kept)
            args = [repr(time.time()), len(gone), *gone, *sorted(kept)]
            pruned += int(script(keys=[], args=args))
        if int(cursor) == 0:
            return pruned


# One step of a full read: ZSCAN of KEYS[1] from cursor ARGV[1], about ARGV[2] endpoints,
# each with its numbers (``NUMBER_FIELDS``, ARGV[3..]). ZSCAN returns every endpoint that
# stays in the set for the whole scan, however scores move meanwhile (reading by rank would
# skip the endpoints that a concurrent touch shifts down).
_SCAN = """
local reply = redis.call('ZSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local found, ids, rows = reply[2], {}, {}
for i = 1, #found, 2 do
  ids[#ids + 1] = found[i]
  rows[#rows + 1] = redis.call('HMGET', 'sy:ep:' .. found[i], unpack(ARGV, 3))
end
return {reply[1], ids, rows}
"""


class LiveCache:
    """A local copy of every endpoint's live numbers, refreshed in the background.

    Staleness is bounded by ``interval``; the reserve script re-checks capacity and the
    circuit atomically, so a stale copy can only cost a fallback hop, never an overload.

    A refresh reads only the endpoints whose numbers changed since the last one (every
    script that writes them marks them in ``TOUCHED``), and everything every ``full_every``
    seconds: with 10,000 endpoints, reading them all took 60-80 ms of the event loop.
    ``skew`` is how far apart the replicas' clocks may be (changes are marked with the
    writer's clock): a change marked further in the past waits for the next full read.
    """

    #: more changed endpoints than this in one refresh: read everything instead
    MAX_CHANGED = 4000
    #: endpoints per script in a full read
    CHUNK = 500

    def __init__(
        self,
        client: aioredis.Redis,
        interval: float = 0.25,
        on_refresh: Callable[[dict[int, EndpointNumbers], frozenset[int] | None], None]
        | None = None,
        *,
        full_every: float = 60.0,
        skew: float = 0.5,
    ) -> None:
        self._client = client
        self.interval = interval
        self.full_every = full_every
        self.skew = skew
        self.numbers: dict[int, EndpointNumbers] = {}
        self.on_refresh = on_refresh
        self._task: asyncio.Task[None] | None = None
        self._changed = client.register_script(_CHANGED)
        self._scan = client.register_script(_SCAN)
        self._since: float | None = None  # epoch seconds: changes after this are unread
        self._full_at = 0.0  # monotonic time of the last full read

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def refresh(self, *, full: bool = False) -> frozenset[int] | None:
        """Read what changed (or everything: ``full``, the first time, every ``full_every``
        seconds); returns the ids whose numbers were read, None after a full read."""
        started, clock = time.time(), time.monotonic()
        changed: frozenset[int] | None = None
        if not full and self._since is not None and clock - self._full_at < self.full_every:
            changed = await self._read_changed(self._since)
        if changed is None:
            await self._read_all()
            self._full_at = clock
        self._since = started - self.skew
        if self.on_refresh is not None:
            self.on_refresh(self.numbers, changed)
        return changed

    async def _read_all(self) -> None:
        """Every endpoint with live numbers, about ``CHUNK`` per script (Redis serves other
        clients between two; one script over 10,000 endpoints would stall it)."""
        cursor: bytes | int = 0
        ids: list[bytes] = []
        rows: list[list[bytes | None]] = []
        while True:
            cursor, found, numbers = await self._scan(
                keys=[TOUCHED], args=[cursor, self.CHUNK, *NUMBER_FIELDS]
            )
            ids += found
            rows += numbers
            if int(cursor) == 0:
                break
        self.numbers = read_numbers(ids, rows)

    async def _read_changed(self, since: float) -> frozenset[int] | None:
        """The endpoints changed since ``since``, read into ``numbers``; None: too many."""
        reply = await self._changed(
            keys=[TOUCHED], args=[repr(since), self.MAX_CHANGED, *NUMBER_FIELDS]
        )
        ids = reply[0]
        if len(ids) >= self.MAX_CHANGED:
            return None
        read = read_numbers(ids, reply[1:])
        # Members that are not endpoint ids are nothing a router could look up.
        changed = frozenset(int(raw) for raw in ids if raw.isdigit())
        numbers = self.numbers
        for ep in changed:
            if ep in read:
                numbers[ep] = read[ep]
            else:
                numbers.pop(ep, None)
        return changed

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh()
                if failing:
                    logger.warning("live cache refresh works again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception:
                # Log the outage once, not four times a second.
                if not failing:
                    logger.warning(
                        "live cache refresh failed; serving the last copy", exc_info=True
                    )
                failing = True
                self._since = None  # Redis may have lost its data: read everything next
            await asyncio.sleep(self.interval)
