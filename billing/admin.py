from django.contrib import admin

from billing.models import (
    Invoice,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    Payout,
    Refund,
    SettlementRun,
    StripeEvent,
    TopUp,
    UsageRecord,
    VendorPayoutAccount,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """The ledger is append-only: the admin shows it but never edits it."""

    def has_add_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def has_delete_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False


class LedgerEntryInline(admin.TabularInline):
    model = LedgerEntry
    extra = 0
    can_delete = False
    readonly_fields = ("account", "amount")

    def has_add_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False


@admin.register(LedgerAccount)
class LedgerAccountAdmin(ReadOnlyAdmin):
    list_display = ("code", "kind", "organization", "vendor")
    list_filter = ("kind",)
    search_fields = ("code",)


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = ("idempotency_key", "kind", "memo", "created_at")
    list_filter = ("kind",)
    search_fields = ("idempotency_key",)
    inlines = [LedgerEntryInline]


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = (
        "request_id",
        "organization",
        "endpoint",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "outcome",
        "occurred_at",
    )
    list_filter = ("outcome",)
    search_fields = ("request_id",)


# Money rows change only through billing's services (locks, idempotency keys, Stripe):
# the admin shows them read-only.


@admin.register(StripeEvent)
class StripeEventAdmin(ReadOnlyAdmin):
    list_display = ("event_id", "type", "source", "status", "attempts", "received_at")
    list_filter = ("status", "source", "type")
    search_fields = ("event_id", "account")


@admin.register(TopUp)
class TopUpAdmin(ReadOnlyAdmin):
    list_display = ("pk", "organization", "amount_cents", "status", "stripe_session_id", "paid_at")
    list_filter = ("status",)
    search_fields = ("stripe_session_id",)


@admin.register(VendorPayoutAccount)
class VendorPayoutAccountAdmin(ReadOnlyAdmin):
    list_display = ("vendor", "stripe_account_id", "payouts_enabled", "details_submitted")


@admin.register(SettlementRun)
class SettlementRunAdmin(ReadOnlyAdmin):
    list_display = ("period_start", "period_end", "status", "started_at", "finished_at")


@admin.register(Payout)
class PayoutAdmin(ReadOnlyAdmin):
    list_display = ("idempotency_key", "vendor", "amount_cents", "status", "failure_code")
    list_filter = ("status",)
    search_fields = ("idempotency_key", "stripe_transfer_id")


@admin.register(Refund)
class RefundAdmin(ReadOnlyAdmin):
    list_display = ("usage_record", "organization", "amount", "reason", "actor", "created_at")


@admin.register(Invoice)
class InvoiceAdmin(ReadOnlyAdmin):
    list_display = ("organization", "month", "status", "amount_cents", "stripe_invoice_id")
    list_filter = ("status",)
