"""Vendors, their members, capability tags and model endpoints."""

from __future__ import annotations

from django.conf import settings
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

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["vendor", "user"], name="uniq_vendor_member")
        ]

    def __str__(self) -> str:
        return f"{self.user} at {self.vendor} ({self.role})"


class CapabilityTag(models.Model):
    class Kind(models.TextChoices):
        TASK = "task", "Task"
        DOMAIN = "domain", "Domain"

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.TASK)
    description = models.TextField(blank=True)

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
