"""WebSocket consumers of the live dashboards: one per audience.

A consumer authenticates the session user (``AuthMiddlewareStack``), checks the membership
the URL names (or staff for operations) and refuses the handshake otherwise; then it joins
that group, sends today's totals (so a page that reconnects is right again) and forwards
every group message. Clients send nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from marketplace.live.figures import ops_today, organization_today, vendor_today
from marketplace.live.groups import OPS_GROUP, organization_group, vendor_group
from marketplace.selectors import membership_for, role_allows
from vendors.selectors import vendor_membership_for, vendor_role_allows

logger = logging.getLogger("switchyard.live")


class LiveConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """Join one group if the user may, forward its figures."""

    group: str | None = None

    def authorise(self, user: Any, kwargs: dict[str, Any]) -> str | None:
        """The group this user may join for this URL, or None (refused)."""
        raise NotImplementedError

    def today(self) -> dict[str, Any]:
        raise NotImplementedError

    async def connect(self) -> None:
        user = self.scope.get("user")
        kwargs = self.scope["url_route"]["kwargs"]
        group = None
        if user is not None and user.is_authenticated:
            group = await database_sync_to_async(self.authorise)(user, kwargs)
        if group is None:
            await self.close()  # before accept: the handshake is refused (HTTP 403)
            return
        self.group = group
        await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        today = await database_sync_to_async(self.today)()
        await self.send_json({"kind": "figures", "mode": "set", "values": today})

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Clients have nothing to say; whatever they send is ignored."""

    async def usage_batch(self, event: dict[str, Any]) -> None:
        await self.send_json({"kind": "figures", "mode": "add", "values": event["values"]})

    async def live_numbers(self, event: dict[str, Any]) -> None:
        await self.send_json({"kind": "figures", "mode": "set", "values": event["values"]})


class OrganizationLiveConsumer(LiveConsumer):
    """``/ws/console/<org_slug>/usage/``: members who may view usage."""

    organization_id: int

    def authorise(self, user: Any, kwargs: dict[str, Any]) -> str | None:
        membership = membership_for(user=user, slug=kwargs["org_slug"])
        if membership is None or not role_allows(membership.role, "usage.view"):
            return None
        self.organization_id = membership.organization_id
        return organization_group(membership.organization_id)

    def today(self) -> dict[str, Any]:
        return organization_today(self.organization_id)


class VendorLiveConsumer(LiveConsumer):
    """``/ws/vendor/<vendor_slug>/``: members of the vendor."""

    vendor_id: int

    def authorise(self, user: Any, kwargs: dict[str, Any]) -> str | None:
        membership = vendor_membership_for(user=user, slug=kwargs["vendor_slug"])
        if membership is None or not vendor_role_allows(membership.role, "vendor.view"):
            return None
        self.vendor_id = membership.vendor_id
        return vendor_group(membership.vendor_id)

    def today(self) -> dict[str, Any]:
        return vendor_today(self.vendor_id)


class OpsLiveConsumer(LiveConsumer):
    """``/ws/ops/``: platform staff."""

    def authorise(self, user: Any, kwargs: dict[str, Any]) -> str | None:
        return OPS_GROUP if user.is_staff else None

    def today(self) -> dict[str, Any]:
        return ops_today()
