"""The double-entry ledger and usage records.

Every movement of money is a ``LedgerTransaction`` whose ``LedgerEntry`` rows sum to zero;
an account's balance is the sum of its entries (money received minus money sent), so
customer credit and vendor payables are positive and the outside world (Stripe, grants)
goes negative. Both tables are append-only: PostgreSQL triggers refuse UPDATE and DELETE,
and a deferred constraint trigger refuses to commit a transaction that does not balance.

Beside the ledger live the rows that tie it to the outside world (each with the unique key
that makes its processing happen once): Stripe events, top-ups, vendors' connected
accounts, settlement runs and payouts, refunds, invoices, and hourly usage rollups.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class LedgerAccount(models.Model):
    class Kind(models.TextChoices):
        CUSTOMER_CREDIT = "customer_credit", "Customer credit"
        VENDOR_PAYABLE = "vendor_payable", "Vendor payable"
        PLATFORM_REVENUE = "platform_revenue", "Platform revenue"
        PLATFORM_GRANTS = "platform_grants", "Platform grants"
        STRIPE_CLEARING = "stripe_clearing", "Stripe clearing"
        VENDOR_PAYOUTS = "vendor_payouts", "Vendor payouts"
        CUSTOMER_RECEIVABLE = "customer_receivable", "Customer receivable (invoiced)"

    code = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    organization = models.ForeignKey(
        "marketplace.Organization",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="ledger_accounts",
    )
    vendor = models.ForeignKey(
        "vendors.Vendor",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="ledger_accounts",
    )
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.code


class LedgerTransaction(models.Model):
    class Kind(models.TextChoices):
        GRANT = "grant", "Credit grant"
        DEDUCTION = "deduction", "Credit deduction"
        TOPUP = "topup", "Top-up"
        USAGE = "usage", "Usage charge"
        REFUND = "refund", "Refund"
        PAYOUT = "payout", "Vendor payout"
        INVOICE = "invoice", "Invoice issued"
        INVOICE_PAYMENT = "invoice_payment", "Invoice paid"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    idempotency_key = models.CharField(max_length=200, unique=True)
    memo = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"{self.kind} {self.idempotency_key}"


class LedgerEntry(models.Model):
    transaction = models.ForeignKey(
        LedgerTransaction, on_delete=models.PROTECT, related_name="entries"
    )
    # Indexed by the (account, transaction) index below; a separate one would only slow ingest.
    account = models.ForeignKey(
        LedgerAccount, on_delete=models.PROTECT, related_name="entries", db_index=False
    )
    amount = models.BigIntegerField(help_text="nano-USD; positive: received, negative: sent")

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~models.Q(amount=0), name="entry_amount_not_zero")
        ]
        indexes = [models.Index(fields=["account", "transaction"])]

    def __str__(self) -> str:
        return f"{self.account_id}: {self.amount}"


class UsageRecord(models.Model):
    """One metered request: what was asked, who served it, at what quoted price."""

    class Outcome(models.TextChoices):
        SUCCESS = "success", "Success"
        PARTIAL = "partial", "Stream broken after bytes were sent"
        FAILED = "failed", "Failed"

    request_id = models.CharField(max_length=64, unique=True)
    # organization and vendor are indexed by the (…, occurred_at) indexes below.
    organization = models.ForeignKey(
        "marketplace.Organization",
        on_delete=models.PROTECT,
        related_name="usage_records",
        db_index=False,
    )
    api_key = models.ForeignKey(
        "marketplace.ApiKey", null=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    endpoint = models.ForeignKey(
        "vendors.Endpoint", null=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    vendor = models.ForeignKey(
        "vendors.Vendor",
        null=True,
        on_delete=models.SET_NULL,
        related_name="usage_records",
        db_index=False,
    )
    model_requested = models.CharField(max_length=200)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    price_input = models.BigIntegerField(help_text="quoted nano-USD per million input tokens")
    price_output = models.BigIntegerField(help_text="quoted nano-USD per million output tokens")
    cost = models.BigIntegerField(default=0)
    vendor_share = models.BigIntegerField(default=0)
    platform_fee = models.BigIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    attempts = models.PositiveSmallIntegerField(default=1)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    stream = models.BooleanField(default=False)
    # The batch's usage transaction: one per ingested batch, its legs the sums of its
    # records' cost (customer credit, per organisation), vendor_share (payable, per vendor)
    # and platform_fee (revenue). Null for a free request.
    transaction = models.ForeignKey(
        LedgerTransaction, null=True, on_delete=models.PROTECT, related_name="usage_records"
    )
    # Response cache: "" (not served from the cache), "exact" or "semantic"; a hit pays no
    # vendor and ``cache_saved`` is what the original answer cost.
    cache = models.CharField(max_length=8, blank=True, default="")
    cache_saved = models.BigIntegerField(default=0)
    # Privacy guard: what was done ("" none, "redacted", "trusted_only") and how many
    # personal-data entities of which kinds were found (kinds only, never the values).
    privacy_action = models.CharField(max_length=16, blank=True, default="")
    privacy_found = models.PositiveIntegerField(default=0)
    privacy_kinds = models.CharField(max_length=200, blank=True, default="")
    occurred_at = models.DateTimeField()
    ingested_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["organization", "occurred_at"]),
            models.Index(fields=["vendor", "occurred_at"]),
        ]

    def __str__(self) -> str:
        return self.request_id


# --- Stripe -------------------------------------------------------------------------------


class StripeEvent(models.Model):
    """A verified Stripe webhook event, stored once by its id and processed once."""

    class Source(models.TextChoices):
        PLATFORM = "platform", "Platform"
        CONNECT = "connect", "Connect"

    class Status(models.TextChoices):
        RECEIVED = "received", "Received"
        PROCESSED = "processed", "Processed"
        IGNORED = "ignored", "Ignored (no handler)"

    event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100, db_index=True)
    source = models.CharField(max_length=16, choices=Source.choices)
    account = models.CharField(max_length=64, blank=True, help_text="connected account")
    livemode = models.BooleanField(default=False)
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.type} {self.event_id}"


class TopUp(models.Model):
    """A customer's purchase of prepaid credit through Stripe Checkout."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        PAID = "paid", "Paid"
        FAILED = "failed", "Failed"

    organization = models.ForeignKey(
        "marketplace.Organization", on_delete=models.PROTECT, related_name="topups"
    )
    amount_cents = models.PositiveIntegerField()
    amount = models.BigIntegerField(help_text="nano-USD credited when paid")
    currency = models.CharField(max_length=3, default="usd")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    stripe_session_id = models.CharField(max_length=255, unique=True, null=True, blank=True)
    checkout_url = models.URLField(max_length=2000, blank=True)
    failure_reason = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    transaction = models.OneToOneField(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="topup"
    )
    created_at = models.DateTimeField(default=timezone.now)
    paid_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(amount_cents__gt=0), name="topup_positive")
        ]

    def __str__(self) -> str:
        return f"top-up {self.pk} ({self.status})"


class StripeCustomer(models.Model):
    """The Stripe customer that an invoiced organisation is billed as."""

    organization = models.OneToOneField(
        "marketplace.Organization", on_delete=models.PROTECT, related_name="stripe_customer"
    )
    stripe_customer_id = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.stripe_customer_id


# --- vendors' money -----------------------------------------------------------------------


class VendorPayoutAccount(models.Model):
    """A vendor's Stripe Connect (Express) account and what Stripe last told us about it."""

    vendor = models.OneToOneField(
        "vendors.Vendor", on_delete=models.PROTECT, related_name="payout_account"
    )
    stripe_account_id = models.CharField(max_length=64, unique=True, null=True, blank=True)
    payouts_enabled = models.BooleanField(default=False)
    details_submitted = models.BooleanField(default=False)
    requirements_due = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.vendor_id}: {self.stripe_account_id or '(none)'}"


class SettlementRun(models.Model):
    """One settlement of vendor earnings for a period of days (both ends included)."""

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"

    period_start = models.DateField()
    period_end = models.DateField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    report = models.JSONField(default=dict, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["period_start", "period_end"], name="uniq_period"),
            models.CheckConstraint(
                condition=models.Q(period_end__gte=models.F("period_start")),
                name="period_ordered",
            ),
        ]

    def __str__(self) -> str:
        return f"settlement {self.period_key}"

    @property
    def period_key(self) -> str:
        return f"{self.period_start.isoformat()}..{self.period_end.isoformat()}"


class Payout(models.Model):
    """One Stripe transfer of a vendor's earnings in a settlement run."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending (transfer requested or to be requested)"
        PAID = "paid", "Paid"
        FAILED = "failed", "Failed (nothing moved; retried by the next run)"

    run = models.ForeignKey(SettlementRun, on_delete=models.PROTECT, related_name="payouts")
    vendor = models.ForeignKey("vendors.Vendor", on_delete=models.PROTECT, related_name="payouts")
    stripe_account_id = models.CharField(max_length=64)
    amount_cents = models.PositiveIntegerField()
    amount = models.BigIntegerField(help_text="nano-USD: exactly amount_cents")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=1)
    idempotency_key = models.CharField(max_length=200, unique=True)
    stripe_transfer_id = models.CharField(max_length=64, unique=True, null=True, blank=True)
    failure_code = models.CharField(max_length=100, blank=True)
    failure_message = models.CharField(max_length=500, blank=True)
    transaction = models.OneToOneField(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="payout"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    paid_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "vendor"], name="uniq_run_vendor"),
            models.CheckConstraint(condition=models.Q(amount_cents__gt=0), name="payout_positive"),
        ]

    def __str__(self) -> str:
        return f"payout {self.idempotency_key} ({self.status})"


class Refund(models.Model):
    """A usage charge given back: the reversing ledger transaction and who decided it."""

    usage_record = models.OneToOneField(
        UsageRecord, on_delete=models.PROTECT, related_name="refund"
    )
    organization = models.ForeignKey(
        "marketplace.Organization", on_delete=models.PROTECT, related_name="refunds"
    )
    vendor = models.ForeignKey(
        "vendors.Vendor", null=True, blank=True, on_delete=models.PROTECT, related_name="refunds"
    )
    amount = models.BigIntegerField(help_text="nano-USD credited back to the organisation")
    vendor_amount = models.BigIntegerField(help_text="nano-USD taken from the vendor's payable")
    reason = models.CharField(max_length=500)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    transaction = models.OneToOneField(
        LedgerTransaction, on_delete=models.PROTECT, related_name="refund"
    )
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"refund of {self.usage_record_id}"


class Invoice(models.Model):
    """A monthly Stripe invoice of an invoiced organisation's usage."""

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft (being sent to Stripe)"
        OPEN = "open", "Open (sent, awaiting payment)"
        PAYMENT_FAILED = "payment_failed", "Payment failed"
        PAID = "paid", "Paid"
        VOID = "void", "Void"
        UNCOLLECTIBLE = "uncollectible", "Uncollectible"

    organization = models.ForeignKey(
        "marketplace.Organization", on_delete=models.PROTECT, related_name="invoices"
    )
    month = models.DateField(help_text="the first day of the invoiced month")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    usage_amount = models.BigIntegerField(help_text="nano-USD of usage invoiced")
    amount_cents = models.PositiveIntegerField(help_text="the invoice total")
    lines = models.JSONField(default=list)
    days_until_due = models.PositiveIntegerField()
    stripe_invoice_id = models.CharField(max_length=64, unique=True, null=True, blank=True)
    stripe_number = models.CharField(max_length=64, blank=True)
    hosted_invoice_url = models.URLField(max_length=2000, blank=True)
    issue_transaction = models.OneToOneField(
        LedgerTransaction,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="invoice_issued",
    )
    payment_transaction = models.OneToOneField(
        LedgerTransaction,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="invoice_paid",
    )
    payment_failures = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "month"], name="uniq_org_month")
        ]

    def __str__(self) -> str:
        return f"invoice {self.organization_id} {self.month:%Y-%m} ({self.status})"


class UsageRollup(models.Model):
    """Usage per hour, organisation, API key, endpoint and vendor (rebuilt from records)."""

    hour = models.DateTimeField()
    organization = models.ForeignKey(
        "marketplace.Organization", on_delete=models.CASCADE, related_name="usage_rollups"
    )
    api_key = models.ForeignKey(
        "marketplace.ApiKey", null=True, on_delete=models.SET_NULL, related_name="usage_rollups"
    )
    endpoint = models.ForeignKey(
        "vendors.Endpoint", null=True, on_delete=models.SET_NULL, related_name="usage_rollups"
    )
    vendor = models.ForeignKey(
        "vendors.Vendor", null=True, on_delete=models.SET_NULL, related_name="usage_rollups"
    )
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost = models.BigIntegerField(default=0)
    vendor_share = models.BigIntegerField(default=0)
    platform_fee = models.BigIntegerField(default=0)
    latency_ms_sum = models.BigIntegerField(default=0)
    latency_ms_max = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["hour", "organization", "api_key", "endpoint", "vendor"],
                name="uniq_rollup_bucket",
                nulls_distinct=False,
            )
        ]
        indexes = [
            models.Index(fields=["organization", "hour"]),
            models.Index(fields=["vendor", "hour"]),
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 org {self.organization_id}"


class BudgetAlert(models.Model):
    """One budget or balance alert sent to an organisation: at most one per kind and month."""

    class Kind(models.TextChoices):
        SOFT = "soft", "Budget threshold reached"
        HARD = "hard", "Budget reached"
        LOW_BALANCE = "low_balance", "Low credit balance"

    organization = models.ForeignKey(
        "marketplace.Organization", on_delete=models.CASCADE, related_name="budget_alerts"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    period = models.CharField(max_length=7, help_text="The calendar month (UTC), 'YYYY-MM'.")
    sent_at = models.DateTimeField(default=timezone.now)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "kind", "period"], name="uniq_budget_alert"
            )
        ]

    def __str__(self) -> str:
        return f"{self.period} {self.kind} org {self.organization_id}"
