"""Route traces in PostgreSQL: ingested from the ``sy:traces`` stream, read back, pruned.

Redis keeps each trace for ``GATEWAY_TRACE_TTL_SECONDS`` (``sy:trace:<id>``, what the
gateway answers ``GET /v1/generation`` and ``POST /v1/feedback`` from right after the
request). The same write appends it to ``sy:traces``, capped at
``GATEWAY_TRACE_STREAM_MAXLEN`` entries: traces are an explanation, not money, so when
ingest falls that far behind the oldest are dropped rather than filling Redis (the usage
stream, which is money, is never capped). ``trace_ingest_batch`` moves a batch into
``RouteTrace`` in one statement; ``stored_trace`` reads one back once Redis's copy has
expired; ``prune_traces`` deletes those older than ``TRACE_RETENTION_DAYS``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from django.conf import settings
from django.db import connection
from django.utils import timezone

from marketplace import streams
from marketplace.redis_client import sync_client
from routing.live import TRACE_STREAM

logger = logging.getLogger("switchyard.traces")

TRACE_GROUP = "ingest"

# A later entry for a request replaces an earlier one; a redelivered or older one does not.
_UPSERT = """
INSERT INTO routing_routetrace (request_id, organization_id, created_at, stream_ms,
                                stream_seq, trace)
SELECT request_id, organization_id, created_at, stream_ms, stream_seq, trace
FROM jsonb_to_recordset(%s::jsonb) AS r(request_id text, organization_id bigint,
     created_at timestamptz, stream_ms bigint, stream_seq bigint, trace text)
ON CONFLICT (request_id) DO UPDATE SET trace = EXCLUDED.trace,
    stream_ms = EXCLUDED.stream_ms, stream_seq = EXCLUDED.stream_seq
WHERE (routing_routetrace.stream_ms, routing_routetrace.stream_seq)
      < (EXCLUDED.stream_ms, EXCLUDED.stream_seq)
"""


@dataclass(frozen=True, slots=True)
class TraceIngestResult:
    read: int
    stored: int
    invalid: int


def _created_at(trace: dict[str, Any], entry_ms: int) -> datetime:
    created = trace.get("created")
    if isinstance(created, str):
        try:
            parsed = datetime.fromisoformat(created)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    # An orchestrated request's trace has no "created": the entry's own time is close.
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=entry_ms)


def _rows(entries: list[streams.Entry]) -> tuple[list[dict[str, Any]], int]:
    """One row per request (its latest entry in the batch) and the count of bad entries."""
    rows: dict[str, dict[str, Any]] = {}
    invalid = 0
    for entry_id, fields in entries:
        try:
            ms_text, seq_text = entry_id.decode().split("-")
            raw = fields[b"t"]
            trace = orjson.loads(raw)  # checked here: what is stored must read back
            request_id, organization_id = trace["id"], trace["organization_id"]
            if not isinstance(request_id, str) or not 0 < len(request_id) <= 64:
                raise ValueError("bad request id")
            if not (request_id.isascii() and request_id.isprintable()):
                raise ValueError("bad request id")  # PostgreSQL's text refuses NUL, for one
            if isinstance(organization_id, bool) or not isinstance(organization_id, int):
                raise ValueError("bad organisation id")
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
            # Acknowledged and logged: a malformed entry must not block the stream.
            logger.error("dropping malformed trace entry %r", entry_id)
            invalid += 1
            continue
        ms, seq = int(ms_text), int(seq_text)
        earlier = rows.get(request_id)
        if earlier is not None and (earlier["stream_ms"], earlier["stream_seq"]) > (ms, seq):
            continue  # a claimed-again entry older than one already in the batch
        rows[request_id] = {
            "request_id": request_id,
            "organization_id": organization_id,
            "created_at": _created_at(trace, ms),
            "stream_ms": ms,
            "stream_seq": seq,
            "trace": raw.decode(),  # as the gateway wrote it: not parsed again, nor re-encoded
        }
    return list(rows.values()), invalid


def trace_ingest_batch(
    *, count: int = 1000, block_ms: int | None = None, consumer: str | None = None
) -> TraceIngestResult:
    """Store one batch of traces (stale pending entries first); safe to run anywhere."""
    client = sync_client()
    entries = streams.read_batch(
        client,
        TRACE_STREAM,
        TRACE_GROUP,
        consumer or streams.consumer_name(),
        count=count,
        block_ms=block_ms,
    )
    if not entries:
        return TraceIngestResult(0, 0, 0)
    rows, invalid = _rows(entries)
    if rows:
        # Sorted: concurrent consumers take the primary key's locks in one order.
        rows.sort(key=lambda row: row["request_id"])
        with connection.cursor() as cursor:
            cursor.execute(_UPSERT, [orjson.dumps(rows).decode()])
    streams.drop(client, TRACE_STREAM, TRACE_GROUP, [entry_id for entry_id, _ in entries])
    return TraceIngestResult(len(entries), len(rows), invalid)


def stored_trace(request_id: str) -> dict[str, Any] | None:
    """The trace PostgreSQL keeps for ``request_id``, or None."""
    from routing.models import RouteTrace

    row = RouteTrace.objects.filter(request_id=request_id[:64]).values_list("trace").first()
    if row is None:
        return None
    trace: dict[str, Any] = orjson.loads(row[0])
    return trace


def prune_traces(*, batch: int = 10_000) -> int:
    """Delete traces older than ``TRACE_RETENTION_DAYS``, ``batch`` rows per statement (a
    short lock each), and return how many went."""
    cutoff = timezone.now() - timedelta(days=settings.TRACE_RETENTION_DAYS)
    total = 0
    with connection.cursor() as cursor:
        while True:
            cursor.execute(
                "DELETE FROM routing_routetrace WHERE request_id IN (SELECT request_id FROM"
                " routing_routetrace WHERE created_at < %s LIMIT %s)",
                [cutoff, batch],
            )
            total += cursor.rowcount
            if cursor.rowcount < batch:
                return total
