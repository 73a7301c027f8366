from django.contrib import admin

from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction, UsageRecord


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
