"""Read queries on money."""

from __future__ import annotations

from django.db.models import Sum

from billing.models import LedgerEntry


def organization_balance_by_id(organization_id: int) -> int:
    """An organisation's credit balance in nanos, read-only (0 for an unknown account)."""
    total = LedgerEntry.objects.filter(account__code=f"org:{organization_id}:credit").aggregate(
        total=Sum("amount")
    )["total"]
    return int(total or 0)
