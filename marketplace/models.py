"""Customers: organisations, their members and their API keys."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone


class PrivacyPolicy(models.TextChoices):
    OFF = "off", "Off"
    REDACT = "redact", "Redact personal data before it leaves for a vendor"
    TRUSTED_ONLY = "trusted_only", "Send prompts with personal data only to trusted endpoints"


class Organization(models.Model):
    class BillingMode(models.TextChoices):
        PREPAID = "prepaid", "Prepaid credits"
        INVOICED = "invoiced", "Monthly invoice"

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    billing_mode = models.CharField(
        max_length=16, choices=BillingMode.choices, default=BillingMode.PREPAID
    )
    created_at = models.DateTimeField(default=timezone.now)
    # Budget alerts and cost savings (set on the console's budget page).
    monthly_budget = models.BigIntegerField(
        null=True, blank=True, help_text="Spend per calendar month (UTC) in nano-USD; empty: none."
    )
    budget_alert_percent = models.PositiveSmallIntegerField(
        default=80,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="Warn when month-to-date spend reaches this share of the budget.",
    )
    low_balance_alert = models.BigIntegerField(
        null=True, blank=True, help_text="Warn when the credit balance falls below this (nano-USD)."
    )
    reference_price_input = models.BigIntegerField(
        null=True, blank=True, help_text="Reference model: nano-USD per million input tokens."
    )
    reference_price_output = models.BigIntegerField(
        null=True, blank=True, help_text="Reference model: nano-USD per million output tokens."
    )
    # Privacy guard and response cache defaults (the console's data & cache page).
    privacy_policy = models.CharField(
        max_length=16,
        choices=PrivacyPolicy.choices,
        default=PrivacyPolicy.OFF,
        help_text="What to do when a prompt contains personal data.",
    )
    trusted_regions = models.CharField(
        max_length=200,
        blank=True,
        default="",
        help_text="trusted_only: also keep such prompts in these regions (comma-separated).",
    )
    cache_ttl = models.PositiveIntegerField(
        default=0, help_text="Seconds a cached answer is reused; 0: no cache unless asked."
    )
    cache_similarity = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(500), MaxValueValidator(1000)],
        help_text="Semantic cache: cosine similarity x 1000 to reuse an answer; empty: exact only.",
    )
    # The customer's routing policy: a ``provider`` object merged under every request's
    # (routing.policy.merge_provider); checked by marketplace.data_policy on the way in.
    routing_defaults = models.JSONField(
        default=dict,
        blank=True,
        help_text="Default provider policy (only, ignore, order, sort, max_price, region, ...).",
    )

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(budget_alert_percent__gte=1, budget_alert_percent__lte=100),
                name="org_budget_alert_percent_range",
            )
        ]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        DEVELOPER = "developer", "Developer"
        BILLING = "billing", "Billing"

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="org_memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.DEVELOPER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="uniq_org_member")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"


class ApiKey(models.Model):
    """A customer's API key. The key itself is shown once; only a prefix and a keyed hash
    (HMAC-SHA256 with ``API_KEY_PEPPER``) are stored."""

    class Period(models.TextChoices):
        NEVER = "never", "Never"
        DAILY = "daily", "Daily"
        WEEKLY = "weekly", "Weekly"
        MONTHLY = "monthly", "Monthly"

    class Kind(models.TextChoices):
        STANDARD = "standard", "Standard"
        # Managed by the platform for the console's playground: its plaintext never leaves
        # the server (it is re-derived there, see ``marketplace/playground.py``).
        PLAYGROUND = "playground", "Console playground"

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.STANDARD)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(default=list, blank=True)
    credit_limit = models.BigIntegerField(
        null=True, blank=True, help_text="Spend limit per period in nano-USD; empty: none."
    )
    credit_limit_period = models.CharField(
        max_length=8, choices=Period.choices, default=Period.NEVER
    )
    rate_limit_rpm = models.PositiveIntegerField(null=True, blank=True)
    rate_limit_tpm = models.PositiveIntegerField(null=True, blank=True)
    # Overrides of the organisation's privacy and cache settings; empty: inherit.
    privacy_policy = models.CharField(
        max_length=16, choices=PrivacyPolicy.choices, blank=True, default=""
    )
    cache_ttl = models.PositiveIntegerField(null=True, blank=True)
    cache_similarity = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MinValueValidator(500), MaxValueValidator(1000)]
    )
    # Opt-in: keep the prompt and the completion in this key's route traces (never by default).
    log_content = models.BooleanField(
        default=False, help_text="Store prompts and completions in the route traces."
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization"],
                condition=models.Q(kind="playground", revoked_at__isnull=True),
                name="uniq_live_playground_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        now = timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class Invitation(models.Model):
    """An invitation by email to join an organisation with a role.

    The link in the email carries a random token; only its SHA-256 is stored. It is
    accepted once, by a signed-in user with a matching (verified) email address.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="invitations"
    )
    email = models.EmailField()
    role = models.CharField(
        max_length=16, choices=Membership.Role.choices, default=Membership.Role.DEVELOPER
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
                fields=["organization", "email"],
                condition=models.Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="uniq_open_invitation",
            )
        ]

    def __str__(self) -> str:
        return f"{self.email} to {self.organization} ({self.role})"

    @property
    def is_open(self) -> bool:
        return (
            self.accepted_at is None
            and self.revoked_at is None
            and self.expires_at > timezone.now()
        )


class AuditLogEntry(models.Model):
    """Who changed what, from the consoles and the operations pages. Append-only.

    A database trigger refuses DELETE and every UPDATE except the ``SET NULL`` that
    deleting a user or an organisation causes (``actor_repr`` keeps who it was).
    """

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="audit_entries",
    )
    actor_repr = models.CharField(max_length=254, blank=True)
    organization = models.ForeignKey(
        Organization,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="audit_entries",
        help_text="The customer organisation concerned, if any.",
    )
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        verbose_name_plural = "audit log entries"
        indexes = [
            models.Index(fields=["organization", "created_at"], name="audit_org_created"),
            models.Index(fields=["target_type", "target_id"], name="audit_target"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M} {self.actor_repr} {self.action}"
