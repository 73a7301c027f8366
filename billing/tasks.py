"""Celery tasks of billing: thin wrappers over the services."""

from __future__ import annotations

import time

from celery import shared_task

from billing.usage import usage_ingest_batch


@shared_task(name="billing.tasks.usage_ingest", acks_late=True, ignore_result=True)
def usage_ingest(max_seconds: float = 0.9) -> int:
    """Drain the usage stream for up to ``max_seconds`` (beat runs it every second)."""
    deadline = time.monotonic() + max_seconds
    total = 0
    while time.monotonic() < deadline:
        result = usage_ingest_batch(count=1000)
        total += result.recorded
        if result.read == 0:
            break
    return total
