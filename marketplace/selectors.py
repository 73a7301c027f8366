"""Read queries on the customer side: organisations, members, keys, money and usage.

Every query for tenant data takes the organisation (or the user whose memberships
decide it); nothing here reads another organisation's rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from django.conf import settings
from django.db.models import (
    Aggregate,
    Count,
    F,
    FloatField,
    Max,
    Q,
    QuerySet,
    Sum,
    Window,
)
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from billing.models import LedgerEntry, UsageRecord
from marketplace.models import ApiKey, AuditLogEntry, Invitation, Membership, Organization
from vendors.models import CapabilityTag, Endpoint
from vendors.quality import OVERALL, PRIOR
from vendors.selectors import catalog_endpoints, quality_map, uptime_map

Role = Membership.Role

# What each organisation role may do in the console. Views check these; the services
# that change state check them again for the actor they are given.
PERMISSIONS: dict[str, frozenset[str]] = {
    "org.view": frozenset(Role.values),
    "usage.view": frozenset(Role.values),
    "members.view": frozenset(Role.values),
    "members.manage": frozenset({Role.OWNER, Role.ADMIN}),
    "keys.view": frozenset(Role.values),
    "keys.manage": frozenset({Role.OWNER, Role.ADMIN, Role.DEVELOPER}),
    "billing.view": frozenset({Role.OWNER, Role.ADMIN, Role.BILLING}),
    "billing.manage": frozenset({Role.OWNER, Role.BILLING}),
    "audit.view": frozenset({Role.OWNER, Role.ADMIN}),
    # The organisation's private model endpoints (register, check, disable, delete).
    "endpoints.view": frozenset(Role.values),
    "endpoints.manage": frozenset({Role.OWNER, Role.ADMIN}),
    # Spends the organisation's credit through its platform-managed playground key.
    "playground.use": frozenset({Role.OWNER, Role.ADMIN, Role.DEVELOPER}),
}


def role_allows(role: str, permission: str) -> bool:
    return role in PERMISSIONS[permission]


def role_permissions(role: str) -> dict[str, bool]:
    """``{"keys.manage": True, ...}`` with dots replaced by underscores, for templates."""
    return {name.replace(".", "_"): role in roles for name, roles in PERMISSIONS.items()}


# --- organisations and members ----------------------------------------------------------


def user_memberships(*, user: Any) -> list[Membership]:
    return list(
        Membership.objects.filter(user=user)
        .select_related("organization")
        .order_by("organization__name", "organization__pk")
    )


def membership_for(*, user: Any, slug: str) -> Membership | None:
    """The user's membership of the organisation ``slug`` (None: not a member)."""
    if not getattr(user, "is_authenticated", False):
        return None
    return (
        Membership.objects.filter(user=user, organization__slug=slug)
        .select_related("organization")
        .first()
    )


def organization_members(*, organization: Organization) -> list[Membership]:
    return list(
        Membership.objects.filter(organization=organization)
        .select_related("user")
        .order_by("created_at", "pk")
    )


def organization_member(*, organization: Organization, pk: int) -> Membership | None:
    return (
        Membership.objects.filter(organization=organization, pk=pk).select_related("user").first()
    )


def organization_invitations_open(*, organization: Organization) -> list[Invitation]:
    return list(
        Invitation.objects.filter(
            organization=organization,
            accepted_at__isnull=True,
            revoked_at__isnull=True,
            expires_at__gt=timezone.now(),
        ).order_by("-created_at")
    )


def organization_invitation(*, organization: Organization, pk: int) -> Invitation | None:
    return Invitation.objects.filter(organization=organization, pk=pk).first()


def invitation_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invitation_by_token(token: str) -> Invitation | None:
    return (
        Invitation.objects.filter(token_hash=invitation_token_hash(token))
        .select_related("organization")
        .first()
    )


def user_emails(user: Any) -> set[str]:
    """The addresses that prove who the user is: verified ones (all when not verifying)."""
    from allauth.account.models import EmailAddress

    addresses = EmailAddress.objects.filter(user=user)
    if getattr(settings, "ACCOUNT_EMAIL_VERIFICATION", "mandatory") != "none":
        addresses = addresses.filter(verified=True)
    emails = {address.lower() for address in addresses.values_list("email", flat=True)}
    if getattr(settings, "ACCOUNT_EMAIL_VERIFICATION", "mandatory") == "none" and user.email:
        emails.add(user.email.lower())
    return emails


def invitations_for_user(*, user: Any) -> list[Invitation]:
    """Open invitations addressed to one of the user's (verified) email addresses."""
    emails = user_emails(user)
    if not emails:
        return []
    query = Q()
    for email in emails:
        query |= Q(email__iexact=email)
    return list(
        Invitation.objects.filter(
            query, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
        )
        .exclude(organization__memberships__user=user)
        .select_related("organization")
        .order_by("-created_at")
    )


# --- API keys -----------------------------------------------------------------------------


def organization_api_keys(*, organization: Organization) -> list[ApiKey]:
    """The organisation's keys, newest first, each with ``last_used_at`` (None: unused)."""
    keys = list(
        ApiKey.objects.filter(organization=organization).order_by("revoked_at", "-created_at")
    )
    last_used = dict(
        UsageRecord.objects.filter(organization=organization, api_key__in=keys)
        .values("api_key_id")
        .annotate(last=Max("occurred_at"))
        .values_list("api_key_id", "last")
        .order_by()
    )
    for key in keys:
        key.last_used_at = last_used.get(key.pk)  # type: ignore[attr-defined]
    return keys


def organization_api_key(*, organization: Organization, pk: int) -> ApiKey | None:
    return ApiKey.objects.filter(organization=organization, pk=pk).first()


def api_key_by_hash(key_hash: str) -> ApiKey | None:
    """The key with this hash, with its organisation and creator (for the management API)."""
    return (
        ApiKey.objects.filter(key_hash=key_hash)
        .select_related("organization", "created_by")
        .first()
    )


# --- money ---------------------------------------------------------------------------------


def organization_ledger(*, organization: Organization) -> QuerySet[LedgerEntry]:
    """The entries of the organisation's credit account, newest first, each annotated
    with ``balance_after`` (the balance once that transaction was posted)."""
    return (
        LedgerEntry.objects.filter(account__code=f"org:{organization.pk}:credit")
        .select_related("transaction")
        .annotate(
            balance_after=Window(
                Sum("amount"),
                order_by=[F("transaction__created_at").asc(), F("pk").asc()],
            )
        )
        .order_by("-transaction__created_at", "-pk")
    )


# --- usage ---------------------------------------------------------------------------------

MAX_USAGE_DAYS = 93


class Percentile(Aggregate):  # type: ignore[type-arg]
    """PostgreSQL's ``percentile_cont(p) WITHIN GROUP (ORDER BY expr)``."""

    function = "percentile_cont"
    template = "%(function)s(%(percentile)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: Any, percentile: float, **extra: Any) -> None:
        if not 0.0 <= percentile <= 1.0:
            raise ValueError("a percentile lies between 0 and 1")
        super().__init__(expression, percentile=repr(float(percentile)), **extra)


def _usage_metrics() -> dict[str, Any]:
    return {
        "requests": Count("id"),
        "errors": Count("id", filter=~Q(outcome=UsageRecord.Outcome.SUCCESS)),
        "spend": Coalesce(Sum("cost"), 0),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "p50": Percentile("latency_ms", 0.5),
        "p95": Percentile("latency_ms", 0.95),
    }


@dataclass
class UsageRow:
    label: str
    detail: str = ""
    requests: int = 0
    errors: int = 0
    spend: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    p50: float | None = None
    p95: float | None = None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass
class CacheAndPrivacy:
    """Answers served from the response cache and prompts the privacy guard acted on."""

    cache_hits: int = 0
    semantic_hits: int = 0
    cache_saved: int = 0  # nano-USD the cached answers cost when a vendor first answered
    redacted: int = 0  # requests whose personal data was redacted
    redacted_entities: int = 0
    trusted_only: int = 0  # requests kept on trusted endpoints


@dataclass
class UsageReport:
    start: date
    end: date  # inclusive
    total: UsageRow
    guard: CacheAndPrivacy = field(default_factory=CacheAndPrivacy)
    days: list[tuple[date, UsageRow]] = field(default_factory=list)
    by_key: list[UsageRow] = field(default_factory=list)
    by_endpoint: list[UsageRow] = field(default_factory=list)
    by_vendor: list[UsageRow] = field(default_factory=list)

    def chart_data(self) -> dict[str, Any]:
        """The per-day series for the chart (spend in USD as a float: display only)."""
        return {
            "labels": [day.isoformat() for day, _ in self.days],
            "spend_usd": [row.spend / 1_000_000_000 for _, row in self.days],
            "requests": [row.requests for _, row in self.days],
            "errors": [row.errors for _, row in self.days],
        }


def usage_window(start: date, end: date) -> tuple[datetime, datetime]:
    """The UTC datetimes ``[start 00:00, end+1 00:00)`` for a range of whole days."""
    tz = timezone.get_current_timezone()
    return (
        datetime.combine(start, time.min, tzinfo=tz),
        datetime.combine(end + timedelta(days=1), time.min, tzinfo=tz),
    )


def _usage_records(*, organization: Organization, start: date, end: date) -> QuerySet[UsageRecord]:
    since, until = usage_window(start, end)
    return UsageRecord.objects.filter(
        organization=organization, occurred_at__gte=since, occurred_at__lt=until
    )


def _row(label: str, values: Mapping[str, Any], detail: str = "") -> UsageRow:
    return UsageRow(
        label=label,
        detail=detail,
        requests=values["requests"],
        errors=values["errors"],
        spend=int(values["spend"]),
        prompt_tokens=int(values["prompt_tokens"]),
        completion_tokens=int(values["completion_tokens"]),
        p50=values["p50"],
        p95=values["p95"],
    )


def _grouped(records: QuerySet[UsageRecord], *fields: str) -> list[dict[str, Any]]:
    """The usage metrics of ``records`` grouped by ``fields``, largest spend first."""
    rows: Any = records.values(*fields).annotate(**_usage_metrics()).order_by()
    return sorted(rows, key=lambda row: (-row["spend"], str(row[fields[0]])))


def usage_report(*, organization: Organization, start: date, end: date) -> UsageReport:
    """Spend, requests, tokens, errors and latency percentiles of ``organization`` over the
    days ``start``..``end`` (inclusive, UTC): in total, per day (every day present), and by
    API key, endpoint and vendor (largest spend first)."""
    records = _usage_records(organization=organization, start=start, end=end)
    metrics = _usage_metrics()
    report = UsageReport(start=start, end=end, total=_row("Total", records.aggregate(**metrics)))
    guard = records.aggregate(
        cache_hits=Count("id", filter=~Q(cache="")),
        semantic_hits=Count("id", filter=Q(cache="semantic")),
        cache_saved=Coalesce(Sum("cache_saved"), 0),
        redacted=Count("id", filter=Q(privacy_action="redacted")),
        redacted_entities=Coalesce(Sum("privacy_found", filter=Q(privacy_action="redacted")), 0),
        trusted_only=Count("id", filter=Q(privacy_action="trusted_only")),
    )
    report.guard = CacheAndPrivacy(**{k: int(v) for k, v in guard.items()})

    per_day = {
        row["day"]: _row(row["day"].isoformat(), row)
        for row in _grouped(records.annotate(day=TruncDate("occurred_at")), "day")
    }
    day = start
    while day <= end:
        report.days.append((day, per_day.get(day) or UsageRow(label=day.isoformat())))
        day += timedelta(days=1)

    for row in _grouped(records, "api_key_id", "api_key__name", "api_key__prefix"):
        label = row["api_key__name"] or "(deleted key)"
        prefix = f"sy-{row['api_key__prefix']}-…" if row["api_key__prefix"] else ""
        report.by_key.append(_row(label, row, prefix))
    for row in _grouped(
        records, "endpoint_id", "endpoint__slug", "endpoint__vendor__slug", "cache"
    ):
        if row["endpoint__slug"]:
            label = f"{row['endpoint__vendor__slug']}/{row['endpoint__slug']}"
        elif row["cache"]:
            label = f"(response cache, {row['cache']})"
        else:
            label = "(no endpoint answered)"
        report.by_endpoint.append(_row(label, row))
    for row in _grouped(records, "vendor_id", "vendor__name", "cache"):
        if row["vendor__name"]:
            label = row["vendor__name"]
        else:
            label = "(response cache)" if row["cache"] else "(no vendor)"
        report.by_vendor.append(_row(label, row))
    return report


def usage_records_export(
    *, organization: Organization, start: date, end: date
) -> Iterator[UsageRecord]:
    """Every usage record of the range, oldest first, streamed from the database."""
    return (
        _usage_records(organization=organization, start=start, end=end)
        .select_related("api_key", "endpoint__vendor", "vendor")
        .order_by("occurred_at", "pk")
        .iterator(chunk_size=2000)
    )


def usage_records(
    *,
    organization: Organization,
    start: date | None = None,
    end: date | None = None,
    api_key_id: int | None = None,
    endpoint: str | None = None,
) -> QuerySet[UsageRecord]:
    """The organisation's usage records, newest first, optionally within the days
    ``start``..``end`` (inclusive, UTC), of one key (by id) or one endpoint
    (``vendor/endpoint``)."""
    records = UsageRecord.objects.filter(organization=organization)
    if start is not None:
        records = records.filter(occurred_at__gte=usage_window(start, start)[0])
    if end is not None:
        records = records.filter(occurred_at__lt=usage_window(end, end)[1])
    if api_key_id is not None:
        records = records.filter(api_key_id=api_key_id)
    if endpoint is not None:
        vendor_slug, _, endpoint_slug = endpoint.partition("/")
        records = records.filter(endpoint__vendor__slug=vendor_slug, endpoint__slug=endpoint_slug)
    return records.select_related("api_key", "endpoint__vendor").order_by("-occurred_at", "-pk")


# --- the public catalog ----------------------------------------------------------------


@dataclass(frozen=True)
class CatalogEntry:
    endpoint: Endpoint
    tags: list[str]
    quality: float
    quality_measured: bool
    uptime: float | None


@dataclass(frozen=True)
class CatalogTag:
    slug: str
    name: str
    kind: str
    description: str
    endpoints: int


def catalog(*, tag: str | None = None) -> tuple[list[CatalogEntry], list[CatalogTag]]:
    """Approved public endpoints (optionally those with ``tag``) with their overall quality
    and one-day uptime, and every capability tag served by at least one of them."""
    endpoints = catalog_endpoints()
    ids = [e.pk for e in endpoints]
    qualities = quality_map(ids)
    uptimes = uptime_map(ids)
    entries = []
    counts: dict[str, int] = {}
    for endpoint in endpoints:
        tags = sorted(t.slug for t in endpoint.tags.all())
        for slug in tags:
            counts[slug] = counts.get(slug, 0) + 1
        if tag and tag not in tags:
            continue
        overall = qualities[endpoint.pk].get(OVERALL)
        entries.append(
            CatalogEntry(
                endpoint=endpoint,
                tags=tags,
                quality=overall if overall is not None else PRIOR,
                quality_measured=overall is not None,
                uptime=uptimes[endpoint.pk],
            )
        )
    tags_listed = [
        CatalogTag(t.slug, t.name, t.get_kind_display(), t.description, counts[t.slug])
        for t in CapabilityTag.objects.filter(slug__in=counts).order_by("kind", "slug")
    ]
    return entries, tags_listed


# --- audit ---------------------------------------------------------------------------------


def audit_entries(*, organization: Organization | None = None) -> QuerySet[AuditLogEntry]:
    """Audit entries newest first; of one organisation when given, else all (staff only)."""
    entries = AuditLogEntry.objects.select_related("actor").order_by("-created_at", "-pk")
    if organization is not None:
        entries = entries.filter(organization=organization)
    return entries
