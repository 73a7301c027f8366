"""Read queries on vendors and endpoints."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from vendors.models import ConformanceReport, Endpoint, EndpointQuality, HealthCheck, Vendor


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


# --- quality, health and conformance -----------------------------------------------------


def probe_targets(*, kind: str | None = None) -> list[int]:
    """Ids of the endpoints the platform probes: approved, of an approved vendor."""
    targets = Endpoint.objects.filter(
        status=Endpoint.Status.APPROVED, vendor__status=Vendor.Status.APPROVED
    )
    if kind is not None:
        targets = targets.filter(kind=kind)
    return list(targets.order_by("pk").values_list("pk", flat=True))


def quality_map(endpoint_ids: Iterable[int]) -> dict[int, dict[str, float]]:
    """``{endpoint_id: {tag: score}}`` for the routing snapshot (one query).

    Every requested id is present; an endpoint or tag without a row has no evidence yet
    and should be scored at ``vendors.quality.PRIOR``. The tag ``"*"`` is the overall score.
    """
    ids = list(endpoint_ids)
    result: dict[int, dict[str, float]] = {pk: {} for pk in ids}
    rows = EndpointQuality.objects.filter(endpoint_id__in=ids).values_list(
        "endpoint_id", "tag", "score"
    )
    for endpoint_id, tag, score in rows:
        result[endpoint_id][tag] = score
    return result


def uptime_map(
    endpoint_ids: Iterable[int], window: timedelta = timedelta(days=1)
) -> dict[int, float | None]:
    """Share of successful health probes per endpoint over ``window`` (None: no probe).

    Probes run at a fixed interval, so the share of probes is the share of time.
    """
    ids = list(endpoint_ids)
    result: dict[int, float | None] = dict.fromkeys(ids)
    rows = (
        HealthCheck.objects.filter(endpoint_id__in=ids, checked_at__gte=timezone.now() - window)
        .values("endpoint_id")
        .annotate(ok=Count("id", filter=Q(ok=True)), n=Count("id"))
        .order_by()
    )
    for row in rows:
        result[row["endpoint_id"]] = row["ok"] / row["n"]
    return result


def uptime(endpoint: Endpoint | int, window: timedelta = timedelta(days=1)) -> float | None:
    """Share of successful health probes of one endpoint over ``window`` (None: no probe)."""
    pk = endpoint if isinstance(endpoint, int) else endpoint.pk
    return uptime_map([pk], window)[pk]


def conformance_latest(endpoint: Endpoint) -> ConformanceReport | None:
    """The endpoint's most recent conformance report."""
    return endpoint.conformance_reports.order_by("-created_at", "-pk").first()
