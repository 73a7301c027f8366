"""Vendors, their members, capability tags and model endpoints."""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.utils import timezone

from billing.money import format_usd


class Vendor(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending approval"
        APPROVED = "approved", "Approved"
        SUSPENDED = "suspended", "Suspended"

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    stripe_account_id = models.CharField(max_length=64, blank=True)
    fee_bps = models.PositiveIntegerField(
        null=True, blank=True, help_text="Platform fee in basis points; empty: the default."
    )
    private_to = models.OneToOneField(
        "marketplace.Organization",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="private_vendor",
        help_text="Set for the vendor row that owns an organisation's private endpoints: "
        "never listed, never paid out (see docs/design.md).",
    )
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name


class VendorMembership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        DEVELOPER = "developer", "Developer"

    vendor = models.ForeignKey(Vendor, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="vendor_memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.DEVELOPER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["vendor", "user"], name="uniq_vendor_member")
        ]

    def __str__(self) -> str:
        return f"{self.user} at {self.vendor} ({self.role})"


class VendorInvitation(models.Model):
    """An invitation by email to join a vendor organisation with a role.

    The twin of the customer side's ``marketplace.Invitation`` (same token scheme: the
    emailed link carries a random token, only its SHA-256 is stored; accepted once, by a
    signed-in user with a matching verified address, within ``INVITATION_TTL``), kept in its
    own table because vendors have their own roles and tenancy.
    """

    vendor = models.ForeignKey(Vendor, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(
        max_length=16,
        choices=VendorMembership.Role.choices,
        default=VendorMembership.Role.DEVELOPER,
    )
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["vendor", "email"],
                condition=models.Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="uniq_open_vendor_invitation",
            )
        ]

    def __str__(self) -> str:
        return f"{self.email} to {self.vendor} ({self.role})"

    @property
    def is_open(self) -> bool:
        return (
            self.accepted_at is None
            and self.revoked_at is None
            and self.expires_at > timezone.now()
        )


class CapabilityTag(models.Model):
    class Kind(models.TextChoices):
        TASK = "task", "Task"
        DOMAIN = "domain", "Domain"

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.TASK)
    description = models.TextField(blank=True)
    examples = models.JSONField(
        default=list,
        blank=True,
        help_text="Example prompts for this tag (a list of strings): auto-routing's classifier.",
    )

    def __str__(self) -> str:
        return self.slug


def default_surge_curve() -> list[list[float]]:
    # (utilisation threshold, multiplier): no surge below half load, up to 2x when full.
    return [[0.0, 1.0], [0.5, 1.0], [0.8, 1.5], [1.0, 2.0]]


class Endpoint(models.Model):
    class Kind(models.TextChoices):
        CHAT = "chat", "Chat completions"
        EMBEDDINGS = "embeddings", "Embeddings"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending approval"
        APPROVED = "approved", "Approved"
        SUSPENDED = "suspended", "Suspended"

    vendor = models.ForeignKey(Vendor, on_delete=models.CASCADE, related_name="endpoints")
    slug = models.SlugField(max_length=64)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.CHAT)
    base_url = models.URLField(max_length=500, help_text="OpenAI-compatible base, e.g. …/v1")
    upstream_model = models.CharField(max_length=200)
    secret_encrypted = models.TextField(blank=True)
    tags = models.ManyToManyField(CapabilityTag, related_name="endpoints", blank=True)
    domains = models.JSONField(default=list, blank=True)
    tag_examples = models.JSONField(
        default=dict,
        blank=True,
        help_text="{tag: [example prompts]} the vendor declares for auto-routing "
        "(counted only for tags the endpoint carries).",
    )
    languages = models.JSONField(default=list, blank=True)
    context_length = models.PositiveIntegerField(default=2048)
    capacity = models.PositiveIntegerField(default=4, help_text="Max concurrent requests")
    price_input = models.BigIntegerField(help_text="nano-USD per million input tokens")
    price_output = models.BigIntegerField(help_text="nano-USD per million output tokens")
    surge_curve = models.JSONField(default=default_surge_curve)
    surge_cap = models.FloatField(default=3.0)
    data_retention_days = models.PositiveIntegerField(default=0)
    region = models.CharField(max_length=32, default="eu")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    version = models.PositiveIntegerField(default=1)
    private_to = models.ForeignKey(
        "marketplace.Organization",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="private_endpoints",
        help_text="If set, only this organisation can see and route to the endpoint.",
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["vendor", "slug"], name="uniq_vendor_endpoint"),
            models.CheckConstraint(
                condition=models.Q(price_input__gte=0) & models.Q(price_output__gte=0),
                name="endpoint_prices_not_negative",
            ),
            models.CheckConstraint(condition=models.Q(capacity__gte=1), name="capacity_positive"),
        ]

    def __str__(self) -> str:
        return self.full_slug

    @property
    def full_slug(self) -> str:
        return f"{self.vendor.slug}/{self.slug}"

    @property
    def price_input_usd(self) -> str:
        return format_usd(self.price_input, places=4)

    @property
    def price_output_usd(self) -> str:
        return format_usd(self.price_output, places=4)


# --- quality, health and conformance (vendors.quality / vendors.probes / vendors.conformance)


class ProbeResult(models.Model):
    """One golden-set item sent to an endpoint by the platform, and whether it passed.

    ``error`` is set when no usable answer came back (refused URL, connection error,
    timeout, HTTP error, malformed body); such rows say nothing about quality and are
    left out of the probe score (availability is measured by health checks).
    """

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="probe_results")
    tag = models.SlugField(max_length=64)
    item_id = models.CharField(max_length=64)
    passed = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["endpoint", "created_at"], name="probe_endpoint_created"),
        ]

    def __str__(self) -> str:
        outcome = "error" if self.error else ("pass" if self.passed else "fail")
        return f"{self.endpoint_id} {self.tag}/{self.item_id}: {outcome}"


class Feedback(models.Model):
    """A customer's rating (0..1) of one answer; one row per organisation and request."""

    organization = models.ForeignKey(
        "marketplace.Organization", on_delete=models.CASCADE, related_name="feedback"
    )
    request_id = models.CharField(max_length=100)
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="feedback")
    tags = ArrayField(
        models.SlugField(max_length=64),
        default=list,
        blank=True,
        help_text="Capability tags the request was routed by; empty: overall only.",
    )
    score = models.FloatField()
    comment = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "request_id"], name="uniq_feedback_org_request"
            ),
            models.CheckConstraint(
                condition=models.Q(score__gte=0.0) & models.Q(score__lte=1.0),
                name="feedback_score_0_1",
            ),
        ]
        indexes = [
            models.Index(fields=["endpoint", "created_at"], name="feedback_endpoint_created"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id}: {self.score:.2f}"


class EndpointQuality(models.Model):
    """The evidence about an endpoint's quality for one tag ("*" = overall) and its score.

    ``score`` is computed by ``vendors.quality.blended_score`` from the counters.
    """

    OVERALL = "*"

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="quality")
    tag = models.CharField(max_length=64)
    probe_pass = models.FloatField(default=0.0, help_text="Sum of per-item pass rates")
    probe_n = models.PositiveIntegerField(default=0, help_text="Golden items with an answer")
    feedback_sum = models.FloatField(default=0.0)
    feedback_n = models.PositiveIntegerField(default=0)
    success_n = models.BigIntegerField(default=0)
    total_n = models.BigIntegerField(default=0)
    score = models.FloatField(default=0.5)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["endpoint", "tag"], name="uniq_endpoint_quality_tag"),
            models.CheckConstraint(
                condition=models.Q(success_n__gte=0) & models.Q(success_n__lte=models.F("total_n")),
                name="quality_successes_within_total",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {self.tag}: {self.score:.3f}"


class HealthCheck(models.Model):
    """One active health probe of an endpoint (``status`` is empty when nothing answered)."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="health_checks")
    ok = models.BooleanField()
    status = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.CharField(max_length=300, blank=True)
    checked_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["endpoint", "checked_at"], name="health_endpoint_checked"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {'ok' if self.ok else 'failing'} at {self.checked_at}"


class ConformanceReport(models.Model):
    """The result of calling an endpoint the way the gateway will, before it goes live.

    ``checks`` is a list of ``{name, passed, required, detail, latency_ms}``; the report
    passes when every required check passed (logprobs support is informative only).
    """

    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.CASCADE, related_name="conformance_reports"
    )
    passed = models.BooleanField()
    checks = models.JSONField(default=list)
    supports_logprobs = models.BooleanField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["endpoint", "created_at"], name="conformance_endpoint_created"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {'passed' if self.passed else 'failed'} at {self.created_at}"

    @property
    def failed_checks(self) -> list[dict[str, object]]:
        return [c for c in self.checks if c.get("required", True) and not c.get("passed")]
