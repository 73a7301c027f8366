from django.contrib import admin

from vendors.models import (
    CapabilityTag,
    ConformanceReport,
    Endpoint,
    EndpointQuality,
    Feedback,
    HealthCheck,
    ProbeResult,
    Vendor,
    VendorInvitation,
    VendorMembership,
)


class VendorMembershipInline(admin.TabularInline):
    model = VendorMembership
    extra = 0
    raw_id_fields = ("user",)


@admin.register(Vendor)
class VendorAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "status", "stripe_account_id", "created_at")
    list_filter = ("status",)
    search_fields = ("name", "slug")
    inlines = [VendorMembershipInline]


@admin.register(VendorInvitation)
class VendorInvitationAdmin(admin.ModelAdmin):
    list_display = ("email", "vendor", "role", "created_at", "expires_at", "accepted_at")
    search_fields = ("email", "vendor__name")
    exclude = ("token_hash",)


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "kind",
        "status",
        "capacity",
        "price_input",
        "price_output",
        "region",
    )
    list_filter = ("status", "kind", "region")
    search_fields = ("slug", "vendor__slug", "upstream_model")
    exclude = ("secret_encrypted",)  # secrets are set through the portal, never shown
    filter_horizontal = ("tags",)


@admin.register(CapabilityTag)
class CapabilityTagAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "kind")
    list_filter = ("kind",)


@admin.register(EndpointQuality)
class EndpointQualityAdmin(admin.ModelAdmin):
    list_display = ("endpoint", "tag", "score", "probe_n", "feedback_n", "total_n", "updated_at")
    list_filter = ("tag",)
    readonly_fields = [f.name for f in EndpointQuality._meta.fields]


@admin.register(HealthCheck)
class HealthCheckAdmin(admin.ModelAdmin):
    list_display = ("endpoint", "ok", "status", "latency_ms", "checked_at")
    list_filter = ("ok",)


@admin.register(ConformanceReport)
class ConformanceReportAdmin(admin.ModelAdmin):
    list_display = ("endpoint", "passed", "supports_logprobs", "created_at")
    list_filter = ("passed",)
    readonly_fields = ("endpoint", "passed", "checks", "supports_logprobs", "created_at")


@admin.register(Feedback)
class FeedbackAdmin(admin.ModelAdmin):
    list_display = ("request_id", "organization", "endpoint", "score", "created_at")


@admin.register(ProbeResult)
class ProbeResultAdmin(admin.ModelAdmin):
    list_display = ("endpoint", "tag", "item_id", "passed", "latency_ms", "created_at")
    list_filter = ("passed", "tag")
