from django.urls import path

from marketplace.ops import money, views

app_name = "ops"

urlpatterns = [
    path("", views.queue, name="index"),
    path("live/", views.live, name="live"),
    path("vendors/", views.vendors, name="vendors"),
    path("endpoints/", views.endpoints, name="endpoints"),
    path("endpoints/<int:pk>/", views.endpoint_detail, name="endpoint"),
    path(
        "endpoints/<int:pk>/conformance/",
        views.endpoint_conformance,
        name="endpoint-conformance",
    ),
    path("endpoints/<int:pk>/<str:action>/", views.endpoint_action, name="endpoint-action"),
    path("vendors/<int:pk>/<str:action>/", views.vendor_action, name="vendor-action"),
    path("audit/", views.audit, name="audit"),
    path("refunds/", money.refunds, name="refunds"),
    path("refunds/request/", money.refund_request, name="refund-request"),
    path("refunds/period/", money.refund_period, name="refund-period"),
    path("settlements/", money.settlements, name="settlements"),
    path("settlements/run/", money.settlement_run, name="settlement-run"),
]
