"""The double-entry ledger and usage records.

Every movement of money is a ``LedgerTransaction`` whose ``LedgerEntry`` rows sum to zero;
an account's balance is the sum of its entries (money received minus money sent), so
customer credit and vendor payables are positive and the outside world (Stripe, grants)
goes negative. Both tables are append-only: PostgreSQL triggers refuse UPDATE and DELETE,
and a deferred constraint trigger refuses to commit a transaction that does not balance.
"""

from __future__ import annotations

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
    account = models.ForeignKey(LedgerAccount, on_delete=models.PROTECT, related_name="entries")
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
    organization = models.ForeignKey(
        "marketplace.Organization", on_delete=models.PROTECT, related_name="usage_records"
    )
    api_key = models.ForeignKey(
        "marketplace.ApiKey", null=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    endpoint = models.ForeignKey(
        "vendors.Endpoint", null=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    vendor = models.ForeignKey(
        "vendors.Vendor", null=True, on_delete=models.SET_NULL, related_name="usage_records"
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
    transaction = models.OneToOneField(
        LedgerTransaction, null=True, on_delete=models.PROTECT, related_name="usage_record"
    )
    occurred_at = models.DateTimeField()
    ingested_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["organization", "occurred_at"]),
            models.Index(fields=["vendor", "occurred_at"]),
        ]

    def __str__(self) -> str:
        return self.request_id
