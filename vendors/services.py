"""Write operations on vendors and their endpoints."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import timedelta

import orjson
from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.db.models import (
    Avg,
    Case,
    CharField,
    Count,
    F,
    FloatField,
    Func,
    Q,
    Sum,
    Value,
    When,
)
from django.utils import timezone
from django.utils.text import slugify

from marketplace import invalidation
from marketplace.models import Organization
from marketplace.redis_client import sync_client
from vendors.conformance import conformance_check
from vendors.crypto import encrypt_secret
from vendors.models import (
    CapabilityTag,
    ConformanceReport,
    Endpoint,
    EndpointQuality,
    Feedback,
    HealthCheck,
    ProbeResult,
    Vendor,
    VendorMembership,
)
from vendors.pricing import SurgeCurveError, validate_surge_curve
from vendors.probes import HEALTH_KEY_TTL_SECONDS, health_key, probe_health, probe_quality
from vendors.quality import (
    FEEDBACK_WINDOW,
    MATERIAL_CHANGE,
    OVERALL,
    PRIOR,
    PROBE_WINDOW,
    Evidence,
    blended_score,
    decayed_counters,
    probe_tags,
)
from vendors.ssrf import UnsafeURLError, check_url
from vendors.tag_examples import TagExamplesError, tag_examples_clean


class VendorError(Exception):
    """A vendor or endpoint change that cannot be made; the message says why."""


def _snapshot_changed() -> None:
    invalidation.publish_after_commit(invalidation.SNAPSHOT)


def _quality_changed() -> None:
    """Scores moved: gateways reload in the background (no request waits for it)."""
    invalidation.publish_after_commit(invalidation.QUALITY)


@transaction.atomic
def vendor_create(*, name: str, slug: str | None = None, owner: User | None = None) -> Vendor:
    """Register a vendor; it stays pending until an admin approves it."""
    name = name.strip()
    if not name:
        raise VendorError("a vendor needs a name")
    slug = slugify(slug or name)[:64]
    if not slug:
        raise VendorError("the vendor's name gives no usable slug")
    if Vendor.objects.filter(slug=slug).exists():
        raise VendorError(f"a vendor with the slug {slug!r} exists already")
    vendor = Vendor.objects.create(name=name, slug=slug)
    if owner is not None:
        VendorMembership.objects.create(vendor=vendor, user=owner, role=VendorMembership.Role.OWNER)
    return vendor


def _set_vendor_status(vendor: Vendor, status: str) -> Vendor:
    locked = Vendor.objects.select_for_update().get(pk=vendor.pk)
    if locked.status != status:
        locked.status = status
        locked.save(update_fields=["status"])
        _snapshot_changed()
    return locked


@transaction.atomic
def vendor_approve(*, vendor: Vendor) -> Vendor:
    return _set_vendor_status(vendor, Vendor.Status.APPROVED)


@transaction.atomic
def vendor_suspend(*, vendor: Vendor) -> Vendor:
    """Suspend a vendor: none of its endpoints is routed to until it is resumed."""
    return _set_vendor_status(vendor, Vendor.Status.SUSPENDED)


@transaction.atomic
def vendor_resume(*, vendor: Vendor) -> Vendor:
    return _set_vendor_status(vendor, Vendor.Status.APPROVED)


def _declared_tag_examples(
    tag_examples: Mapping[str, Sequence[str]], tags: Sequence[str]
) -> dict[str, list[str]]:
    """``tag_examples`` checked by ``vendors.tag_examples.tag_examples_clean`` for an
    endpoint with ``tags``; a ``VendorError`` names the tag and the example's number."""
    if not isinstance(tag_examples, Mapping):
        raise VendorError("example prompts must map each capability tag to a list of prompts")
    entries: list[tuple[str, str]] = []
    numbers: list[int] = []
    for tag, texts in tag_examples.items():
        if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
            raise VendorError(f"the example prompts for {tag!r} must be a list of prompts")
        for number, text in enumerate(texts, start=1):
            entries.append((tag, text))
            numbers.append(number)
    try:
        return tag_examples_clean(entries, tags=tags)
    except TagExamplesError as exc:
        tag, _ = entries[exc.position]
        raise VendorError(f"example prompt {numbers[exc.position]} for {tag!r}: {exc}") from exc


def tags_ensure(slugs: Sequence[str]) -> list[CapabilityTag]:
    """The capability tags with these slugs, creating the missing ones."""
    tags = []
    for raw in slugs:
        slug = slugify(raw)
        if not slug or slug != raw.strip().lower():
            raise VendorError(f"{raw!r} is not a valid capability tag (letters, digits, dashes)")
        tag, _ = CapabilityTag.objects.get_or_create(slug=slug, defaults={"name": slug})
        tags.append(tag)
    return tags


@transaction.atomic
def endpoint_create(
    *,
    vendor: Vendor,
    slug: str,
    base_url: str,
    upstream_model: str,
    price_input: int,
    price_output: int,
    kind: str = Endpoint.Kind.CHAT,
    tags: Sequence[str] = (),
    secret: str = "",
    capacity: int = 4,
    context_length: int = 2048,
    domains: Sequence[str] = (),
    languages: Sequence[str] = (),
    surge_curve: list[list[float]] | None = None,
    region: str = "eu",
    data_retention_days: int = 0,
    private_to: Organization | None = None,
    tag_examples: Mapping[str, Sequence[str]] | None = None,
) -> Endpoint:
    """Register an endpoint for a vendor; it is pending until approved.

    The URL is checked against server-side request forgery here and again on every call.
    ``tag_examples`` (``{tag: [example prompt, ...]}``) are the vendor's example prompts
    for auto-routing: each key one of ``tags``, each prompt non-empty and at most
    ``MAX_EXAMPLE_CHARS`` long, at most ``MAX_VENDOR_EXAMPLES_PER_TAG`` per tag (see
    ``vendors.tag_examples``); repeated prompts are dropped. Anything else is refused with
    a ``VendorError`` naming the tag and the prompt's number, and nothing is saved.
    """
    clean_slug = slugify(slug)
    if not clean_slug or clean_slug != slug:
        raise VendorError(f"{slug!r} is not a valid endpoint slug (lowercase letters, digits, -)")
    if Endpoint.objects.filter(vendor=vendor, slug=clean_slug).exists():
        raise VendorError(f"{vendor.slug}/{clean_slug} exists already")
    if kind not in Endpoint.Kind.values:
        raise VendorError(f"unknown endpoint kind {kind!r}; use one of {Endpoint.Kind.values}")
    try:
        check_url(base_url)
    except UnsafeURLError as exc:
        raise VendorError(f"the URL is refused: {exc}") from exc
    if not upstream_model.strip():
        raise VendorError("the upstream model name is required")
    if price_input < 0 or price_output < 0:
        raise VendorError("prices cannot be negative")
    if capacity < 1:
        raise VendorError("capacity must be at least 1")
    if context_length < 16:
        raise VendorError("context length must be at least 16 tokens")
    examples = _declared_tag_examples(tag_examples or {}, tags)
    curve = surge_curve if surge_curve is not None else None
    if curve is not None:
        try:
            validate_surge_curve(curve)
        except SurgeCurveError as exc:
            raise VendorError(str(exc)) from exc
    endpoint = Endpoint(
        vendor=vendor,
        slug=clean_slug,
        kind=kind,
        base_url=base_url.rstrip("/"),
        upstream_model=upstream_model.strip(),
        secret_encrypted=encrypt_secret(secret),
        price_input=price_input,
        price_output=price_output,
        capacity=capacity,
        context_length=context_length,
        domains=list(domains),
        languages=list(languages),
        region=region,
        data_retention_days=data_retention_days,
        private_to=private_to,
        tag_examples=examples,
    )
    if curve is not None:
        endpoint.surge_curve = curve
    endpoint.save()
    endpoint.tags.set(tags_ensure(tags))
    return endpoint


def _set_endpoint_status(endpoint: Endpoint, status: str) -> Endpoint:
    locked = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    if locked.status != status:
        locked.status = status
        locked.save(update_fields=["status", "updated_at"])
        _snapshot_changed()
    return locked


@transaction.atomic
def endpoint_approve(*, endpoint: Endpoint) -> Endpoint:
    return _set_endpoint_status(endpoint, Endpoint.Status.APPROVED)


@transaction.atomic
def endpoint_suspend(*, endpoint: Endpoint) -> Endpoint:
    return _set_endpoint_status(endpoint, Endpoint.Status.SUSPENDED)


@transaction.atomic
def endpoint_resume(*, endpoint: Endpoint) -> Endpoint:
    return _set_endpoint_status(endpoint, Endpoint.Status.APPROVED)


@transaction.atomic
def endpoint_set_url(*, endpoint: Endpoint, base_url: str) -> Endpoint:
    """Point an endpoint at a new URL (checked like at registration)."""
    try:
        check_url(base_url)
    except UnsafeURLError as exc:
        raise VendorError(f"the URL is refused: {exc}") from exc
    locked = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    locked.base_url = base_url.rstrip("/")
    locked.save(update_fields=["base_url", "updated_at"])
    _snapshot_changed()
    return locked


# --- quality, health and conformance -----------------------------------------------------


class FeedbackError(VendorError):
    """Feedback that cannot be recorded (bad score, tags or request id)."""


FEEDBACK_MAX_TAGS = 16
FEEDBACK_MAX_COMMENT = 2000


def endpoint_probe_health(*, endpoint: Endpoint) -> HealthCheck:
    """Probe ``endpoint`` once, record a ``HealthCheck`` and publish it for the gateway.

    The latest outcome is also written to Redis (``vendors.probes.health_key``) as JSON
    ``{ok, status, latency_ms, checked_at}`` (``checked_at`` in Unix seconds) with a
    ten-minute TTL, and fed to the endpoint's circuit breaker, which every gateway replica
    reads (``routing.live.record_health_probe``: failures open it, a healthy probe after the
    cooldown closes it).
    """
    outcome = probe_health(endpoint)
    check = HealthCheck.objects.create(
        endpoint=endpoint,
        ok=outcome.ok,
        status=outcome.status,
        latency_ms=outcome.latency_ms,
        error=outcome.error[:300],
    )
    payload = {
        "ok": check.ok,
        "status": check.status,
        "latency_ms": check.latency_ms,
        "checked_at": check.checked_at.timestamp(),
    }
    client = sync_client()
    client.set(health_key(endpoint.pk), json.dumps(payload), ex=HEALTH_KEY_TTL_SECONDS)
    from routing.live import record_health_probe  # routing imports vendors, not the reverse

    record_health_probe(
        client,
        endpoint.pk,
        ok=check.ok,
        threshold=settings.GATEWAY_CIRCUIT_FAILURES,
        cooldown=settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS,
    )
    return check


def endpoint_probe_quality(
    *, endpoint: Endpoint, tags: Sequence[str] | None = None
) -> list[ProbeResult]:
    """Send the golden sets (``general`` and the endpoint's tags, or ``tags``) to a chat
    endpoint, record one ``ProbeResult`` per item and recompute its quality scores."""
    if endpoint.kind != Endpoint.Kind.CHAT:
        return []
    wanted = list(tags) if tags is not None else probe_tags({t.slug for t in endpoint.tags.all()})
    outcomes = probe_quality(endpoint, wanted)
    results = ProbeResult.objects.bulk_create(
        ProbeResult(
            endpoint=endpoint,
            tag=o.tag,
            item_id=o.item_id,
            passed=o.passed,
            latency_ms=o.latency_ms,
            error=o.error[:300],
        )
        for o in outcomes
    )
    quality_recompute(endpoint)
    return results


def _feedback_tags(tags: Sequence[str] | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    clean = []
    for raw in tags:
        tag = raw.strip().lower() if isinstance(raw, str) else ""
        if not tag or tag == OVERALL or slugify(tag) != tag or len(tag) > 64:
            raise FeedbackError(f"{raw!r} is not a capability tag")
        if tag not in clean:
            clean.append(tag)
    if len(clean) > FEEDBACK_MAX_TAGS:
        raise FeedbackError(f"at most {FEEDBACK_MAX_TAGS} tags per feedback")
    return clean


@transaction.atomic
def feedback_record(
    *,
    organization: Organization,
    request_id: str,
    endpoint: Endpoint,
    tags: Sequence[str] | None,
    score: float,
    comment: str = "",
) -> Feedback:
    """Record (or, for a request already rated, replace) a customer's 0..1 rating.

    The caller has checked that the request belongs to ``organization`` and was served by
    ``endpoint``. Repeating the call with the same request id updates the one row.
    """
    if not isinstance(request_id, str) or not request_id.strip() or len(request_id) > 100:
        raise FeedbackError("the request id must be a string of 1-100 characters")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise FeedbackError("the score must be a number between 0 and 1")
    if not 0.0 <= score <= 1.0:
        raise FeedbackError("the score must be between 0 and 1")
    if not isinstance(comment, str) or len(comment) > FEEDBACK_MAX_COMMENT:
        raise FeedbackError(f"the comment must be text of at most {FEEDBACK_MAX_COMMENT} chars")
    clean_tags = _feedback_tags(tags)
    values = {"endpoint": endpoint, "tags": clean_tags, "score": float(score), "comment": comment}
    key = {"organization": organization, "request_id": request_id.strip()}
    feedback = Feedback.objects.select_for_update().filter(**key).first()
    if feedback is None:
        try:
            with transaction.atomic():
                feedback = Feedback.objects.create(**key, **values)
        except IntegrityError:  # the same request rated concurrently: update that row
            feedback = Feedback.objects.select_for_update().get(**key)
        else:
            quality_recompute(endpoint)
            return feedback
    previous_endpoint = feedback.endpoint
    for name, value in values.items():
        setattr(feedback, name, value)
    feedback.save(update_fields=[*values, "updated_at"])
    quality_recompute(endpoint)
    if previous_endpoint.pk != endpoint.pk:
        quality_recompute(previous_endpoint)
    return feedback


def _quality_rows(endpoint_id: int, tags: set[str]) -> list[EndpointQuality]:
    """The endpoint's quality rows for ``tags`` (created if missing), locked in tag order."""
    EndpointQuality.objects.bulk_create(
        [EndpointQuality(endpoint_id=endpoint_id, tag=tag, score=PRIOR) for tag in sorted(tags)],
        ignore_conflicts=True,
    )
    return list(
        EndpointQuality.objects.select_for_update()
        .filter(endpoint_id=endpoint_id, tag__in=tags)
        .order_by("tag")
    )


def _rescore(row: EndpointQuality) -> bool:
    """Set ``row.score`` from its counters; True if it moved materially."""
    before = row.score
    row.score = blended_score(
        Evidence(
            probe_pass=row.probe_pass,
            probe_n=row.probe_n,
            feedback_sum=row.feedback_sum,
            feedback_n=row.feedback_n,
            success_n=row.success_n,
            total_n=row.total_n,
        )
    )
    return abs(row.score - before) > MATERIAL_CHANGE


Observation = tuple[int, str | None, int, int]  # (endpoint id, tag, successes, total)


def quality_observe(endpoint_id: int, tag: str | None, successes: int, total: int) -> None:
    """Add served requests to the success counters of ``tag`` and of the overall ``"*"``.

    ``tag`` None (or ``"*"``) counts towards the overall score only, so give each request
    one tag (the first it was routed by) lest the overall count it twice.
    """
    quality_observe_many([(endpoint_id, tag, successes, total)])


def quality_observe_many(observations: Sequence[Observation]) -> None:
    """``quality_observe`` for a whole ingest batch: three statements, however many endpoints.

    Usage ingest calls it with counts aggregated per batch and (endpoint, tag). Rows are
    created if missing and locked in (endpoint, tag) order, the same order in every worker.
    Observations of endpoints deleted meanwhile are dropped.
    """
    for _, _, successes, total in observations:
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (successes, total)):
            raise VendorError("successes and total must be integers")
        if not 0 <= successes <= total:
            raise VendorError("successes must lie between 0 and total")
    counts: dict[tuple[int, str], list[int]] = {}
    for endpoint_id, tag, successes, total in observations:
        if total == 0:
            continue
        for each in {OVERALL} if not tag or tag == OVERALL else {OVERALL, tag}:
            counter = counts.setdefault((endpoint_id, each), [0, 0])
            counter[0] += successes
            counter[1] += total
    if not counts:
        return
    # Inside the caller's transaction without a savepoint of its own (usage ingest calls it
    # once per batch): an error rolls the whole batch back, as it would anyway.
    with transaction.atomic(savepoint=False):
        _observe_counts(counts)


_CREATE_QUALITY_ROWS = (
    "INSERT INTO {table} (endpoint_id, tag, probe_pass, probe_n, feedback_sum, feedback_n,"
    " success_n, total_n, score, updated_at)"
    " SELECT r.e, r.t, 0, 0, 0, 0, 0, 0, %s, now()"
    " FROM jsonb_to_recordset(%s::jsonb) AS r(e bigint, t text)"
    " JOIN {endpoints} AS ep ON ep.id = r.e ORDER BY r.e, r.t"
    " ON CONFLICT (endpoint_id, tag) DO NOTHING"
)


def _observe_counts(counts: dict[tuple[int, str], list[int]]) -> None:
    # The missing rows, for endpoints that still exist, in one statement.
    with connection.cursor() as cursor:
        cursor.execute(
            _CREATE_QUALITY_ROWS.format(
                table=EndpointQuality._meta.db_table, endpoints=Endpoint._meta.db_table
            ),
            [PRIOR, orjson.dumps([{"e": e, "t": t} for e, t in sorted(counts)]).decode()],
        )
    wanted = Q()
    for endpoint_id in sorted({e for e, _ in counts}):
        wanted |= Q(endpoint_id=endpoint_id, tag__in=[t for e, t in counts if e == endpoint_id])
    rows = list(
        EndpointQuality.objects.select_for_update().filter(wanted).order_by("endpoint_id", "tag")
    )
    moved = False
    for row in rows:
        successes, total = counts[(row.endpoint_id, row.tag)]
        row.success_n, row.total_n = decayed_counters(
            row.success_n + successes, row.total_n + total
        )
        moved |= _rescore(row)
    # One set-based UPDATE: Django's bulk_update builds a CASE per column and row, a sixth
    # of an ingest batch's time (measured with cProfile on a 20-vendor batch).
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {EndpointQuality._meta.db_table} AS q"  # noqa: S608 - the model's own table
            " SET success_n = r.s, total_n = r.t, score = r.score, updated_at = now()"
            " FROM jsonb_to_recordset(%s::jsonb) AS r(id bigint, s bigint, t bigint,"
            " score double precision) WHERE q.id = r.id",
            [
                orjson.dumps(
                    [
                        {"id": row.pk, "s": row.success_n, "t": row.total_n, "score": row.score}
                        for row in rows
                    ]
                ).decode()
            ],
        )
    if moved:
        _quality_changed()


def _probe_evidence(endpoint: Endpoint) -> dict[str, tuple[float, int]]:
    """Per tag (and ``"*"``): the sum of per-item pass rates and the number of items."""
    since = timezone.now() - PROBE_WINDOW
    rates = (
        ProbeResult.objects.filter(endpoint=endpoint, created_at__gte=since, error="")
        .values("tag", "item_id")
        .annotate(
            rate=Avg(
                Case(When(passed=True, then=Value(1.0)), default=Value(0.0)),
                output_field=FloatField(),
            )
        )
    )
    evidence: dict[str, tuple[float, int]] = {}
    for row in rates:
        for tag in (row["tag"], OVERALL):
            total, n = evidence.get(tag, (0.0, 0))
            evidence[tag] = (total + row["rate"], n + 1)
    return evidence


def _feedback_evidence(endpoint: Endpoint) -> dict[str, tuple[float, int]]:
    """Per tag (and ``"*"``): the sum and count of ratings."""
    recent = Feedback.objects.filter(
        endpoint=endpoint, created_at__gte=timezone.now() - FEEDBACK_WINDOW
    )
    overall = recent.aggregate(total=Sum("score"), n=Count("id"))
    evidence = {OVERALL: (overall["total"] or 0.0, overall["n"])} if overall["n"] else {}
    per_tag = (
        recent.annotate(tag=Func(F("tags"), function="unnest", output_field=CharField()))
        .values("tag")
        .annotate(total=Sum("score"), n=Count("id"))
        .order_by()
    )
    for row in per_tag:
        evidence[row["tag"]] = (row["total"], row["n"])
    return evidence


@transaction.atomic
def quality_recompute(endpoint: Endpoint) -> dict[str, float]:
    """Re-read the probe and feedback evidence of ``endpoint`` and rescore every tag.

    Returns ``{tag: score}``. A score that moves by more than ``MATERIAL_CHANGE``
    (including a first score away from the prior) republishes the routing snapshot.
    """
    probes = _probe_evidence(endpoint)
    feedback = _feedback_evidence(endpoint)
    existing = set(EndpointQuality.objects.filter(endpoint=endpoint).values_list("tag", flat=True))
    tags = existing | set(probes) | set(feedback) | {OVERALL}
    moved = False
    scores = {}
    for row in _quality_rows(endpoint.pk, tags):
        row.probe_pass, row.probe_n = probes.get(row.tag, (0.0, 0))
        row.feedback_sum, row.feedback_n = feedback.get(row.tag, (0.0, 0))
        moved |= _rescore(row)
        row.save()
        scores[row.tag] = row.score
    if moved:
        _quality_changed()
    return scores


def endpoint_check_conformance(*, endpoint: Endpoint) -> ConformanceReport:
    """Call ``endpoint`` as the gateway will (see ``vendors.conformance``) and store the
    report; an admin approves the endpoint only after a passing one."""
    report = conformance_check(endpoint)
    report.save()
    return report


def vendor_history_prune(*, older_than: timedelta = timedelta(days=30)) -> int:
    """Delete probe results and health checks older than ``older_than`` (at least the
    probe window, which the scores are computed over); returns how many rows went."""
    cutoff = timezone.now() - max(older_than, PROBE_WINDOW)
    probes, _ = ProbeResult.objects.filter(created_at__lt=cutoff).delete()
    checks, _ = HealthCheck.objects.filter(checked_at__lt=cutoff).delete()
    return probes + checks


# --- pricing, and the audited changes of the vendor portal and the operations pages -------

MAX_SURGE_CAP = 100.0


@transaction.atomic
def endpoint_update_pricing(
    *,
    endpoint: Endpoint,
    price_input: int,
    price_output: int,
    surge_curve: list[list[float]],
    surge_cap: float,
) -> Endpoint:
    """Set an endpoint's base prices (nano-USD per million tokens), surge curve and cap.

    The curve is checked by ``vendors.pricing.validate_surge_curve``; the gateways reload
    their routing snapshot once the change commits, so quotes use the new prices from then.
    """
    for price in (price_input, price_output):
        if isinstance(price, bool) or not isinstance(price, int):
            raise VendorError("prices are whole numbers of nano-USD per million tokens")
        if price < 0:
            raise VendorError("prices cannot be negative")
    if (
        isinstance(surge_cap, bool)
        or not isinstance(surge_cap, int | float)
        or not math.isfinite(surge_cap)
        or not 1.0 <= surge_cap <= MAX_SURGE_CAP
    ):
        raise VendorError(f"the surge cap must be a number from 1 to {MAX_SURGE_CAP:g}")
    try:
        validate_surge_curve(surge_curve)
    except SurgeCurveError as exc:
        raise VendorError(str(exc)) from exc
    curve = [[float(u), float(m)] for u, m in surge_curve]
    locked = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    before = (locked.price_input, locked.price_output, locked.surge_curve, locked.surge_cap)
    after = (price_input, price_output, curve, float(surge_cap))
    if before != after:
        locked.price_input, locked.price_output, locked.surge_curve, locked.surge_cap = after
        locked.save(
            update_fields=["price_input", "price_output", "surge_curve", "surge_cap", "updated_at"]
        )
        _snapshot_changed()
    return locked


class PortalPermissionError(VendorError):
    """The actor may not make this change (not a member with the right role, not staff)."""


def _audit(**entry: object) -> None:
    # The audit log lives with the consoles in marketplace (which imports nothing from
    # here at module level, so the import stays one-way at start-up).
    from marketplace.services import audit_record

    audit_record(**entry)  # type: ignore[arg-type]


def _require_vendor_role(actor: User, vendor: Vendor, permission: str) -> None:
    from vendors.selectors import vendor_role_allows

    membership = VendorMembership.objects.filter(vendor=vendor, user=actor).first()
    if membership is None or not vendor_role_allows(membership.role, permission):
        raise PortalPermissionError("your role at this vendor does not allow that")


def _require_staff(actor: User) -> None:
    if not (getattr(actor, "is_active", False) and getattr(actor, "is_staff", False)):
        raise PortalPermissionError("only platform staff may do that")


def _pricing_state(endpoint: Endpoint) -> dict[str, object]:
    return {
        "price_input": endpoint.price_input,
        "price_output": endpoint.price_output,
        "surge_curve": endpoint.surge_curve,
        "surge_cap": endpoint.surge_cap,
    }


# Portal paths that a vendor's slug must not shadow (/vendor/<slug>/).
RESERVED_VENDOR_SLUGS = frozenset({"register", "invitations"})


@transaction.atomic
def portal_vendor_register(*, actor: User, name: str) -> Vendor:
    """Register a vendor owned by ``actor``; it stays pending until staff approve it."""
    slug = slugify(name)[:64]
    # "private-<org>" names the vendor row of an organisation's private endpoints.
    if slug in RESERVED_VENDOR_SLUGS or slug.startswith("private-"):
        raise VendorError(f"{name.strip()!r} is reserved; choose another name")
    vendor = vendor_create(name=name, owner=actor)
    _audit(
        actor=actor,
        action="vendor.register",
        target=vendor,
        details={"name": vendor.name, "slug": vendor.slug},
    )
    return vendor


@transaction.atomic
def portal_endpoint_register(*, actor: User, vendor: Vendor, **fields: object) -> Endpoint:
    """Register an endpoint of ``vendor`` (see ``endpoint_create`` for the fields)."""
    _require_vendor_role(actor, vendor, "endpoints.manage")
    if fields.get("slug") == "new":  # /vendor/<vendor>/endpoints/new/ is the form
        raise VendorError("the slug 'new' is reserved; choose another endpoint name")
    endpoint = endpoint_create(vendor=vendor, **fields)  # type: ignore[arg-type]
    _audit(
        actor=actor,
        action="endpoint.register",
        target=endpoint,
        details={
            "endpoint": endpoint.full_slug,
            "base_url": endpoint.base_url,
            "upstream_model": endpoint.upstream_model,
            "kind": endpoint.kind,
            "secret_set": bool(endpoint.secret_encrypted and fields.get("secret")),
            "example_prompts": {tag: len(v) for tag, v in endpoint.tag_examples.items()},
        },
    )
    return endpoint


@transaction.atomic
def portal_endpoint_update_pricing(
    *,
    actor: User,
    endpoint: Endpoint,
    price_input: int,
    price_output: int,
    surge_curve: list[list[float]],
    surge_cap: float,
) -> Endpoint:
    _require_vendor_role(actor, endpoint.vendor, "pricing.manage")
    before = _pricing_state(endpoint)
    updated = endpoint_update_pricing(
        endpoint=endpoint,
        price_input=price_input,
        price_output=price_output,
        surge_curve=surge_curve,
        surge_cap=surge_cap,
    )
    after = _pricing_state(updated)
    if before != after:
        _audit(
            actor=actor,
            action="endpoint.pricing",
            target=updated,
            details={"endpoint": updated.full_slug, "before": before, "after": after},
        )
    return updated


def portal_endpoint_check_conformance(*, actor: User, endpoint: Endpoint) -> ConformanceReport:
    """Run the conformance check now (it calls the endpoint; deadlines bound it) and keep
    the report. Runs outside a database transaction: no lock is held while waiting."""
    if not getattr(actor, "is_staff", False):
        _require_vendor_role(actor, endpoint.vendor, "endpoints.check")
    report = endpoint_check_conformance(endpoint=endpoint)
    _audit(
        actor=actor,
        action="endpoint.conformance",
        target=endpoint,
        details={"endpoint": endpoint.full_slug, "passed": report.passed, "report": report.pk},
    )
    return report


OPS_VENDOR_ACTIONS = {"approve": vendor_approve, "suspend": vendor_suspend, "resume": vendor_resume}
OPS_ENDPOINT_ACTIONS = {
    "approve": endpoint_approve,
    "suspend": endpoint_suspend,
    "resume": endpoint_resume,
}


@transaction.atomic
def ops_vendor_set_status(*, actor: User, vendor: Vendor, action: str) -> Vendor:
    """Approve, suspend or resume a vendor (staff only), logged when the status changes."""
    _require_staff(actor)
    if action not in OPS_VENDOR_ACTIONS:
        raise VendorError(f"unknown action {action!r}")
    before = Vendor.objects.select_for_update().get(pk=vendor.pk).status
    updated = OPS_VENDOR_ACTIONS[action](vendor=vendor)
    if updated.status != before:
        _audit(
            actor=actor,
            action=f"vendor.{action}",
            target=updated,
            details={"vendor": updated.slug, "from": before, "to": updated.status},
        )
    return updated


@transaction.atomic
def ops_endpoint_set_status(*, actor: User, endpoint: Endpoint, action: str) -> Endpoint:
    """Approve, suspend or resume an endpoint (staff only). Approval needs the endpoint's
    latest conformance report to have passed."""
    _require_staff(actor)
    if action not in OPS_ENDPOINT_ACTIONS:
        raise VendorError(f"unknown action {action!r}")
    before = Endpoint.objects.select_for_update().get(pk=endpoint.pk).status
    if action == "approve" and before != Endpoint.Status.APPROVED:
        latest = endpoint.conformance_reports.order_by("-created_at", "-pk").first()
        if latest is None or not latest.passed:
            raise VendorError("approve an endpoint only after a passing conformance check")
    updated = OPS_ENDPOINT_ACTIONS[action](endpoint=endpoint)
    if updated.status != before:
        _audit(
            actor=actor,
            action=f"endpoint.{action}",
            target=updated,
            details={"endpoint": updated.full_slug, "from": before, "to": updated.status},
        )
    return updated
