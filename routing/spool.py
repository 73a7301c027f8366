"""A local append-only spool for settlements that Redis could not take.

If Redis goes away after a vendor answered, the customer has been served: the usage must
not be lost. ``Proxy`` then appends the settlement (the usage event, the hold to return,
the lease to free, the route trace) as one JSON line to
``<SWITCHYARD_SPOOL_DIR>/gateway-<pid>.jsonl`` and ``SpoolReplayer`` replays the lines
when Redis answers again. A replay is guarded by a marker key per request id
(``SET NX``), so a crash mid-replay never applies a line twice.
A replayer claims its own file and files left by dead processes by renaming them, so two
replayers never share one; a file whose replay failed goes back under a new name, never
over the file the process has been appending to meanwhile.

The settlement may have reached Redis although the gateway saw an error (Redis went away
before its reply), and a hold whose lease expired meanwhile was given back by the sweep:
a replay returns the hold only if it is still held, and otherwise charges only the cost
if the settlement never ran: no trace of the request in Redis and, once a trace would have
expired (``GATEWAY_TRACE_TTL_SECONDS``), no usage record of it in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from django.db import DatabaseError

from billing.credit import USAGE_STREAM, credit_key
from routing.gateway.db import off_loop
from routing.live import (
    GIVE_BACK,
    HOLD_PATTERN,
    STORE_TRACE,
    TRACE_STREAM,
    LiveConfig,
    Reservation,
    trace_key,
)

logger = logging.getLogger("switchyard.spool")

MARKER_TTL = 7 * 24 * 3600

# Like settle, but applied at most once per request id, and the credit is adjusted only if
# Redis still knows the organisation (after a data loss it is rebuilt from the ledger).
# KEYS: credit, slots, stream, marker, trace, trace stream. ARGV: refund, lease, endpoint,
# event, marker ttl, cost, the hold's member of sy:holds ('' in a line spooled by an older
# gateway, whose hold is the lease, its amounts in sy:holdinfo), HOLD_PATTERN, the trace
# ('' in an older line), its TTL, the trace stream's cap, '1' if PostgreSQL has the request's
# usage record.
_REPLAY = (
    GIVE_BACK
    + STORE_TRACE
    + """
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[5]) then return 0 end
local lease, held = ARGV[2], ARGV[7]
local keyspend, orgspend = '', ''
if held == '' then
  held = lease
  redis.call('HDEL', 'sy:holdinfo', lease)
else
  local _, _, _, _, k, o = string.match(held, ARGV[8])
  keyspend, orgspend = k or '', o or ''
end
local delta = 0
-- The settlement itself reached Redis: its trace is there, or (once the trace's TTL has run
-- out) its usage record is in PostgreSQL (ARGV[12], looked up before the script).
local settled = redis.call('EXISTS', KEYS[5]) == 1 or ARGV[12] == '1'
if redis.call('ZREM', 'sy:holds', held) == 1 then
  delta = tonumber(ARGV[1])
elseif not settled then
  -- The sweep gave the whole hold back: what remains is the charge.
  delta = -tonumber(ARGV[6])
end  -- else the settlement itself reached Redis (its trace is there): nothing to adjust
-- The credit and, as settle does, the key's and the organisation's spend counters.
if delta ~= 0 then give_back(KEYS[1], delta, keyspend, orgspend) end
redis.call('ZREM', KEYS[2], lease)
local clock = redis.call('TIME')
local now = clock[1] .. '.' .. string.format('%06d', clock[2])
redis.call('HSET', 'sy:ep:' .. ARGV[3], 'n', redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf'))
redis.call('ZADD', 'sy:live:touched', now, ARGV[3])
if ARGV[4] ~= '' then redis.call('XADD', KEYS[3], '*', 'e', ARGV[4]) end
if ARGV[9] ~= '' and not settled then  -- the trace, as settle would have stored it
  store_trace(KEYS[5], KEYS[6], ARGV[9], ARGV[10], ARGV[11])
end
return 1
"""
)


def settlement_record(
    request_id: str,
    reservation: Reservation,
    cost: int,
    event: dict[str, Any] | None,
    trace: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the spool keeps of a settlement Redis did not take (one JSON line)."""
    return {
        "request_id": request_id,
        "organization_id": reservation.organization_id,
        "endpoint_id": reservation.endpoint_id,
        "lease": reservation.lease,
        "held": reservation.held,
        "refund": reservation.hold - cost,
        "cost": cost,
        "event": event,
        "trace": trace,
    }


def _pid_gone(pid_text: str) -> bool:
    """True if no process with this pid runs (on this host)."""
    try:
        pid = int(pid_text)
    except ValueError:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _owner_gone(path: Path) -> bool:
    """True if the process whose pid names this spool file is not running (on this host)."""
    return _pid_gone(path.name.removeprefix("gateway-").split(".")[0].split("-")[0])


def _replayer_gone(path: Path) -> bool:
    """True if the process that claimed this file (``*.replaying-<pid>``) is not running: it
    died mid-replay (a kill), and the file is anyone's again."""
    pid = path.name.rsplit(".replaying-", 1)[1]
    return pid != str(os.getpid()) and _pid_gone(pid)


def _claimable_stem(path: Path) -> str | None:
    """The name (without suffix) under which this process may claim a spool file, or None:
    a ``.jsonl`` whose writer is gone, or one claimed by a replayer that died mid-replay
    (``*.replaying-<pid>``; its lines are replayed again, each at most once by its marker)."""
    if ".replaying-" in path.name:
        return path.name.split(".replaying-", 1)[0] if _replayer_gone(path) else None
    if path.suffix == ".jsonl":
        # A live replica appends to its own file and replays it itself.
        return path.stem if _owner_gone(path) else None
    return None


def _usage_recorded(request_id: str) -> bool:
    """Whether PostgreSQL has the request's usage record (its settlement reached Redis, and
    the ingest has been since)."""
    from billing.models import UsageRecord

    return UsageRecord.objects.filter(request_id=request_id).exists()


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"gateway-{os.getpid()}.jsonl"

    def append(self, record: dict[str, Any]) -> None:
        """Write one settlement durably (fsync): it is the only copy of a served request."""
        self.directory.mkdir(parents=True, exist_ok=True)
        line = orjson.dumps(record) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        logger.error("Redis unavailable: spooled the settlement of %s", record.get("request_id"))

    def pending(self) -> bool:
        """Whether a spool file here is this process's to replay (``_claimable_stem``)."""
        return self.directory.exists() and any(
            _claimable_stem(path) is not None for path in self.directory.glob("gateway-*")
        )


class SpoolReplayer:
    def __init__(
        self,
        spool: Spool,
        client: aioredis.Redis,
        interval: float = 1.0,
        config: LiveConfig | None = None,
    ) -> None:
        self.spool = spool
        self.config = config or LiveConfig()  # the traces' TTL and stream cap
        self._client = client
        self._replay = client.register_script(_REPLAY)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def replay_once(self) -> int:
        """Replay every spool file this process can claim; returns lines applied."""
        applied = 0
        if not self.spool.pending():
            return 0
        for path in sorted(self.spool.directory.glob("gateway-*")):
            stem = _claimable_stem(path)
            if stem is None:
                continue
            claimed = path.with_name(f"{stem}.replaying-{os.getpid()}")
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue  # another replayer claimed it
            try:
                for raw in claimed.read_bytes().splitlines():
                    if not raw.strip():
                        continue
                    try:
                        record = orjson.loads(raw)
                        applied += await self._apply(record)
                    except (ValueError, KeyError, TypeError):
                        # Not a settlement (a line torn by a crash mid-write): kept aside for
                        # an operator, so that it cannot hold up the lines after it forever.
                        self._quarantine(raw)
            except (aioredis.RedisError, OSError):
                # Redis went away again: put the file back for the next round, under a name
                # of its own: settlements spooled meanwhile are in a new file at ``path``.
                os.rename(claimed, path.with_name(f"gateway-{os.getpid()}-{time.time_ns()}.jsonl"))
                raise
            claimed.unlink()
        return applied

    def _quarantine(self, raw: bytes) -> None:
        bad = self.spool.directory / f"unreadable-{os.getpid()}.jsonl"
        with bad.open("ab") as handle:
            handle.write(raw + b"\n")
        logger.error("spool: a line that is not a settlement was moved to %s", bad)

    async def _apply(self, record: dict[str, Any]) -> int:
        try:
            recorded = await off_loop(_usage_recorded)(str(record["request_id"]))
        except DatabaseError:
            recorded = False  # PostgreSQL away: Redis's trace alone tells, as it did before
        result = await self._replay(
            keys=[
                credit_key(record["organization_id"]),
                f"sy:slots:{record['endpoint_id']}",
                USAGE_STREAM,
                f"sy:spooled:{record['request_id']}",
                trace_key(record["request_id"]),
                TRACE_STREAM,
            ],
            args=[
                record["refund"],
                record["lease"],
                record["endpoint_id"],
                orjson.dumps(record["event"]).decode() if record.get("event") else "",
                MARKER_TTL,
                int(record.get("cost", (record.get("event") or {}).get("cost", 0))),
                record.get("held", ""),
                HOLD_PATTERN,
                orjson.dumps(record["trace"]).decode() if record.get("trace") else "",
                self.config.trace_ttl,
                self.config.trace_stream_maxlen,
                "1" if recorded else "0",
            ],
        )
        return int(result)

    async def _run(self) -> None:
        while True:
            try:
                if self.spool.pending():
                    applied = await self.replay_once()
                    if applied:
                        logger.warning("replayed %d spooled settlement(s)", applied)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("spool replay failed; retrying", exc_info=True)
            await asyncio.sleep(self.interval)
