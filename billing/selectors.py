"""Read queries on money."""

from __future__ import annotations

from datetime import datetime

from django.db.models import QuerySet, Sum

from billing.models import (
    Invoice,
    LedgerEntry,
    Payout,
    TopUp,
    UsageRollup,
    VendorPayoutAccount,
)


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
