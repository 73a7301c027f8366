"""Tell every gateway replica that cached control-plane data changed (Redis pub/sub).

The gateway keeps API keys and the routing table in process memory; this channel carries
"forget this key" and "reload the routing table" so that a revoked key or a suspended
endpoint stops working within a second on every replica. Messages are sent after the
database transaction commits, never before.
"""

from __future__ import annotations

from django.db import transaction

from marketplace.redis_client import sync_client

CHANNEL = "sy:invalidate"
# The routing table changed in a way requests must see at once (an endpoint suspended, a
# price changed): each replica reloads it before answering its next request.
SNAPSHOT = "snapshot"
# Only quality scores moved (usage ingest, probes, feedback: continuously, under load): each
# replica reloads in the background and keeps routing on the table it has meanwhile.
QUALITY = "quality"


def key_message(key_hash: str) -> str:
    return f"key:{key_hash}"


def publish_now(message: str) -> None:
    sync_client().publish(CHANNEL, message)


def publish_after_commit(message: str) -> None:
    transaction.on_commit(lambda: publish_now(message))
