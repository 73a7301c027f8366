"""Channel-layer group names and the one way to publish to them from synchronous code."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
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

    def run() -> int:
        try:
            return async_to_sync(_send_all)(layer, messages)
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


async def _send_all(layer: Any, messages: Sequence[GroupMessage]) -> int:
    for group, message in messages:
        await layer.group_send(group, message)
    return len(messages)


class _Publisher:
    """One daemon thread per process that builds and sends live figures off the caller's path.

    Usage ingest hands over each committed batch and goes on with the next one; sending a
    batch's figures is up to a few hundred channel-layer round trips, which used to hold the
    ingest loop (a third of a batch's time, measured). The queue is bounded: if publishing
    falls that far behind, a batch's figures are dropped and logged (the figures are a view;
    ``live_numbers_push`` refreshes the tiles from the database every few seconds).
    """

    def __init__(self, capacity: int = 256) -> None:
        self._queue: queue.Queue[Callable[[], Sequence[GroupMessage]]] = queue.Queue(capacity)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, build: Callable[[], Sequence[GroupMessage]]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="live-publisher", daemon=True
                )
                self._thread.start()
        try:
            self._queue.put_nowait(build)
        except queue.Full:
            logger.warning("live figures of a usage batch dropped: the publisher is behind")

    def _run(self) -> None:
        # One event loop for the thread's life: the channel layer keeps its Redis
        # connections per loop, and ``async_to_sync`` per batch built a loop and connected
        # again every time (6 ms of CPU per batch, three quarters of a small batch's cost).
        loop = asyncio.new_event_loop()
        while True:
            build = self._queue.get()
            try:
                messages = build()
                layer = get_channel_layer() if messages else None
                if layer is not None:
                    loop.run_until_complete(_send_all(layer, messages))
            except Exception:
                logger.warning("live figures not published", exc_info=True)


_publisher = _Publisher()


def live_publish_soon(build: Callable[[], Sequence[GroupMessage]]) -> None:
    """Build and send messages on the process's publisher thread, in submission order."""
    _publisher.submit(build)
