"""Vendor settlement: one Stripe Connect transfer per vendor and period, posted once.

Earnings accrue continuously: usage ingest credits each vendor's payable account with the
charge minus the platform fee. ``settlement_run(period_start, period_end)`` (daily from
Celery beat for the previous day, or ``manage.py settle --period A..B``) pays every vendor
what it is owed at the end of the period:

    owed = min(payable balance from transactions before the period's end,
               payable balance now)

The first term leaves out what was earned after the period; the second makes sure we never
pay more than the payable holds now (refunds or another run since), so an earlier amount
that was not paid (failed transfer, vendor not onboarded yet) is included in the next run.
Stripe moves whole cents: the amount is rounded DOWN to a cent and the sub-cent remainder
stays in the payable for the next run.

Per vendor (``payout_settle``), idempotent at every step:

1. Under the payable account's row lock: return if this run already paid the vendor;
   resume a pending payout with its stored amount and key; skip (and report) vendors
   without a Stripe account, with payouts disabled, or with a payout of another run still
   in flight; otherwise store a pending ``Payout`` with the amount and the key
   ``settle:<period>:<vendor id>``.
2. Create the transfer with that idempotency key (a retry after a crash gets the same
   transfer back from Stripe instead of a second one).
3. Under the payout's row lock: post vendor payable -> vendor payouts (key
   ``settle:<period>:<vendor id>``) and mark the payout paid.

A transfer Stripe refuses (``balance_insufficient``, destination not able to receive) marks
the payout failed and leaves the ledger untouched; the next run (of this period or a later
one) tries again, with a new idempotency key ``...:retry<n>`` because Stripe replays the
first answer of a key, errors included. Transient errors (network, 5xx) leave the payout
pending; the next run resumes it with the same key.

Refunds after a payout: a refund takes the vendor's share back from its payable, which may
go below zero when the money was already transferred. The negative balance carries over:
``owed`` is <= 0 until new earnings cover it, so the vendor is skipped (``nothing_to_pay``)
and its next payout is reduced by the refund. We never claw back transfers automatically.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from billing import stripe_gateway
from billing.errors import SettlementError
from billing.ledger import (
    account_balance,
    account_balance_before,
    account_for_vendor,
    account_for_vendor_payouts,
    transaction_post,
)
from billing.models import (
    LedgerAccount,
    LedgerTransaction,
    Payout,
    SettlementRun,
    VendorPayoutAccount,
)
from billing.money import cents_to_nanos, nanos_to_cents_floor
from vendors.models import Vendor

logger = logging.getLogger("switchyard.billing.settlement")


@dataclass(frozen=True)
class VendorOutcome:
    """What one run did for one vendor.

    ``outcome``: paid, already_paid, skipped (see ``reason``: no_stripe_account,
    payouts_disabled, payout_in_flight), nothing_to_pay, failed (``reason``: Stripe's error
    code), pending (a transient error: resumed by the next run).
    """

    vendor_id: int
    outcome: str
    reason: str = ""
    amount_cents: int = 0
    payout_id: int | None = None


@dataclass
class SettlementReport:
    run: SettlementRun
    outcomes: list[VendorOutcome] = field(default_factory=list)

    def of(self, *outcomes: str) -> list[VendorOutcome]:
        return [o for o in self.outcomes if o.outcome in outcomes]

    @property
    def ok(self) -> bool:
        return not self.of("failed", "pending")


def period_cutoff(period_end: date) -> datetime:
    """The moment a period ends: midnight UTC after its last day."""
    return datetime.combine(period_end + timedelta(days=1), time.min, tzinfo=UTC)


def parse_period(text: str) -> tuple[date, date]:
    """``YYYY-MM-DD..YYYY-MM-DD`` (both days included) or a single ``YYYY-MM-DD``."""
    start_text, _, end_text = text.partition("..")
    try:
        start = date.fromisoformat(start_text.strip())
        end = date.fromisoformat(end_text.strip()) if end_text else start
    except ValueError:
        raise SettlementError(f"not a period: {text!r} (YYYY-MM-DD..YYYY-MM-DD)") from None
    if end < start:
        raise SettlementError("the period ends before it starts")
    return start, end


def _decide(
    run: SettlementRun, vendor: Vendor, cutoff: datetime
) -> tuple[Payout | None, VendorOutcome | None]:
    """Step 1: what to transfer (a pending payout) or why not (an outcome)."""
    with transaction.atomic():
        payable = account_for_vendor(vendor)
        # One decision per vendor at a time, whichever run (and refunds wait for it).
        LedgerAccount.objects.select_for_update().get(pk=payable.pk)
        payout = Payout.objects.select_for_update().filter(run=run, vendor=vendor).first()
        if payout is not None and payout.status == Payout.Status.PAID:
            return None, VendorOutcome(
                vendor.pk, "already_paid", amount_cents=payout.amount_cents, payout_id=payout.pk
            )
        if payout is not None and payout.status == Payout.Status.PENDING:
            return payout, None
        account = VendorPayoutAccount.objects.filter(vendor=vendor).first()
        if account is None or not account.stripe_account_id:
            return None, VendorOutcome(vendor.pk, "skipped", "no_stripe_account")
        if not account.payouts_enabled:
            return None, VendorOutcome(vendor.pk, "skipped", "payouts_disabled")
        in_flight = Payout.objects.filter(vendor=vendor, status=Payout.Status.PENDING)
        if in_flight.exclude(run=run).exists():
            return None, VendorOutcome(vendor.pk, "skipped", "payout_in_flight")
        owed = min(account_balance_before(payable, cutoff), account_balance(payable))
        cents = nanos_to_cents_floor(owed) if owed > 0 else 0
        if cents == 0:
            return None, VendorOutcome(vendor.pk, "nothing_to_pay")
        key = f"settle:{run.period_key}:{vendor.pk}"
        if payout is None:
            payout = Payout.objects.create(
                run=run,
                vendor=vendor,
                stripe_account_id=account.stripe_account_id,
                amount_cents=cents,
                amount=cents_to_nanos(cents),
                idempotency_key=key,
            )
        else:  # failed before: nothing moved, so decide again under a fresh Stripe key
            payout.attempts += 1
            payout.idempotency_key = f"{key}:retry{payout.attempts - 1}"
            payout.stripe_account_id = account.stripe_account_id
            payout.amount_cents = cents
            payout.amount = cents_to_nanos(cents)
            payout.status = Payout.Status.PENDING
            payout.failure_code = payout.failure_message = ""
            payout.save()
        return payout, None


def _record_paid(payout_id: int, transfer: dict[str, Any]) -> VendorOutcome:
    """Step 3: post the payout once and mark it paid."""
    with transaction.atomic():
        payout = (
            Payout.objects.select_for_update().select_related("run", "vendor").get(pk=payout_id)
        )
        if payout.status == Payout.Status.PAID:
            return VendorOutcome(
                payout.vendor_id,
                "already_paid",
                amount_cents=payout.amount_cents,
                payout_id=payout.pk,
            )
        if (
            transfer.get("amount") != payout.amount_cents
            or transfer.get("destination") != payout.stripe_account_id
        ):
            raise SettlementError(f"transfer {transfer.get('id')} does not match {payout}")
        posted = transaction_post(
            kind=LedgerTransaction.Kind.PAYOUT,
            idempotency_key=f"settle:{payout.run.period_key}:{payout.vendor_id}",
            legs=[
                (account_for_vendor(payout.vendor), -payout.amount),
                (account_for_vendor_payouts(payout.vendor), payout.amount),
            ],
            memo=f"Stripe transfer {transfer['id']} for {payout.run.period_key}",
        )
        payout.status = Payout.Status.PAID
        payout.stripe_transfer_id = str(transfer["id"])
        payout.transaction = posted.transaction
        payout.paid_at = timezone.now()
        payout.failure_code = payout.failure_message = ""
        payout.save()
    return VendorOutcome(
        payout.vendor_id, "paid", amount_cents=payout.amount_cents, payout_id=payout.pk
    )


def _record_failed(payout: Payout, exc: stripe_gateway.StripeError) -> VendorOutcome:
    code = str(getattr(exc, "code", "") or type(exc).__name__)
    with transaction.atomic():
        locked = Payout.objects.select_for_update().get(pk=payout.pk)
        if (
            locked.status == Payout.Status.PENDING
            and locked.idempotency_key == payout.idempotency_key
        ):
            locked.status = Payout.Status.FAILED
            locked.failure_code = code[:100]
            locked.failure_message = str(getattr(exc, "user_message", None) or exc)[:500]
            locked.save(update_fields=["status", "failure_code", "failure_message", "updated_at"])
    logger.warning("payout %s failed: %s", payout.idempotency_key, code)
    return VendorOutcome(payout.vendor_id, "failed", code, payout.amount_cents, payout.pk)


def payout_settle(*, run: SettlementRun, vendor: Vendor) -> VendorOutcome:
    """Pay ``vendor`` for ``run``'s period once (see the module docstring for the steps)."""
    payout, outcome = _decide(run, vendor, period_cutoff(run.period_end))
    if outcome is not None:
        return outcome
    assert payout is not None
    try:
        transfer = stripe_gateway.transfer_create(
            amount_cents=payout.amount_cents,
            destination=payout.stripe_account_id,
            transfer_group=f"settle:{run.period_key}",
            description=f"Switchyard earnings {run.period_key}",
            metadata={"vendor_id": vendor.pk, "payout_id": payout.pk, "period": run.period_key},
            idempotency_key=payout.idempotency_key,
        )
    except stripe_gateway.StripeError as exc:
        if stripe_gateway.is_definite_failure(exc):
            return _record_failed(payout, exc)
        logger.warning("payout %s left pending: %s", payout.idempotency_key, exc)
        return VendorOutcome(
            vendor.pk, "pending", type(exc).__name__, payout.amount_cents, payout.pk
        )
    return _record_paid(payout.pk, transfer)


def settlement_run(*, period_start: date, period_end: date) -> SettlementReport:
    """Settle every vendor with a payable for the period (both days included); safe to repeat.

    A period that has not ended yet pays what has been earned so far.
    """
    if period_end < period_start:
        raise SettlementError("the period ends before it starts")
    run, _ = SettlementRun.objects.get_or_create(period_start=period_start, period_end=period_end)
    report = SettlementReport(run)
    vendor_ids = (
        LedgerAccount.objects.filter(kind=LedgerAccount.Kind.VENDOR_PAYABLE, vendor__isnull=False)
        .order_by("vendor_id")
        .values_list("vendor_id", flat=True)
    )
    # An organisation's private vendor is never paid out: it earns nothing (fee 100 %) and
    # has no Stripe account; leaving it out keeps it off every settlement report.
    vendors = Vendor.objects.filter(pk__in=list(vendor_ids), private_to__isnull=True)
    for vendor in vendors.order_by("pk"):
        try:
            report.outcomes.append(payout_settle(run=run, vendor=vendor))
        except Exception as exc:  # one vendor's surprise must not stop the others' payouts
            logger.exception("settling vendor %s failed", vendor.pk)
            report.outcomes.append(VendorOutcome(vendor.pk, "pending", type(exc).__name__))
    SettlementRun.objects.filter(pk=run.pk).update(
        status=SettlementRun.Status.COMPLETED,
        finished_at=timezone.now(),
        report={"outcomes": [asdict(o) for o in report.outcomes]},
    )
    run.refresh_from_db()
    return report
