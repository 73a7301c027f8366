"""Read queries on vendors and endpoints."""

from __future__ import annotations

from django.db.models import QuerySet

from vendors.models import Endpoint, Vendor


def routable_endpoints() -> QuerySet[Endpoint]:
    """Endpoints that may receive traffic: approved, of an approved vendor."""
    return (
        Endpoint.objects.filter(
            status=Endpoint.Status.APPROVED, vendor__status=Vendor.Status.APPROVED
        )
        .select_related("vendor")
        .prefetch_related("tags")
        .order_by("pk")
    )


def catalog_endpoints() -> list[Endpoint]:
    """Public endpoints for the catalog (private endpoints are not listed)."""
    return list(routable_endpoints().filter(private_to__isnull=True))
