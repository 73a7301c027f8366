"""Read queries on vendors and endpoints."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from vendors.models import (
    CapabilityTag,
    ConformanceReport,
    Endpoint,
    EndpointQuality,
    HealthCheck,
    Vendor,
    VendorInvitation,
    VendorMembership,
)


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


# --- the vendor portal and the operations pages --------------------------------------------

VendorRole = VendorMembership.Role

# What each vendor role may do in the portal (checked by the views and again by the
# audited services in vendors.services).
VENDOR_PERMISSIONS: dict[str, frozenset[str]] = {
    "vendor.view": frozenset(VendorRole.values),
    "endpoints.manage": frozenset(VendorRole.values),
    "endpoints.check": frozenset(VendorRole.values),
    "pricing.manage": frozenset({VendorRole.OWNER, VendorRole.ADMIN}),
    "revenue.view": frozenset({VendorRole.OWNER, VendorRole.ADMIN}),
    "statements.view": frozenset({VendorRole.OWNER, VendorRole.ADMIN}),
    # Stripe Connect: everyone sees whether payouts are enabled; owners and admins onboard.
    "payouts.view": frozenset(VendorRole.values),
    "payouts.manage": frozenset({VendorRole.OWNER, VendorRole.ADMIN}),
    "members.view": frozenset(VendorRole.values),
    "members.manage": frozenset({VendorRole.OWNER, VendorRole.ADMIN}),
}


def vendor_role_allows(role: str, permission: str) -> bool:
    return role in VENDOR_PERMISSIONS[permission]


def vendor_role_permissions(role: str) -> dict[str, bool]:
    """``{"pricing_manage": True, ...}`` for templates."""
    return {name.replace(".", "_"): role in roles for name, roles in VENDOR_PERMISSIONS.items()}


def vendor_memberships(*, user: Any) -> list[VendorMembership]:
    return list(
        VendorMembership.objects.filter(user=user)
        .select_related("vendor")
        .order_by("vendor__name", "vendor__pk")
    )


def vendor_membership_for(*, user: Any, slug: str) -> VendorMembership | None:
    """The user's membership of the vendor ``slug`` (None: not a member)."""
    if not getattr(user, "is_authenticated", False):
        return None
    return (
        VendorMembership.objects.filter(user=user, vendor__slug=slug)
        .select_related("vendor")
        .first()
    )


def vendor_members(*, vendor: Vendor) -> list[VendorMembership]:
    return list(
        VendorMembership.objects.filter(vendor=vendor)
        .select_related("user")
        .order_by("created_at", "pk")
    )


def vendor_member(*, vendor: Vendor, pk: int) -> VendorMembership | None:
    return VendorMembership.objects.filter(vendor=vendor, pk=pk).select_related("user").first()


def vendor_invitations_open(*, vendor: Vendor) -> list[VendorInvitation]:
    return list(
        VendorInvitation.objects.filter(
            vendor=vendor,
            accepted_at__isnull=True,
            revoked_at__isnull=True,
            expires_at__gt=timezone.now(),
        ).order_by("-created_at")
    )


def vendor_invitation(*, vendor: Vendor, pk: int) -> VendorInvitation | None:
    return VendorInvitation.objects.filter(vendor=vendor, pk=pk).first()


def vendor_invitation_by_token(token: str) -> VendorInvitation | None:
    from marketplace.selectors import invitation_token_hash

    return (
        VendorInvitation.objects.filter(token_hash=invitation_token_hash(token))
        .select_related("vendor")
        .first()
    )


def vendor_invitations_for_user(*, user: Any) -> list[VendorInvitation]:
    """Open vendor invitations addressed to one of the user's (verified) email addresses."""
    from marketplace.selectors import user_emails

    emails = user_emails(user)
    if not emails:
        return []
    query = Q()
    for email in emails:
        query |= Q(email__iexact=email)
    return list(
        VendorInvitation.objects.filter(
            query, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
        )
        .exclude(vendor__memberships__user=user)
        .select_related("vendor")
        .order_by("-created_at")
    )


def conformance_latest_map(endpoint_ids: Iterable[int]) -> dict[int, ConformanceReport]:
    """The most recent conformance report of each endpoint that has one (one query)."""
    reports = (
        ConformanceReport.objects.filter(endpoint_id__in=list(endpoint_ids))
        .order_by("endpoint_id", "-created_at", "-pk")
        .distinct("endpoint_id")
    )
    return {report.endpoint_id: report for report in reports}


def _with_latest_reports(endpoints: list[Endpoint]) -> list[Endpoint]:
    latest = conformance_latest_map(e.pk for e in endpoints)
    for endpoint in endpoints:
        endpoint.latest_report = latest.get(endpoint.pk)  # type: ignore[attr-defined]
    return endpoints


def vendor_endpoints(*, vendor: Vendor) -> list[Endpoint]:
    """The vendor's endpoints, each with ``latest_report`` (None: never checked)."""
    endpoints = list(
        Endpoint.objects.filter(vendor=vendor)
        .select_related("vendor")
        .prefetch_related("tags")
        .order_by("slug")
    )
    return _with_latest_reports(endpoints)


def vendor_endpoint(*, vendor: Vendor, slug: str) -> Endpoint | None:
    return (
        Endpoint.objects.filter(vendor=vendor, slug=slug)
        .select_related("vendor")
        .prefetch_related("tags")
        .first()
    )


def endpoint_utilisation(endpoint_ids: Iterable[int]) -> dict[int, float]:
    """Each endpoint's smoothed utilisation (0..1) as the gateways last measured it
    (0 when unknown or when Redis cannot be reached: the base price)."""
    import math

    import redis

    from marketplace.redis_client import sync_client
    from vendors.pricing import LIVE_UTILISATION_FIELD, live_key

    ids = list(endpoint_ids)
    if not ids:
        return {}
    try:
        pipe = sync_client().pipeline(transaction=False)
        for pk in ids:
            pipe.hget(live_key(pk), LIVE_UTILISATION_FIELD)
        raw = pipe.execute()
    except redis.RedisError:  # the API shows base prices rather than fail
        raw = [None] * len(ids)
    result: dict[int, float] = {}
    for pk, value in zip(ids, raw, strict=True):
        try:
            number = float(value) if value is not None else 0.0
        except ValueError:
            number = 0.0
        result[pk] = min(max(number, 0.0), 1.0) if math.isfinite(number) else 0.0
    return result


def tag_slugs() -> list[str]:
    """Every capability tag's slug (suggestions for the endpoint form)."""
    return list(CapabilityTag.objects.order_by("slug").values_list("slug", flat=True))


def ops_vendors() -> list[Vendor]:
    """Every vendor, pending ones first, each with ``endpoint_count``."""
    order: dict[str, int] = {
        Vendor.Status.PENDING: 0,
        Vendor.Status.SUSPENDED: 1,
        Vendor.Status.APPROVED: 2,
    }
    vendors = list(Vendor.objects.annotate(endpoint_count=Count("endpoints")).order_by("name"))
    return sorted(vendors, key=lambda v: order.get(v.status, 3))


def ops_endpoints(*, status: str | None = None, include_private: bool = True) -> list[Endpoint]:
    """Endpoints (of one status when given; organisations' private ones unless left out),
    oldest first, with ``latest_report``."""
    endpoints = Endpoint.objects.select_related("vendor").prefetch_related("tags")
    if status is not None:
        endpoints = endpoints.filter(status=status)
    if not include_private:
        endpoints = endpoints.filter(private_to__isnull=True)
    return _with_latest_reports(list(endpoints.order_by("created_at", "pk")))


def ops_endpoint(pk: int) -> Endpoint | None:
    endpoint = Endpoint.objects.select_related("vendor").prefetch_related("tags").filter(pk=pk)
    found = endpoint.first()
    return _with_latest_reports([found])[0] if found else None


def vendor_names(*, ids: set[int]) -> dict[int, str]:
    """Vendor names by id (staff pages naming vendors in stored reports)."""
    return dict(Vendor.objects.filter(pk__in=ids).values_list("pk", "name"))


# --- an organisation's private endpoints (the customer console) ---------------------------


def _private_endpoints_of(organization: Any) -> QuerySet[Endpoint]:
    return (
        Endpoint.objects.filter(private_to=organization)
        .select_related("vendor")
        .prefetch_related("tags")
    )


def private_endpoints(*, organization: Any, kind: str | None = None) -> list[Endpoint]:
    """The organisation's private endpoints by name, each with ``latest_report``."""
    endpoints = _private_endpoints_of(organization)
    if kind is not None:
        endpoints = endpoints.filter(kind=kind)
    return _with_latest_reports(list(endpoints.order_by("slug", "pk")))


def private_endpoint(*, organization: Any, pk: int) -> Endpoint | None:
    """One private endpoint of the organisation (None: not one of its own)."""
    found = _private_endpoints_of(organization).filter(pk=pk).first()
    return _with_latest_reports([found])[0] if found else None
