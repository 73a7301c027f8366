from django.urls import path

from marketplace.console import data, endpoints, keys, money, playground, views

app_name = "console"

urlpatterns = [
    path("", views.index, name="index"),
    path("new/", views.organization_create, name="organization-create"),
    path("invitations/<str:token>/", views.invitation_open, name="invitation-accept"),
    path("<slug:org_slug>/", views.overview, name="overview"),
    path("<slug:org_slug>/members/", views.members, name="members"),
    path("<slug:org_slug>/members/<int:pk>/role/", views.member_role, name="member-role"),
    path("<slug:org_slug>/members/<int:pk>/remove/", views.member_remove, name="member-remove"),
    path(
        "<slug:org_slug>/invitations/<int:pk>/withdraw/",
        views.invitation_cancel,
        name="invitation-withdraw",
    ),
    path("<slug:org_slug>/keys/", keys.key_list, name="keys"),
    path("<slug:org_slug>/keys/new/", keys.key_create, name="key-create"),
    path("<slug:org_slug>/keys/<int:pk>/revoke/", keys.key_revoke, name="key-revoke"),
    path("<slug:org_slug>/keys/<int:pk>/data/", data.key_data_policy, name="key-data-policy"),
    path("<slug:org_slug>/endpoints/", endpoints.endpoint_list, name="endpoints"),
    path("<slug:org_slug>/endpoints/new/", endpoints.endpoint_create, name="endpoint-create"),
    path("<slug:org_slug>/endpoints/<int:pk>/", endpoints.endpoint_detail, name="endpoint"),
    path(
        "<slug:org_slug>/endpoints/<int:pk>/check/",
        endpoints.endpoint_check,
        name="endpoint-check",
    ),
    path(
        "<slug:org_slug>/endpoints/<int:pk>/disable/",
        endpoints.endpoint_disable,
        name="endpoint-disable",
    ),
    path(
        "<slug:org_slug>/endpoints/<int:pk>/delete/",
        endpoints.endpoint_delete,
        name="endpoint-delete",
    ),
    path("<slug:org_slug>/credits/", money.credits, name="credits"),
    path("<slug:org_slug>/usage/", money.usage, name="usage"),
    path("<slug:org_slug>/budget/", money.budget, name="budget"),
    path("<slug:org_slug>/data/", data.data_policy, name="data-policy"),
    path("<slug:org_slug>/routing/", data.routing_policy, name="routing-policy"),
    path("<slug:org_slug>/usage.csv", money.usage_csv, name="usage-csv"),
    path("<slug:org_slug>/audit/", views.audit, name="audit"),
    path("<slug:org_slug>/playground/", playground.playground, name="playground"),
    path("<slug:org_slug>/playground/run/", playground.playground_run, name="playground-run"),
    path("<slug:org_slug>/playground/trace/", playground.playground_trace, name="playground-trace"),
]
