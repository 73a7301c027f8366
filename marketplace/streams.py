"""Reading a Redis stream through a consumer group, as the ingest workers do.

Shared by the usage ingest (``billing.usage``, the ``sy:usage`` stream) and the route-trace
ingest (``routing.traces``, ``sy:traces``): a batch is the entries a dead consumer left
pending for ``USAGE_CLAIM_IDLE_MS`` first, then new ones; once stored, it is acknowledged
and deleted in one transaction so the stream stays small.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import redis
from django.conf import settings

Entry = tuple[bytes, dict[bytes, bytes]]

CLAIM_IDLE_MS = 30_000  # default; settings.USAGE_CLAIM_IDLE_MS overrides


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) unless they exist."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def read_batch(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    count: int,
    block_ms: int | None = None,
) -> list[Entry]:
    """Up to ``count`` entries: stale pending ones first, then new ones (waiting up to
    ``block_ms`` for them). Creates the group on first use (or after Redis lost it)."""
    idle = getattr(settings, "USAGE_CLAIM_IDLE_MS", CLAIM_IDLE_MS)
    try:
        claimed: Any = client.xautoclaim(stream, group, consumer, idle, "0-0", count=count)
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        ensure_group(client, stream, group)
        claimed = None
    entries: list[Entry] = list(claimed[1]) if claimed else []
    if len(entries) < count:
        fresh: Any = client.xreadgroup(
            group, consumer, {stream: ">"}, count=count - len(entries), block=block_ms
        )
        for _stream, items in fresh or []:
            entries.extend(items)
    return entries


def drop(client: redis.Redis, stream: str, group: str, ids: list[bytes]) -> None:
    """Acknowledge and delete stored entries."""
    pipe = client.pipeline(transaction=True)
    pipe.xack(stream, group, *ids)
    pipe.xdel(stream, *ids)
    pipe.execute()
