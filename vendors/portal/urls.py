from django.urls import path

from vendors.portal import members, payouts, views

app_name = "portal"

urlpatterns = [
    path("", views.index, name="index"),
    path("register/", views.register, name="register"),
    path("invitations/<str:token>/", members.invitation_open, name="invitation-accept"),
    path("<slug:vendor_slug>/", views.dashboard, name="dashboard"),
    path("<slug:vendor_slug>/revenue/", views.revenue, name="revenue"),
    path("<slug:vendor_slug>/payouts/", payouts.payouts, name="payouts"),
    path("<slug:vendor_slug>/payouts/start/", payouts.payouts_start, name="payouts-start"),
    path("<slug:vendor_slug>/payouts/refresh/", payouts.payouts_refresh, name="payouts-refresh"),
    path("<slug:vendor_slug>/payouts/return/", payouts.payouts_return, name="payouts-return"),
    path("<slug:vendor_slug>/members/", members.members, name="members"),
    path("<slug:vendor_slug>/members/<int:pk>/role/", members.member_role, name="member-role"),
    path(
        "<slug:vendor_slug>/members/<int:pk>/remove/", members.member_remove, name="member-remove"
    ),
    path(
        "<slug:vendor_slug>/invitations/<int:pk>/withdraw/",
        members.invitation_withdraw,
        name="invitation-withdraw",
    ),
    path("<slug:vendor_slug>/revenue/<str:month>.csv", views.revenue_csv, name="revenue-csv"),
    path("<slug:vendor_slug>/endpoints/new/", views.endpoint_create, name="endpoint-create"),
    path(
        "<slug:vendor_slug>/endpoints/<slug:endpoint_slug>/",
        views.endpoint_detail,
        name="endpoint",
    ),
    path(
        "<slug:vendor_slug>/endpoints/<slug:endpoint_slug>/conformance/",
        views.endpoint_conformance,
        name="endpoint-conformance",
    ),
    path(
        "<slug:vendor_slug>/endpoints/<slug:endpoint_slug>/pricing/",
        views.endpoint_pricing,
        name="pricing",
    ),
    path(
        "<slug:vendor_slug>/endpoints/<slug:endpoint_slug>/pricing/check/",
        views.endpoint_pricing_check,
        name="pricing-check",
    ),
]
