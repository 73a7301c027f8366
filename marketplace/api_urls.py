"""``/api/v1/``: the management API (each app's ``api.py``)."""

from django.urls import path, re_path

from billing import api as billing_api
from marketplace import api as customer_api
from vendors import api as vendor_api

app_name = "api"

urlpatterns = [
    path(
        "organizations/<slug:org_slug>/keys/",
        customer_api.ApiKeyListApi.as_view(),
        name="keys",
    ),
    path(
        "organizations/<slug:org_slug>/keys/<int:pk>/revoke/",
        customer_api.ApiKeyRevokeApi.as_view(),
        name="key-revoke",
    ),
    path(
        "organizations/<slug:org_slug>/keys/<int:pk>/data-policy/",
        customer_api.ApiKeyDataPolicyApi.as_view(),
        name="key-data-policy",
    ),
    path(
        "organizations/<slug:org_slug>/usage/",
        customer_api.UsageRecordListApi.as_view(),
        name="usage",
    ),
    path(
        "organizations/<slug:org_slug>/routing-policy/",
        customer_api.RoutingPolicyApi.as_view(),
        name="routing-policy",
    ),
    path(
        "organizations/<slug:org_slug>/data-policy/",
        customer_api.OrganizationDataPolicyApi.as_view(),
        name="data-policy",
    ),
    path(
        "organizations/<slug:org_slug>/balance/",
        billing_api.BalanceApi.as_view(),
        name="balance",
    ),
    path(
        "organizations/<slug:org_slug>/transactions/",
        billing_api.TransactionListApi.as_view(),
        name="transactions",
    ),
    path(
        "vendors/<slug:vendor_slug>/endpoints/",
        vendor_api.EndpointListApi.as_view(),
        name="vendor-endpoints",
    ),
    path(
        "vendors/<slug:vendor_slug>/endpoints/<slug:endpoint_slug>/",
        vendor_api.EndpointDetailApi.as_view(),
        name="vendor-endpoint",
    ),
    path(
        "vendors/<slug:vendor_slug>/statements/",
        billing_api.StatementApi.as_view(),
        name="vendor-statement",
    ),
    # Anything else under /api/v1/ (an unknown path, a slug with characters a slug cannot
    # have) is a DRF-shaped 404, not the HTML page.
    re_path(r"^.*$", customer_api.api_not_found, name="not-found"),
]
