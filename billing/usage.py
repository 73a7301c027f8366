"""Usage ingest: from the Redis stream into ``UsageRecord`` rows and ledger postings.

The gateway appends one event per request to the ``sy:usage`` stream. A consumer in the
``ingest`` group reads a batch, writes every record and the batch's one ledger posting in ONE
database transaction, and acknowledges the batch only after the commit. The request id is
unique, and the posting is built from the records actually inserted, so an event delivered
twice (a worker died after the commit but before the acknowledgement, or an entry was
claimed again) is skipped, never charged twice.
Entries left pending by a dead consumer are claimed again after ``USAGE_CLAIM_IDLE_MS``
(``marketplace.streams``, shared with the route-trace ingest).

After the commit, the batch's sums go to the live dashboards: one channel-layer message per
organisation and vendor it touched, and one for the operations group
(``marketplace.live``).

Several consumers may ingest at once: inserts use ``ON CONFLICT DO NOTHING`` on the unique
request id (a usage record is written only together with the posting that charges it, in
the same database transaction) and take their unique-index locks in request-id order.
"""

from __future__ import annotations

import logging
import time
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
from marketplace import streams
from marketplace.live.figures import usage_batch_messages
from marketplace.live.groups import live_publish_soon
from marketplace.models import Organization
from marketplace.redis_client import sync_client
from vendors.models import Vendor

logger = logging.getLogger("switchyard.ingest")

# A drain loop that just read a small batch waits this long before reading again, so that
# at moderate traffic a batch carries hundreds of events instead of a few: every batch costs
# a commit and eleven statements whatever its size (about 2.7 ms of CPU with PostgreSQL's).
# Measured with bench.gateway_bench --quick, metering CPU (ingest + PostgreSQL) per request:
# no linger 4.3 ms at c=1; 50 ms after < 100 events 0.31 ms at c=1 and 0.105 at c=16;
# 200 ms after < 500 events 0.09 and 0.064. It delays billing by at most this much.
SMALL_BATCH = 500
LINGER_SECONDS = 0.2


def linger_after(read: int) -> None:
    """Wait a little after a small batch (see ``LINGER_SECONDS``); not after a large one."""
    if 0 < read < SMALL_BATCH:
        time.sleep(LINGER_SECONDS)


@dataclass(frozen=True)
class IngestResult:
    read: int
    recorded: int
    duplicates: int
    invalid: int


def ensure_group(client: redis.Redis | None = None) -> None:
    """Create the consumer group (and the stream) unless they exist."""
    streams.ensure_group(client or sync_client(), USAGE_STREAM, USAGE_GROUP)


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
    client = sync_client()
    entries = streams.read_batch(
        client,
        USAGE_STREAM,
        USAGE_GROUP,
        consumer or streams.consumer_name(),
        count=count,
        block_ms=block_ms,
    )
    if not entries:
        return IngestResult(0, 0, 0, 0)
    ids, events, invalid = _decode(entries)
    recorded, duplicates = record_events(events)
    # Acknowledged entries are recorded in PostgreSQL: drop them so the stream stays small.
    streams.drop(client, USAGE_STREAM, USAGE_GROUP, ids)
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


_NEXT_TRANSACTION_ID = "SELECT nextval(pg_get_serial_sequence('billing_ledgertransaction', 'id'))"


def record_events(events: list[dict[str, Any]]) -> tuple[int, int]:
    """Write the events' usage records and the batch's ledger posting in one transaction.

    Idempotent: the request id is unique, records go in with ``ON CONFLICT DO NOTHING``,
    and the ledger posting is built from the records actually inserted. Returns
    (recorded, duplicates).

    The batch's charges are ONE balanced usage transaction: per organisation a debit of its
    credit (the sum of its records' cost), per vendor a credit of its payable (the sum of
    the shares) and one credit of platform revenue (the sum of the fees). Each charged
    record points at it, so a request is charged exactly when its record exists, and
    ``reconcile`` recomputes every leg from the records.
    """
    if not events:
        return 0, 0
    with transaction.atomic():
        unique: dict[str, dict[str, Any]] = {}
        for event in events:
            unique.setdefault(event["rid"], event)
        # No look-up of already recorded ids: the unique request id with ON CONFLICT DO
        # NOTHING skips them. Sorted by request id: concurrent consumers take unique-index
        # locks in one order.
        fresh = sorted(unique.values(), key=lambda e: e["rid"])
        vendor_ids = {int(e["vendor"]) for e in fresh if e.get("vendor")}
        vendors = Vendor.objects.in_bulk(vendor_ids)
        charged = any(int(e.get("cost") or 0) > 0 for e in fresh)

        # Set-based inserts (one statement per table, the rows as one JSON parameter): Django's
        # bulk_create spends most of its time building model objects.
        with connection.cursor() as cursor:
            txn: int | None = None
            if charged:
                # The posting's id, taken before the records that point at it are written
                # (the foreign key is checked at commit); unused if every charge is a replay.
                cursor.execute(_NEXT_TRANSACTION_ID)
                txn = int(cursor.fetchone()[0])
            rows: list[dict[str, Any]] = []
            for event in fresh:
                cost = int(event.get("cost") or 0)
                vendor_id = int(event["vendor"]) if event.get("vendor") else None
                share = fee = 0
                if cost > 0:
                    vendor = vendors.get(vendor_id) if vendor_id else None
                    fee_bps = (
                        vendor.fee_bps
                        if vendor and vendor.fee_bps is not None
                        else settings.PLATFORM_FEE_BPS
                    )
                    share, fee = split_fee(cost, fee_bps)
                    if share and vendor is None:
                        raise ValueError(f"usage {event['rid']} charges an unknown vendor")
                rows.append(
                    {
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
                        "vendor_share": share,
                        "platform_fee": fee,
                        "latency_ms": int(event.get("ms") or 0),
                        "attempts": int(event.get("att") or 1),
                        "outcome": str(event.get("out") or "success"),
                        "stream": bool(event.get("stream")),
                        "transaction_id": txn if cost > 0 else None,
                        "occurred_at": _occurred_at(event),
                        "cache": str(event.get("cache") or "")[:8],
                        "cache_saved": int(event.get("saved") or 0),
                        "privacy_action": str(event.get("priv") or "")[:16],
                        "privacy_found": int(event.get("pfound") or 0),
                        "privacy_kinds": str(event.get("pkinds") or "")[:200],
                    }
                )
            cursor.execute(_INSERT_RECORDS, [_json(rows)])
            inserted = {row[0] for row in cursor.fetchall()}
            new_rows = [r for r in rows if r["request_id"] in inserted]
            posted = [r for r in new_rows if r["cost"] > 0]
            if posted:
                assert txn is not None
                _post_batch(cursor, txn, posted, vendors)
        _observe_quality([e for e in fresh if e["rid"] in inserted])
        # Live dashboards: one message per organisation, vendor and the operations group with
        # this batch's sums, built and sent once the batch is committed (never for a
        # rolled-back one), on the publisher thread: the next batch does not wait for them.
        if new_rows:
            transaction.on_commit(lambda: live_publish_soon(lambda: usage_batch_messages(new_rows)))
    return len(inserted), len(events) - len(inserted)


def _post_batch(
    cursor: Any, txn: int, records: list[dict[str, Any]], vendors: dict[int, Vendor]
) -> None:
    """The batch's usage transaction ``txn``: one leg per organisation, per vendor, one fee."""
    by_org: dict[int, int] = {}
    by_vendor: dict[int, int] = {}
    fees = 0
    for record in records:
        org = record["organization_id"]
        by_org[org] = by_org.get(org, 0) - record["cost"]
        if record["vendor_share"]:
            vendor_id = record["vendor_id"]
            by_vendor[vendor_id] = by_vendor.get(vendor_id, 0) + record["vendor_share"]
        fees += record["platform_fee"]
    # The accounts in one query (the platform's revenue too); the first charge of an
    # organisation or vendor creates its account.
    revenue = f"platform:{LedgerAccount.Kind.PLATFORM_REVENUE}"
    codes = {f"org:{o}:credit": o for o in by_org} | {f"vendor:{v}:payable": v for v in by_vendor}
    accounts = dict(
        LedgerAccount.objects.filter(code__in=[*codes, revenue]).values_list("code", "pk")
    )
    missing = [code for code in codes if code not in accounts]
    if missing:
        organizations = Organization.objects.in_bulk(
            [o for o in by_org if f"org:{o}:credit" in missing]
        )
        for o, organization in organizations.items():
            accounts[f"org:{o}:credit"] = account_for_organization(organization).pk
        for v in by_vendor:
            if f"vendor:{v}:payable" in missing:
                accounts[f"vendor:{v}:payable"] = account_for_vendor(vendors[v]).pk
    legs = [(accounts[f"org:{o}:credit"], n) for o, n in sorted(by_org.items())]
    legs += [(accounts[f"vendor:{v}:payable"], n) for v, n in sorted(by_vendor.items())]
    if fees:
        revenue_id = (
            accounts.get(revenue) or platform_account(LedgerAccount.Kind.PLATFORM_REVENUE).pk
        )
        legs.append((revenue_id, fees))
    first = records[0]["request_id"]
    cursor.execute(
        "INSERT INTO billing_ledgertransaction (id, kind, idempotency_key, memo, created_at)"
        " VALUES (%s, %s, %s, %s, now())",
        [
            txn,
            LedgerTransaction.Kind.USAGE,
            f"usage-batch:{first}",
            f"usage of {len(records)} requests ({len(by_org)} organisations)",
        ],
    )
    cursor.execute(
        "INSERT INTO billing_ledgerentry (transaction_id, account_id, amount)"
        " SELECT %s, a, n FROM jsonb_to_recordset(%s::jsonb) AS e(a bigint, n bigint)",
        [txn, _json([{"a": account, "n": amount} for account, amount in legs if amount])],
    )


def _observe_quality(events: list[dict[str, Any]]) -> None:
    """Feed each endpoint's observed success rate (one call for the batch)."""
    from vendors.services import quality_observe_many

    counts: dict[tuple[int, str | None], list[int]] = {}
    for event in events:
        tag = event.get("tag")
        if event.get("ep") and event.get("out") in ("success", "partial"):
            counter = counts.setdefault((int(event["ep"]), tag), [0, 0])
            counter[0] += 1 if event["out"] == "success" else 0
            counter[1] += 1
        for failed in event.get("fail_eps") or ():
            counts.setdefault((int(failed), tag), [0, 0])[1] += 1
    quality_observe_many([(e, tag, s, n) for (e, tag), (s, n) in counts.items()])
