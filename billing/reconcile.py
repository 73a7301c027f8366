"""Reconciliation: does the ledger agree with itself, with our records and with Stripe?

``reconcile()`` runs every check and returns the mismatches (empty: all good); the
``manage.py reconcile [--start --end] [--skip-stripe]`` command prints them and exits
non-zero when there is any. ``start``/``end`` narrow the per-row checks (usage records by
``occurred_at``, transactions, top-ups, payouts, refunds and invoices by when they were
posted); the balance checks always look at whole accounts.

Checks:

* ``usage``: every usage record with a cost points at exactly one usage transaction (its
  ingest batch's) and splits into vendor share + fee; each usage transaction's legs are
  exactly its records' sums: -cost per organisation (customer credit), +share per vendor
  (vendor payable), +fee (platform revenue); no usage transaction lacks records.
* ``balanced``: every ledger transaction sums to zero (the database refuses otherwise, so
  this catches a disabled trigger or a restored dump).
* ``vendor_payable``: each vendor's payable balance equals its usage shares minus refunded
  shares minus paid payouts (an unexplained movement shows up here), and its payouts
  account holds exactly its paid payouts.
* ``refund``: each refund transaction is the exact negation of its request's own legs.
* ``topup``: every paid top-up has its ledger top-up (clearing -> credit, the paid amount);
  every ledger top-up belongs to a paid top-up.
* ``payout``: every paid payout has its ledger posting and a Stripe transfer of the same
  amount and destination, not reversed; every ledger payout belongs to a paid payout; every
  transfer Stripe made for a settlement run is recorded on its payout.
* ``invoice``: issued invoices have their issue transaction; paid ones their payment
  transaction, for the invoiced amount.

Balances are not cached anywhere (they are sums of entries), so there is no cached balance
to compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import F, QuerySet, Sum, Value
from django.db.models.functions import Coalesce

from billing import stripe_gateway
from billing.ledger import account_balance
from billing.models import (
    Invoice,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    Payout,
    Refund,
    SettlementRun,
    TopUp,
    UsageRecord,
)
from billing.money import cents_to_nanos


@dataclass(frozen=True)
class Mismatch:
    check: str
    reference: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.reference}: {self.detail}"


def _in_range(
    qs: QuerySet[Any], field: str, start: datetime | None, end: datetime | None
) -> QuerySet[Any]:
    if start is not None:
        qs = qs.filter(**{f"{field}__gte": start})
    if end is not None:
        qs = qs.filter(**{f"{field}__lt": end})
    return qs


# Each usage transaction's legs recomputed from its records, against the entries posted:
# per organisation -sum(cost) on its credit, per vendor +sum(vendor_share) on its payable,
# +sum(platform_fee) on platform revenue. A leg whose account is missing shows up with a
# null account. Rows: (transaction id, account id, expected, posted) where they differ.
_USAGE_LEGS = """
WITH txn AS (
    SELECT id FROM billing_ledgertransaction
     WHERE kind = 'usage' AND (%(start)s::timestamptz IS NULL OR created_at >= %(start)s)
       AND (%(end)s::timestamptz IS NULL OR created_at < %(end)s)
), expected AS (
    SELECT r.transaction_id AS t, a.id AS account_id, SUM(-r.cost) AS amount
      FROM billing_usagerecord r
      LEFT JOIN billing_ledgeraccount a ON a.code = 'org:' || r.organization_id || ':credit'
     WHERE r.transaction_id IN (SELECT id FROM txn) GROUP BY 1, 2
    UNION ALL
    SELECT r.transaction_id, a.id, SUM(r.vendor_share)
      FROM billing_usagerecord r
      LEFT JOIN billing_ledgeraccount a ON a.code = 'vendor:' || r.vendor_id || ':payable'
     WHERE r.transaction_id IN (SELECT id FROM txn) AND r.vendor_share <> 0 GROUP BY 1, 2
    UNION ALL
    SELECT r.transaction_id, a.id, SUM(r.platform_fee)
      FROM billing_usagerecord r
      LEFT JOIN billing_ledgeraccount a ON a.code = 'platform:platform_revenue'
     WHERE r.transaction_id IN (SELECT id FROM txn) AND r.platform_fee <> 0 GROUP BY 1, 2
), posted AS (
    SELECT transaction_id AS t, account_id, SUM(amount) AS amount
      FROM billing_ledgerentry WHERE transaction_id IN (SELECT id FROM txn) GROUP BY 1, 2
)
SELECT COALESCE(x.t, y.t), COALESCE(x.account_id, y.account_id),
       COALESCE(x.amount, 0), COALESCE(y.amount, 0)
  FROM expected x FULL OUTER JOIN posted y ON x.t = y.t AND x.account_id = y.account_id
 WHERE COALESCE(x.amount, 0) <> COALESCE(y.amount, 0) OR x.account_id IS NULL
 ORDER BY 1, 2
"""


def _check_usage(start: datetime | None, end: datetime | None) -> list[Mismatch]:
    found = []
    records = _in_range(UsageRecord.objects.all(), "occurred_at", start, end)
    for rid, cost in records.filter(cost__gt=0, transaction__isnull=True).values_list(
        "request_id", "cost"
    ):
        found.append(Mismatch("usage", rid, f"charged {cost} nanos but has no usage transaction"))
    wrong_kind = records.filter(transaction__isnull=False).exclude(
        transaction__kind=LedgerTransaction.Kind.USAGE
    )
    for rid, key in wrong_kind.values_list("request_id", "transaction__idempotency_key"):
        found.append(Mismatch("usage", rid, f"linked to transaction {key!r}, not a usage charge"))
    split = records.filter(transaction__isnull=False).exclude(
        cost=F("vendor_share") + F("platform_fee")
    )
    for rid, cost, share, fee in split.values_list(
        "request_id", "cost", "vendor_share", "platform_fee"
    ):
        found.append(Mismatch("usage", rid, f"cost {cost} != share {share} + fee {fee}"))
    with connection.cursor() as cursor:
        cursor.execute(_USAGE_LEGS, {"start": start, "end": end})
        legs = cursor.fetchall()
    keys = dict(
        LedgerTransaction.objects.filter(pk__in={t for t, *_ in legs}).values_list(
            "pk", "idempotency_key"
        )
    )
    for txn, account, expected, posted in legs:
        where = f"account {account}" if account is not None else "a missing account"
        found.append(
            Mismatch(
                "usage",
                keys.get(txn, str(txn)),
                f"{where}: its records make {expected} nanos, the entries {posted}",
            )
        )
    orphans = _in_range(
        LedgerTransaction.objects.filter(
            kind=LedgerTransaction.Kind.USAGE, usage_records__isnull=True
        ),
        "created_at",
        start,
        end,
    )
    for key in orphans.values_list("idempotency_key", flat=True):
        found.append(Mismatch("usage", key, "usage transaction without a usage record"))
    return found


def _check_balanced(start: datetime | None, end: datetime | None) -> list[Mismatch]:
    unbalanced = (
        _in_range(LedgerTransaction.objects.all(), "created_at", start, end)
        .annotate(total=Coalesce(Sum("entries__amount"), Value(0)))
        .exclude(total=0)
    )
    return [
        Mismatch("balanced", t.idempotency_key, f"entries sum to {t.total}, not zero")
        for t in unbalanced
    ]


def _sum(qs: QuerySet[Any], field: str) -> int:
    return int(qs.aggregate(total=Sum(field))["total"] or 0)


def _check_vendor_payables() -> list[Mismatch]:
    found = []
    for account in LedgerAccount.objects.filter(
        kind=LedgerAccount.Kind.VENDOR_PAYABLE, vendor__isnull=False
    ):
        vendor_id = account.vendor_id
        assert vendor_id is not None
        earned = _sum(
            UsageRecord.objects.filter(vendor_id=vendor_id, transaction__isnull=False),
            "vendor_share",
        )
        refunded = _sum(Refund.objects.filter(vendor_id=vendor_id), "vendor_amount")
        paid = _sum(Payout.objects.filter(vendor_id=vendor_id, status=Payout.Status.PAID), "amount")
        expected = earned - refunded - paid
        actual = account_balance(account)
        if actual != expected:
            found.append(
                Mismatch(
                    "vendor_payable",
                    account.code,
                    f"balance {actual} != earned {earned} - refunded {refunded} - paid {paid} "
                    f"= {expected}",
                )
            )
        payouts = LedgerAccount.objects.filter(code=f"vendor:{vendor_id}:payouts").first()
        transferred = account_balance(payouts) if payouts else 0
        if transferred != paid:
            found.append(
                Mismatch(
                    "vendor_payable",
                    f"vendor:{vendor_id}:payouts",
                    f"balance {transferred} != paid payouts {paid}",
                )
            )
    return found


# Each refund's entries against the negation of its request's own legs: +cost back on the
# organisation's credit, -vendor_share on the vendor's payable, -platform_fee on revenue.
_REFUND_LEGS = """
WITH f AS (
    SELECT f.id, f.transaction_id, r.request_id, r.organization_id, r.vendor_id, r.cost,
           r.vendor_share, r.platform_fee
      FROM billing_refund f JOIN billing_usagerecord r ON r.id = f.usage_record_id
     WHERE f.id = ANY(%(ids)s)
), expected AS (
    SELECT f.id, a.id AS account_id, f.cost AS amount FROM f
      LEFT JOIN billing_ledgeraccount a ON a.code = 'org:' || f.organization_id || ':credit'
    UNION ALL
    SELECT f.id, a.id, -f.vendor_share FROM f
      LEFT JOIN billing_ledgeraccount a ON a.code = 'vendor:' || f.vendor_id || ':payable'
     WHERE f.vendor_share <> 0
    UNION ALL
    SELECT f.id, a.id, -f.platform_fee FROM f
      LEFT JOIN billing_ledgeraccount a ON a.code = 'platform:platform_revenue'
     WHERE f.platform_fee <> 0
), posted AS (
    SELECT f.id, e.account_id, SUM(e.amount) AS amount
      FROM f JOIN billing_ledgerentry e ON e.transaction_id = f.transaction_id GROUP BY 1, 2
)
SELECT r.request_id, COALESCE(x.account_id, y.account_id), COALESCE(x.amount, 0),
       COALESCE(y.amount, 0)
  FROM expected x FULL OUTER JOIN posted y ON x.id = y.id AND x.account_id = y.account_id
  JOIN f r ON r.id = COALESCE(x.id, y.id)
 WHERE COALESCE(x.amount, 0) <> COALESCE(y.amount, 0) OR x.account_id IS NULL
 ORDER BY 1, 2
"""


def _check_refunds(start: datetime | None, end: datetime | None) -> list[Mismatch]:
    refunds = _in_range(Refund.objects.all(), "transaction__created_at", start, end)
    ids = list(refunds.values_list("pk", flat=True))
    if not ids:
        return []
    with connection.cursor() as cursor:
        cursor.execute(_REFUND_LEGS, {"ids": ids})
        rows = cursor.fetchall()
    return [
        Mismatch(
            "refund",
            request_id,
            f"account {account_id}: the refund should move {expected} nanos, it moved {posted}",
        )
        for request_id, account_id, expected, posted in rows
    ]


def _entry_amount(transaction_id: int | None, kind: str) -> int:
    return _sum(
        LedgerEntry.objects.filter(transaction_id=transaction_id, account__kind=kind), "amount"
    )


def _check_topups(start: datetime | None, end: datetime | None) -> list[Mismatch]:
    found = []
    paid = _in_range(
        TopUp.objects.filter(status=TopUp.Status.PAID), "paid_at", start, end
    ).select_related("transaction")
    for topup in paid:
        ref = f"topup {topup.pk} ({topup.stripe_session_id})"
        txn = topup.transaction
        if txn is None or txn.idempotency_key != f"topup:{topup.stripe_session_id}":
            found.append(Mismatch("topup", ref, "paid but not in the ledger"))
            continue
        credited = _entry_amount(txn.pk, LedgerAccount.Kind.CUSTOMER_CREDIT)
        cleared = _entry_amount(txn.pk, LedgerAccount.Kind.STRIPE_CLEARING)
        if credited != cents_to_nanos(topup.amount_cents) or cleared != -credited:
            found.append(
                Mismatch(
                    "topup", ref, f"credited {credited}, cleared {cleared}, paid {topup.amount}"
                )
            )
    orphans = _in_range(
        LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.TOPUP).exclude(
            topup__status=TopUp.Status.PAID
        ),
        "created_at",
        start,
        end,
    )
    for key in orphans.values_list("idempotency_key", flat=True):
        found.append(Mismatch("topup", key, "ledger top-up without a paid top-up"))
    return found


def _check_payouts(
    start: datetime | None, end: datetime | None, check_stripe: bool
) -> list[Mismatch]:
    found = []
    paid = _in_range(
        Payout.objects.filter(status=Payout.Status.PAID), "paid_at", start, end
    ).select_related("transaction")
    for payout in paid:
        ref = payout.idempotency_key
        posted = _entry_amount(payout.transaction_id, LedgerAccount.Kind.VENDOR_PAYOUTS)
        if payout.transaction_id is None or posted != payout.amount:
            found.append(Mismatch("payout", ref, f"ledger shows {posted}, payout {payout.amount}"))
        if not payout.stripe_transfer_id:
            found.append(Mismatch("payout", ref, "paid without a Stripe transfer id"))
            continue
        if check_stripe:
            try:
                transfer = stripe_gateway.transfer_retrieve(payout.stripe_transfer_id)
            except stripe_gateway.StripeError as exc:
                found.append(Mismatch("payout", ref, f"transfer cannot be read: {exc}"))
                continue
            if (
                transfer.get("amount") != payout.amount_cents
                or transfer.get("destination") != payout.stripe_account_id
                or transfer.get("amount_reversed")
            ):
                found.append(
                    Mismatch(
                        "payout",
                        ref,
                        f"Stripe transfer {transfer.get('id')} is {transfer.get('amount')} cents "
                        f"to {transfer.get('destination')} (reversed "
                        f"{transfer.get('amount_reversed')}), payout {payout.amount_cents} cents "
                        f"to {payout.stripe_account_id}",
                    )
                )
    orphans = _in_range(
        LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.PAYOUT).exclude(
            payout__status=Payout.Status.PAID
        ),
        "created_at",
        start,
        end,
    )
    for key in orphans.values_list("idempotency_key", flat=True):
        found.append(Mismatch("payout", key, "ledger payout without a paid payout"))
    if check_stripe:
        found += _check_stripe_transfers(start, end)
    return found


def _check_stripe_transfers(start: datetime | None, end: datetime | None) -> list[Mismatch]:
    found = []
    runs = _in_range(SettlementRun.objects.all(), "started_at", start, end)
    for run in runs:
        try:
            transfers = stripe_gateway.transfer_list(transfer_group=f"settle:{run.period_key}")
        except stripe_gateway.StripeError as exc:
            found.append(Mismatch("payout", run.period_key, f"transfers cannot be listed: {exc}"))
            continue
        recorded = set(
            Payout.objects.filter(run=run, status=Payout.Status.PAID).values_list(
                "stripe_transfer_id", flat=True
            )
        )
        for transfer in transfers:
            if transfer["id"] not in recorded:
                payout_id = (transfer.get("metadata") or {}).get("payout_id")
                found.append(
                    Mismatch(
                        "payout",
                        transfer["id"],
                        f"Stripe transfer of {transfer.get('amount')} cents is not recorded as "
                        f"paid (payout {payout_id}; run `settle` for {run.period_key} again)",
                    )
                )
    return found


def _check_invoices(start: datetime | None, end: datetime | None) -> list[Mismatch]:
    found = []
    invoices = _in_range(Invoice.objects.all(), "created_at", start, end)
    for invoice in invoices:
        ref = f"invoice {invoice.organization_id}:{invoice.month:%Y-%m}"
        if invoice.issue_transaction_id is None:
            found.append(Mismatch("invoice", ref, "issued without its ledger transaction"))
        owed = -_entry_amount(invoice.issue_transaction_id, LedgerAccount.Kind.CUSTOMER_RECEIVABLE)
        if invoice.issue_transaction_id and owed != cents_to_nanos(invoice.amount_cents):
            found.append(
                Mismatch("invoice", ref, f"receivable {owed} != {invoice.amount_cents} cents")
            )
        if invoice.status == Invoice.Status.PAID:
            cleared = _entry_amount(
                invoice.payment_transaction_id, LedgerAccount.Kind.CUSTOMER_RECEIVABLE
            )
            if cleared != cents_to_nanos(invoice.amount_cents):
                found.append(
                    Mismatch(
                        "invoice", ref, f"paid {cleared}, invoiced {invoice.amount_cents} cents"
                    )
                )
    return found


def reconcile(
    *, start: datetime | None = None, end: datetime | None = None, check_stripe: bool = True
) -> list[Mismatch]:
    """Every mismatch between the ledger, our records and (optionally) Stripe."""
    return [
        *_check_usage(start, end),
        *_check_balanced(start, end),
        *_check_vendor_payables(),
        *_check_refunds(start, end),
        *_check_topups(start, end),
        *_check_payouts(start, end, check_stripe),
        *_check_invoices(start, end),
    ]
