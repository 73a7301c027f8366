"""WebSocket URLs of the live dashboards (mounted by ``marketplace.asgi``)."""

from __future__ import annotations

from django.urls import path

from marketplace.live.consumers import (
    OpsLiveConsumer,
    OrganizationLiveConsumer,
    VendorLiveConsumer,
)

websocket_urlpatterns = [
    path("ws/console/<slug:org_slug>/usage/", OrganizationLiveConsumer.as_asgi()),
    path("ws/vendor/<slug:vendor_slug>/", VendorLiveConsumer.as_asgi()),
    path("ws/ops/", OpsLiveConsumer.as_asgi()),
]
