"""Refunds of usage charges: the charge reversed exactly, credit given back.

``refund_usage`` posts, under the usage record's row lock and with the idempotency key
``refund:<request id>``, the exact negation of the request's own legs: the
organisation's credit gets the whole charge back, the vendor's payable loses its share and
platform revenue loses the fee. The credit reaches the gateway's spendable balance after
commit (``billing.credit.adjust_after_commit``). A ``Refund`` row records why and who.

Already-paid vendors: if the vendor's share was transferred in an earlier settlement, its
payable goes below zero. That is intended: the negative balance carries over and reduces
the vendor's next settlement (``billing.settlement`` pays only a positive balance), so
nothing is clawed back from Stripe.

Refunds give back credit (prepaid) or reduce what is owed (invoiced); they never send money
back to a card. A refund of usage in an already invoiced month stays as credit on the
organisation's account (see ``billing.invoicing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction

from billing import credit
from billing.errors import RefundError
from billing.ledger import (
    account_for_organization,
    account_for_vendor,
    platform_account,
    transaction_post,
)
from billing.models import LedgerAccount, LedgerTransaction, Refund, UsageRecord
from marketplace.models import Organization


@dataclass(frozen=True)
class RefundSummary:
    refunds: int
    amount: int  # nano-USD credited back


def _actor(actor: Any) -> Any:
    return actor if getattr(actor, "pk", None) else None


def refund_usage(*, request_id: str, reason: str, actor: Any = None) -> Refund:
    """Reverse one request's charge exactly once; returns the (existing or new) refund.

    Raises ``RefundError`` for an unknown request, a free request or an empty reason.
    """
    if not reason.strip():
        raise RefundError("a reason is required", code="refund_reason")
    with transaction.atomic():
        record = UsageRecord.objects.select_for_update().filter(request_id=request_id).first()
        if record is None:
            raise RefundError(f"no usage record {request_id!r}", code="refund_unknown")
        existing = Refund.objects.filter(usage_record=record).first()
        if existing is not None:
            return existing
        if record.transaction_id is None:
            raise RefundError(f"request {request_id!r} was not charged", code="refund_free")
        # The request's own legs, reversed (its charge is one share of its batch's posting).
        organization = Organization.objects.get(pk=record.organization_id)
        legs = [(account_for_organization(organization), record.cost)]
        if record.vendor_share:
            if record.vendor is None:
                raise RefundError(f"request {request_id!r} has no vendor", code="refund_vendor")
            legs.append((account_for_vendor(record.vendor), -record.vendor_share))
        if record.platform_fee:
            legs.append(
                (platform_account(LedgerAccount.Kind.PLATFORM_REVENUE), -record.platform_fee)
            )
        posted = transaction_post(
            kind=LedgerTransaction.Kind.REFUND,
            idempotency_key=f"refund:{request_id}",
            legs=legs,
            memo=reason,
        )
        credited = record.cost
        from_vendor = record.vendor_share
        refund = Refund.objects.create(
            usage_record=record,
            organization_id=record.organization_id,
            vendor_id=record.vendor_id,
            amount=credited,
            vendor_amount=from_vendor,
            reason=reason[:500],
            actor=_actor(actor),
            transaction=posted.transaction,
        )
        if posted.created and credited:
            credit.adjust_after_commit(record.organization_id, credited)
    return refund


def refund_period(
    *,
    organization: Organization,
    start: datetime,
    end: datetime,
    reason: str,
    actor: Any = None,
) -> RefundSummary:
    """Refund every charged, not yet refunded request of ``organization`` in [start, end).

    All or nothing: one database transaction. Safe to repeat (already refunded requests
    are left alone).
    """
    if not reason.strip():
        raise RefundError("a reason is required", code="refund_reason")
    if end <= start:
        raise RefundError("the period is empty", code="refund_period")
    count = total = 0
    with transaction.atomic():
        request_ids = list(
            UsageRecord.objects.filter(
                organization=organization,
                occurred_at__gte=start,
                occurred_at__lt=end,
                transaction__isnull=False,
                refund__isnull=True,
            )
            .order_by("occurred_at", "pk")
            .values_list("request_id", flat=True)
        )
        for request_id in request_ids:
            refund = refund_usage(request_id=request_id, reason=reason, actor=actor)
            count += 1
            total += refund.amount
    return RefundSummary(count, total)
