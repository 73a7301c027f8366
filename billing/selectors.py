"""Read queries on money."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from django.db.models import Count, Prefetch, QuerySet, Sum

from billing.models import (
    Invoice,
    LedgerEntry,
    Payout,
    Refund,
    SettlementRun,
    TopUp,
    UsageRecord,
    UsageRollup,
    VendorPayoutAccount,
)
from billing.money import token_cost

if TYPE_CHECKING:
    from marketplace.models import Organization


def organization_balance_by_id(organization_id: int) -> int:
    """An organisation's credit balance in nanos, read-only (0 for an unknown account)."""
    total = LedgerEntry.objects.filter(account__code=f"org:{organization_id}:credit").aggregate(
        total=Sum("amount")
    )["total"]
    return int(total or 0)


# --- payments: every query takes its tenant (organisation or vendor) ----------------------


def organization_topups(*, organization_id: int) -> QuerySet[TopUp]:
    """An organisation's top-ups, newest first."""
    return TopUp.objects.filter(organization_id=organization_id).order_by("-created_at")


def organization_invoices(*, organization_id: int) -> QuerySet[Invoice]:
    """An organisation's invoices, newest month first."""
    return Invoice.objects.filter(organization_id=organization_id).order_by("-month")


def organization_usage_rollups(
    *, organization_id: int, start: datetime, end: datetime
) -> QuerySet[UsageRollup]:
    """An organisation's hourly usage in [start, end), oldest first."""
    return UsageRollup.objects.filter(
        organization_id=organization_id, hour__gte=start, hour__lt=end
    ).order_by("hour")


def vendor_payable_balance(*, vendor_id: int) -> int:
    """What the platform owes a vendor now, in nanos (negative after refunds of paid usage)."""
    total = LedgerEntry.objects.filter(account__code=f"vendor:{vendor_id}:payable").aggregate(
        total=Sum("amount")
    )["total"]
    return int(total or 0)


def vendor_payouts(*, vendor_id: int) -> QuerySet[Payout]:
    """A vendor's payouts, newest first."""
    return Payout.objects.filter(vendor_id=vendor_id).select_related("run").order_by("-created_at")


def vendor_payout_account(*, vendor_id: int) -> VendorPayoutAccount | None:
    return VendorPayoutAccount.objects.filter(vendor_id=vendor_id).first()


def cost_savings(
    organization: Organization, start: datetime, end: datetime
) -> dict[str, Any] | None:
    """What the organisation's usage in [start, end) cost against what the same tokens
    would have cost at its reference prices; None when no reference price is set.

    ``saved`` is negative when the reference would have been cheaper; ``saved_percent`` is
    a share of the reference cost (a ``Decimal`` with one place, None for a zero reference).
    """
    price_in, price_out = organization.reference_price_input, organization.reference_price_output
    if price_in is None and price_out is None:
        return None
    totals = UsageRecord.objects.filter(
        organization_id=organization.pk, occurred_at__gte=start, occurred_at__lt=end
    ).aggregate(cost=Sum("cost"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
    actual = int(totals["cost"] or 0)
    reference = token_cost(int(totals["prompt"] or 0), price_in or 0) + token_cost(
        int(totals["completion"] or 0), price_out or 0
    )
    saved = reference - actual
    percent = (
        (Decimal(saved) * 100 / reference).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
        if reference
        else None
    )
    return {"actual": actual, "reference": reference, "saved": saved, "saved_percent": percent}


def spend_since(
    *, since: datetime | None, organization_id: int | None = None, api_key_id: int | None = None
) -> int:
    """Ingested spend (nano-USD) of an organisation or an API key since ``since`` (None:
    ever); the gateway seeds its budget and key-limit counters with it."""
    records = UsageRecord.objects.all()
    if organization_id is not None:
        records = records.filter(organization_id=organization_id)
    if api_key_id is not None:
        records = records.filter(api_key_id=api_key_id)
    if since is not None:
        records = records.filter(occurred_at__gte=since)
    return int(records.aggregate(total=Sum("cost"))["total"] or 0)


def refundable_usage(
    *, organization: Organization, start: datetime, end: datetime
) -> tuple[int, int]:
    """(requests, nano-USD) of the organisation's charged, unrefunded usage in [start, end)."""
    totals = UsageRecord.objects.filter(
        organization=organization,
        occurred_at__gte=start,
        occurred_at__lt=end,
        transaction__isnull=False,
        refund__isnull=True,
    ).aggregate(requests=Count("id"), amount=Sum("cost"))
    return totals["requests"] or 0, totals["amount"] or 0


def usage_record_for_refund(*, request_id: str) -> UsageRecord | None:
    """One usage record by request id (staff pages), with who made and served it."""
    return (
        UsageRecord.objects.select_related("organization", "endpoint__vendor", "refund")
        .filter(request_id=request_id.strip())
        .first()
    )


def settlement_runs() -> QuerySet[SettlementRun]:
    """Settlement runs newest period first, with their payouts and vendors."""
    return SettlementRun.objects.prefetch_related(
        Prefetch("payouts", queryset=Payout.objects.select_related("vendor").order_by("pk"))
    ).order_by("-period_end", "-period_start")


def recent_refunds(*, limit: int = 20) -> list[Refund]:
    """The latest refunds of every organisation (staff pages), newest first."""
    return list(
        Refund.objects.select_related("organization", "usage_record", "actor").order_by(
            "-created_at", "-pk"
        )[:limit]
    )
