from django.contrib import admin

from vendors.models import CapabilityTag, Endpoint, Vendor, VendorMembership


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
