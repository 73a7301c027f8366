"""Usage ingest: from the Redis stream into ``UsageRecord`` rows and ledger postings.

The gateway appends one event per request to the ``sy:usage`` stream. A consumer in the
``ingest`` group reads a batch, writes every record and its ledger transaction in ONE
database transaction, and acknowledges the batch only after the commit. The request id is
unique in both tables, so an event delivered twice (a worker died after the commit but
before the acknowledgement, or an entry was claimed again) is skipped, never charged twice.
Entries left pending by a dead consumer are claimed again after ``CLAIM_IDLE_MS``.

After the commit, the batch's sums go to the live dashboards: one channel-layer message per
organisation and vendor it touched, and one for the operations group
(``marketplace.live``).

Several consumers may ingest at once: inserts use ``ON CONFLICT DO NOTHING`` on those unique
keys (a usage record is written only together with its own transaction's entries, in the
same database transaction) and take their unique-index locks in request-id order.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from billing.credit import USAGE_GROUP, USAGE_STREAM
from billing.ledger import account_for_organization, account_for_vendor, platform_account
from billing.models import LedgerAccount, LedgerTransaction
from billing.money import split_fee
from marketplace.live.figures import usage_batch_messages
from marketplace.live.groups import live_publish
from marketplace.models import Organization
from marketplace.redis_client import sync_client
from vendors.models import Vendor

logger = logging.getLogger("switchyard.ingest")

CLAIM_IDLE_MS = 30_000  # default; settings.USAGE_CLAIM_IDLE_MS overrides


@dataclass(frozen=True)
class IngestResult:
    read: int
    recorded: int
    duplicates: int
    invalid: int


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def ensure_group(client: redis.Redis | None = None) -> None:
    """Create the consumer group (and the stream) unless they exist."""
    client = client or sync_client()
    try:
        client.xgroup_create(USAGE_STREAM, USAGE_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _decode(
    entries: list[tuple[bytes, dict[bytes, bytes]]],
) -> tuple[list[bytes], list[dict[str, Any]], int]:
    ids, events, invalid = [], [], 0
    for entry_id, fields in entries:
        ids.append(entry_id)
        try:
            event = orjson.loads(fields[b"e"])
            if not isinstance(event, dict) or not isinstance(event.get("rid"), str):
                raise ValueError("no request id")
            events.append(event)
        except (KeyError, ValueError, orjson.JSONDecodeError):
            # Acknowledged and logged: a malformed entry must not block the stream forever.
            logger.error("dropping malformed usage entry %r", entry_id)
            invalid += 1
    return ids, events, invalid


def usage_ingest_batch(
    *, count: int = 1000, block_ms: int | None = None, consumer: str | None = None
) -> IngestResult:
    """Ingest one batch: stale pending entries first, then new ones. Safe to run anywhere."""
    try:
        return _ingest_batch(count=count, block_ms=block_ms, consumer=consumer)
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        # First run, or the stream vanished (a Redis restart without persistence).
        ensure_group()
        return _ingest_batch(count=count, block_ms=block_ms, consumer=consumer)


def _ingest_batch(*, count: int, block_ms: int | None, consumer: str | None) -> IngestResult:
    client = sync_client()
    consumer = consumer or consumer_name()
    idle = getattr(settings, "USAGE_CLAIM_IDLE_MS", CLAIM_IDLE_MS)
    claimed: Any = client.xautoclaim(USAGE_STREAM, USAGE_GROUP, consumer, idle, "0-0", count=count)
    entries = list(claimed[1]) if claimed else []
    if len(entries) < count:
        fresh: Any = client.xreadgroup(
            USAGE_GROUP, consumer, {USAGE_STREAM: ">"}, count=count - len(entries), block=block_ms
        )
        for _stream, items in fresh or []:
            entries.extend(items)
    if not entries:
        return IngestResult(0, 0, 0, 0)
    ids, events, invalid = _decode(entries)
    recorded, duplicates = record_events(events)
    # Acknowledged entries are recorded in PostgreSQL: drop them so the stream stays small.
    pipe = client.pipeline(transaction=True)
    pipe.xack(USAGE_STREAM, USAGE_GROUP, *ids)
    pipe.xdel(USAGE_STREAM, *ids)
    pipe.execute()
    return IngestResult(len(entries), recorded, duplicates, invalid)


# Column -> PostgreSQL type, for the set-based insert of usage records.
_RECORD_COLUMNS: dict[str, str] = {
    "request_id": "text",
    "organization_id": "bigint",
    "api_key_id": "bigint",
    "endpoint_id": "bigint",
    "vendor_id": "bigint",
    "model_requested": "text",
    "prompt_tokens": "integer",
    "completion_tokens": "integer",
    "price_input": "bigint",
    "price_output": "bigint",
    "cost": "bigint",
    "vendor_share": "bigint",
    "platform_fee": "bigint",
    "latency_ms": "integer",
    "attempts": "smallint",
    "outcome": "text",
    "stream": "boolean",
    "transaction_id": "bigint",
    "occurred_at": "timestamptz",
    "cache": "text",
    "cache_saved": "bigint",
    "privacy_action": "text",
    "privacy_found": "integer",
    "privacy_kinds": "text",
}


# One JSON document per statement, not one array per column: psycopg quotes every element
# of a text array with a regular expression in Python (a quarter of a batch's time, measured);
# orjson writes the document in C and PostgreSQL reads it in C.
_INSERT_RECORDS = (
    f"INSERT INTO billing_usagerecord ({', '.join(_RECORD_COLUMNS)}, ingested_at)"  # noqa: S608 - fixed names
    f" SELECT {', '.join(_RECORD_COLUMNS)}, now() FROM jsonb_to_recordset(%s::jsonb) AS r("
    + ", ".join(f"{name} {kind}" for name, kind in _RECORD_COLUMNS.items())
    + ") ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)


def _json(rows: list[Any]) -> str:
    """Rows as one JSON text (datetimes as RFC 3339, integers exact)."""
    return orjson.dumps(rows).decode()


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _occurred_at(event: dict[str, Any]) -> datetime:
    """When the gateway answered: ``at`` is integer epoch milliseconds (exact, no float)."""
    at = event.get("at")
    return EPOCH + timedelta(milliseconds=at) if isinstance(at, int) else timezone.now()


def record_events(events: list[dict[str, Any]]) -> tuple[int, int]:
    """Write the events' usage records and ledger postings in one transaction, idempotently.

    Returns (recorded, duplicates).
    """
    if not events:
        return 0, 0
    with transaction.atomic():
        unique: dict[str, dict[str, Any]] = {}
        for event in events:
            unique.setdefault(event["rid"], event)
        # No look-up of already recorded ids: the unique keys (request id, idempotency key)
        # with ON CONFLICT DO NOTHING skip them. Sorted by request id: concurrent consumers
        # take unique-index locks in one order.
        fresh = sorted(unique.values(), key=lambda e: e["rid"])
        org_ids = {int(e["org"]) for e in fresh}
        vendor_ids = {int(e["vendor"]) for e in fresh if e.get("vendor")}
        organizations = Organization.objects.in_bulk(org_ids)
        vendors = Vendor.objects.in_bulk(vendor_ids)
        org_accounts = {oid: account_for_organization(org) for oid, org in organizations.items()}
        vendor_accounts = {vid: account_for_vendor(v) for vid, v in vendors.items()}
        revenue = platform_account(LedgerAccount.Kind.PLATFORM_REVENUE)

        # Set-based inserts (one statement per table, the rows as one JSON parameter): Django's
        # bulk_create spends most of its time building model objects; this path sustains
        # the ingest rate the hot path produces. The balance trigger checks each statement.
        charged = [e for e in fresh if int(e.get("cost") or 0) > 0]
        txn_by_rid: dict[str, int] = {}
        with connection.cursor() as cursor:
            if charged:
                cursor.execute(
                    "INSERT INTO billing_ledgertransaction"
                    " (kind, idempotency_key, memo, created_at) SELECT %s, k, m, now()"
                    " FROM jsonb_to_recordset(%s::jsonb) AS t(k text, m text)"
                    " ON CONFLICT (idempotency_key) DO NOTHING"
                    " RETURNING id, idempotency_key",
                    [
                        LedgerTransaction.Kind.USAGE,
                        _json(
                            [
                                {"k": f"usage:{e['rid']}", "m": str(e.get("model", ""))[:500]}
                                for e in charged
                            ]
                        ),
                    ],
                )
                txn_by_rid = {key[len("usage:") :]: pk for pk, key in cursor.fetchall()}
            entries: list[dict[str, int]] = []
            rows: list[dict[str, Any]] = []
            for event in fresh:
                cost = int(event.get("cost") or 0)
                vendor_id = int(event["vendor"]) if event.get("vendor") else None
                vendor = vendors.get(vendor_id) if vendor_id else None
                fee_bps = (
                    vendor.fee_bps
                    if vendor and vendor.fee_bps is not None
                    else settings.PLATFORM_FEE_BPS
                )
                share, fee = split_fee(cost, fee_bps)
                txn = txn_by_rid.get(event["rid"])
                if txn is not None:
                    legs = [(org_accounts[int(event["org"])].pk, -cost)]
                    if share:
                        if vendor_id is None or vendor_id not in vendor_accounts:
                            raise ValueError(f"usage {event['rid']} charges an unknown vendor")
                        legs.append((vendor_accounts[vendor_id].pk, share))
                    if fee:
                        legs.append((revenue.pk, fee))
                    for account_id, amount in legs:
                        entries.append({"t": txn, "a": account_id, "n": amount})
                row = {
                    "request_id": event["rid"],
                    "organization_id": int(event["org"]),
                    "api_key_id": event.get("key"),
                    "endpoint_id": event.get("ep"),
                    "vendor_id": vendor_id,
                    "model_requested": str(event.get("model", ""))[:200],
                    "prompt_tokens": int(event.get("pt") or 0),
                    "completion_tokens": int(event.get("ct") or 0),
                    "price_input": int(event.get("pin") or 0),
                    "price_output": int(event.get("pout") or 0),
                    "cost": cost,
                    "vendor_share": share if txn else 0,
                    "platform_fee": fee if txn else 0,
                    "latency_ms": int(event.get("ms") or 0),
                    "attempts": int(event.get("att") or 1),
                    "outcome": str(event.get("out") or "success"),
                    "stream": bool(event.get("stream")),
                    "transaction_id": txn,
                    "occurred_at": _occurred_at(event),
                    "cache": str(event.get("cache") or "")[:8],
                    "cache_saved": int(event.get("saved") or 0),
                    "privacy_action": str(event.get("priv") or "")[:16],
                    "privacy_found": int(event.get("pfound") or 0),
                    "privacy_kinds": str(event.get("pkinds") or "")[:200],
                }
                rows.append(row)
            if entries:
                cursor.execute(
                    "INSERT INTO billing_ledgerentry (transaction_id, account_id, amount)"
                    " SELECT t, a, n FROM jsonb_to_recordset(%s::jsonb) AS e(t bigint, a bigint,"
                    " n bigint)",
                    [_json(entries)],
                )
            cursor.execute(_INSERT_RECORDS, [_json(rows)])
            inserted = {row[0] for row in cursor.fetchall()}
        _observe_quality([e for e in fresh if e["rid"] in inserted])
        # Live dashboards: one message per organisation, vendor and the operations group with
        # this batch's sums, sent once the batch is committed (never for a rolled-back one).
        messages = usage_batch_messages(r for r in rows if r["request_id"] in inserted)
        if messages:
            transaction.on_commit(lambda: live_publish(messages))
    return len(inserted), len(events) - len(inserted)


def _observe_quality(events: list[dict[str, Any]]) -> None:
    """Feed each endpoint's observed success rate (one call per endpoint and tag)."""
    from vendors.services import quality_observe

    counts: dict[tuple[int, str | None], list[int]] = {}
    for event in events:
        tag = event.get("tag")
        if event.get("ep") and event.get("out") in ("success", "partial"):
            counter = counts.setdefault((int(event["ep"]), tag), [0, 0])
            counter[0] += 1 if event["out"] == "success" else 0
            counter[1] += 1
        for failed in event.get("fail_eps") or ():
            counts.setdefault((int(failed), tag), [0, 0])[1] += 1
    # Endpoint-id order: the same lock order in every worker.
    for (endpoint_id, tag), (successes, total) in sorted(counts.items(), key=lambda kv: kv[0][0]):
        quality_observe(endpoint_id, tag, successes, total)
