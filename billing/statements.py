"""Vendor statements: what a vendor earned, had refunded and was paid, as CSV.

A statement covers whole days (``start`` to ``end``, both included, UTC) and is built from
the vendor's payable account in the ledger, dated by when each movement was posted, so
its closing balance is exactly the payable balance at the end of the period:

    opening balance + sum(net of every row) == closing balance

Usage is summed per day and endpoint (one row each); refunds and payouts are one row each;
any other movement on the payable (a manual correction) appears as an adjustment.
Amounts are US dollars with nine decimals (nano-dollars), never rounded.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.db.models import Count, Sum
from django.db.models.functions import TruncDate

from billing.ledger import account_balance_before, account_for_vendor
from billing.models import LedgerEntry, LedgerTransaction, Payout, Refund, UsageRecord
from billing.money import format_usd_plain
from vendors.models import Endpoint, Vendor

HEADER = [
    "date",
    "type",
    "reference",
    "description",
    "requests",
    "gross_usd",
    "platform_fee_usd",
    "net_usd",
    "balance_usd",
]


def _bounds(start: date, end: date) -> tuple[datetime, datetime]:
    return (
        datetime.combine(start, time.min, tzinfo=UTC),
        datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC),
    )


def vendor_statement_rows(
    *, vendor: Vendor, start: date, end: date
) -> tuple[int, list[dict[str, object]], int]:
    """(opening balance, rows with a ``net`` in nanos sorted by date, closing balance)."""
    begin, finish = _bounds(start, end)
    payable = account_for_vendor(vendor)
    opening = account_balance_before(payable, begin)
    closing = account_balance_before(payable, finish)
    rows: list[dict[str, object]] = []

    usage = (
        UsageRecord.objects.filter(
            vendor=vendor,
            transaction__isnull=False,
            transaction__created_at__gte=begin,
            transaction__created_at__lt=finish,
        )
        .annotate(day=TruncDate("transaction__created_at", tzinfo=UTC))
        .values("day", "endpoint_id")
        .annotate(
            requests=Count("id"),
            gross=Sum("cost"),
            fee=Sum("platform_fee"),
            net=Sum("vendor_share"),
        )
        .order_by("day", "endpoint_id")
    )
    endpoints = {e.pk: e.slug for e in Endpoint.objects.filter(vendor=vendor)}
    for line in usage:
        slug = endpoints.get(line["endpoint_id"], "(removed endpoint)")
        rows.append(
            {
                "date": line["day"],
                "type": "usage",
                "reference": slug,
                "description": f"usage of {vendor.slug}/{slug}",
                "requests": line["requests"],
                "gross": line["gross"] or 0,
                "fee": line["fee"] or 0,
                "net": line["net"] or 0,
            }
        )

    refunds = Refund.objects.filter(
        vendor=vendor, transaction__created_at__gte=begin, transaction__created_at__lt=finish
    ).select_related("usage_record", "transaction")
    for refund in refunds:
        record = refund.usage_record
        rows.append(
            {
                "date": refund.transaction.created_at.date(),
                "type": "refund",
                "reference": record.request_id,
                "description": refund.reason,
                "requests": "",
                "gross": -record.cost,
                "fee": -record.platform_fee,
                "net": -refund.vendor_amount,
            }
        )

    payouts = Payout.objects.filter(
        vendor=vendor,
        status=Payout.Status.PAID,
        transaction__created_at__gte=begin,
        transaction__created_at__lt=finish,
    ).select_related("transaction", "run")
    for payout in payouts:
        assert payout.transaction is not None
        rows.append(
            {
                "date": payout.transaction.created_at.date(),
                "type": "payout",
                "reference": payout.stripe_transfer_id,
                "description": f"Stripe transfer for {payout.run.period_key}",
                "requests": "",
                "gross": "",
                "fee": "",
                "net": -payout.amount,
            }
        )

    known = {
        LedgerTransaction.Kind.USAGE,
        LedgerTransaction.Kind.REFUND,
        LedgerTransaction.Kind.PAYOUT,
    }
    others = (
        LedgerEntry.objects.filter(
            account=payable,
            transaction__created_at__gte=begin,
            transaction__created_at__lt=finish,
        )
        .exclude(transaction__kind__in=known)
        .select_related("transaction")
    )
    for entry in others:
        rows.append(
            {
                "date": entry.transaction.created_at.date(),
                "type": "adjustment",
                "reference": entry.transaction.idempotency_key,
                "description": entry.transaction.memo,
                "requests": "",
                "gross": "",
                "fee": "",
                "net": entry.amount,
            }
        )
    rows.sort(key=lambda row: (row["date"], str(row["type"])))  # type: ignore[arg-type]
    return opening, rows, closing


def vendor_statement_csv(*, vendor: Vendor, start: date, end: date) -> str:
    """The vendor's statement for ``start``..``end`` (days, both included) as CSV text."""
    opening, rows, closing = vendor_statement_rows(vendor=vendor, start=start, end=end)

    def usd(value: object) -> str:
        return format_usd_plain(value) if isinstance(value, int) else ""

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerow([start.isoformat(), "opening_balance", "", "", "", "", "", "", usd(opening)])
    balance = opening
    for row in rows:
        balance += int(row["net"])  # type: ignore[call-overload]
        writer.writerow(
            [
                row["date"].isoformat(),  # type: ignore[attr-defined]
                row["type"],
                row["reference"],
                row["description"],
                row["requests"],
                usd(row["gross"]),
                usd(row["fee"]),
                usd(row["net"]),
                usd(balance),
            ]
        )
    writer.writerow([end.isoformat(), "closing_balance", "", "", "", "", "", "", usd(closing)])
    if balance != closing:  # pragma: no cover - the reconcile command reports the cause
        writer.writerow(
            ["", "unexplained_difference", "", "", "", "", "", usd(closing - balance), ""]
        )
    return out.getvalue()


@dataclass(frozen=True)
class RevenuePeriod:
    """One calendar month of a vendor's statement, summed (nano-USD)."""

    start: date
    end: date
    requests: int
    gross: int  # what customers were charged
    fee: int  # the platform's share
    net: int  # earned: gross - fee
    refunds: int  # taken back by refunds (<= 0)
    transfers: int  # paid out by Stripe transfers (>= 0)
    adjustments: int
    opening: int
    closing: int  # owed at the end of the month

    @property
    def key(self) -> str:
        return f"{self.start:%Y-%m}"


def month_bounds(month: date) -> tuple[date, date]:
    """The first and last day of ``month``'s calendar month."""
    start = month.replace(day=1)
    following = (start + timedelta(days=32)).replace(day=1)
    return start, following - timedelta(days=1)


def vendor_revenue_periods(*, vendor: Vendor, today: date, months: int = 12) -> list[RevenuePeriod]:
    """The vendor's last ``months`` calendar months (newest first, the current one included,
    none before the vendor joined), each summed from its statement rows."""
    periods: list[RevenuePeriod] = []
    month = today.replace(day=1)
    first = vendor.created_at.date().replace(day=1)
    while len(periods) < months and month >= first:
        start, end = month_bounds(month)
        opening, rows, closing = vendor_statement_rows(vendor=vendor, start=start, end=end)

        def total(kind: str, column: str, rows: list[dict[str, object]] = rows) -> int:
            return sum(int(r[column]) for r in rows if r["type"] == kind)  # type: ignore[call-overload]

        periods.append(
            RevenuePeriod(
                start=start,
                end=end,
                requests=total("usage", "requests"),
                gross=total("usage", "gross"),
                fee=total("usage", "fee"),
                net=total("usage", "net"),
                refunds=total("refund", "net"),
                transfers=-total("payout", "net"),
                adjustments=total("adjustment", "net"),
                opening=opening,
                closing=closing,
            )
        )
        month = (start - timedelta(days=1)).replace(day=1)
    return periods
