"""Channel-layer group names and the one way to publish to them from synchronous code."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger("switchyard.live")

OPS_GROUP = "live.ops"

GroupMessage = tuple[str, dict[str, Any]]


def organization_group(organization_id: int) -> str:
    return f"live.org.{organization_id}"


def vendor_group(vendor_id: int) -> str:
    return f"live.vendor.{vendor_id}"


def _in_event_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def live_publish(messages: Sequence[GroupMessage]) -> int:
    """Send each ``(group, message)`` through the channel layer; returns how many were sent.

    Live figures are a view: a failure is logged and swallowed, never raised into the caller
    (usage ingest has already committed when it publishes).
    """
    if not messages:
        return 0
    layer = get_channel_layer()
    if layer is None:
        return 0

    async def send_all() -> int:
        for group, message in messages:
            await layer.group_send(group, message)
        return len(messages)

    def run() -> int:
        try:
            return async_to_sync(send_all)()
        except Exception:
            logger.warning("live figures not published", exc_info=True)
            return 0

    if not _in_event_loop_thread():
        return run()
    # Called from a thread that runs an event loop (async_to_sync refuses that): send from a
    # helper thread and wait for it.
    sent: list[int] = []
    helper = threading.Thread(target=lambda: sent.append(run()), name="live-publish")
    helper.start()
    helper.join(timeout=10)
    return sent[0] if sent else 0
