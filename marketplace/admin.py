from django.contrib import admin

from marketplace.models import ApiKey, AuditLogEntry, Invitation, Membership, Organization


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ("user",)


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "billing_mode", "created_at")
    search_fields = ("name", "slug")
    inlines = [MembershipInline]
    # Set through the console or the API (marketplace.data_policy), which check it with the
    # gateway's parser, audit it and tell the gateways: an unchecked edit here could store a
    # policy no request can carry.
    readonly_fields = ("routing_defaults",)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "organization", "created_at", "expires_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix", "organization__name")
    readonly_fields = ("prefix", "key_hash", "created_at")


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = ("email", "organization", "role", "created_at", "expires_at", "accepted_at")
    search_fields = ("email", "organization__name")
    exclude = ("token_hash",)


@admin.register(AuditLogEntry)
class AuditLogEntryAdmin(admin.ModelAdmin):
    """Append-only: shown, never edited."""

    list_display = ("created_at", "actor_repr", "action", "target_type", "target_id")
    list_filter = ("action",)
    search_fields = ("actor_repr", "action", "target_id")

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def has_delete_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False
