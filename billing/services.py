"""Write operations on customers' money: grants, deductions, usage charges, and the
operations pages' audited refunds and settlement runs."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing import credit
from billing.errors import RefundError, SettlementError
from billing.ledger import (
    LedgerError,
    Posted,
    account_balance,
    account_for_organization,
    platform_account,
    transaction_post,
)
from billing.models import LedgerAccount, LedgerTransaction, Refund
from billing.refunds import RefundSummary, refund_period, refund_usage
from marketplace.models import Organization


class CreditError(Exception):
    """A credit movement that cannot be made (bad amount, missing reason, not enough)."""


def credit_grant(
    *,
    organization: Organization,
    amount: int,
    reason: str,
    idempotency_key: str | None = None,
) -> Posted:
    """Give an organisation ``amount`` nano-USD of credit from the platform's grants account."""
    if amount <= 0:
        raise CreditError("the amount must be positive")
    if not reason.strip():
        raise CreditError("a reason is required")
    key = idempotency_key or f"grant:{uuid.uuid4()}"
    with transaction.atomic():
        posted = transaction_post(
            kind=LedgerTransaction.Kind.GRANT,
            idempotency_key=key,
            legs=[
                (platform_account(LedgerAccount.Kind.PLATFORM_GRANTS), -amount),
                (account_for_organization(organization), amount),
            ],
            memo=reason,
        )
        if posted.created:
            credit.adjust_after_commit(organization.pk, amount)
    return posted


def credit_deduct(
    *,
    organization: Organization,
    amount: int,
    reason: str,
    idempotency_key: str | None = None,
) -> Posted:
    """Take ``amount`` nano-USD of credit back; refuses to take more than the balance."""
    if amount <= 0:
        raise CreditError("the amount must be positive")
    if not reason.strip():
        raise CreditError("a reason is required")
    key = idempotency_key or f"deduct:{uuid.uuid4()}"
    with transaction.atomic():
        account = account_for_organization(organization)
        # Lock the account row so that two deductions cannot both see the same balance.
        LedgerAccount.objects.select_for_update().get(pk=account.pk)
        if account_balance(account) < amount:
            raise CreditError("the organisation does not hold that much credit")
        try:
            posted = transaction_post(
                kind=LedgerTransaction.Kind.DEDUCTION,
                idempotency_key=key,
                legs=[
                    (account, -amount),
                    (platform_account(LedgerAccount.Kind.PLATFORM_GRANTS), amount),
                ],
                memo=reason,
            )
        except LedgerError as exc:  # pragma: no cover - legs are balanced by construction
            raise CreditError(str(exc)) from exc
        if posted.created:
            credit.adjust_after_commit(organization.pk, -amount)
    return posted


def default_fee_bps() -> int:
    return settings.PLATFORM_FEE_BPS


# --- the operations pages: audited refunds and settlement runs -----------------------------


def _audit(**entry: object) -> None:
    # The audit log lives with the consoles in marketplace; billing only appends to it.
    from marketplace.services import audit_record

    audit_record(**entry)  # type: ignore[arg-type]


@transaction.atomic
def ops_refund_request(*, actor: Any, request_id: str, reason: str) -> Refund:
    """Refund one request's charge (staff); audited. Refunding it again changes nothing
    and is reported by ``RefundError`` code ``refund_already``."""
    request_id = request_id.strip()
    if Refund.objects.filter(usage_record__request_id=request_id).exists():
        raise RefundError(f"request {request_id!r} was already refunded", code="refund_already")
    refund = refund_usage(request_id=request_id, reason=reason, actor=actor)
    _audit(
        actor=actor,
        action="billing.refund",
        target=refund,
        organization=refund.organization,
        details={"request_id": request_id, "amount": refund.amount, "reason": refund.reason},
    )
    return refund


@transaction.atomic
def ops_refund_period(
    *, actor: Any, organization: Organization, start: date, end: date, reason: str
) -> RefundSummary:
    """Refund every charged, unrefunded request of ``organization`` from ``start`` to
    ``end`` (days, both included, UTC) (staff); all or nothing, audited."""
    begin, finish = day_bounds(start, end)
    summary = refund_period(
        organization=organization, start=begin, end=finish, reason=reason, actor=actor
    )
    _audit(
        actor=actor,
        action="billing.refund_period",
        target=organization,
        organization=organization,
        details={
            "start": start.isoformat(),
            "end": end.isoformat(),
            "refunds": summary.refunds,
            "amount": summary.amount,
            "reason": reason.strip()[:500],
        },
    )
    return summary


@transaction.atomic
def ops_settlement_enqueue(*, actor: Any, period_start: date, period_end: date) -> None:
    """Queue a settlement run for the period (staff), once the audit entry is committed.
    The run is idempotent: a period already settled pays nobody twice."""
    from billing.tasks import settlement_period

    if period_end < period_start:
        raise SettlementError("the period ends before it starts")
    if period_start > timezone.now().date():
        raise SettlementError("the period has not started yet")
    key = f"{period_start.isoformat()}..{period_end.isoformat()}"
    _audit(
        actor=actor,
        action="billing.settlement_enqueue",
        target_type="billing.settlementrun",
        target_id=key,
        details={"period": key},
    )
    transaction.on_commit(
        lambda: settlement_period.delay(period_start.isoformat(), period_end.isoformat())
    )


def day_bounds(start: date, end: date) -> tuple[datetime, datetime]:
    """Days ``start``..``end`` (both included) as a half-open UTC range."""
    return (
        datetime.combine(start, time.min, tzinfo=UTC),
        datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC),
    )
