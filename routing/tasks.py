"""Celery tasks of routing: route traces into PostgreSQL, and their retention."""

from __future__ import annotations

import time

from celery import shared_task

from routing.traces import prune_traces, trace_ingest_batch


@shared_task(name="routing.tasks.trace_ingest", acks_late=True, ignore_result=True)
def trace_ingest(max_seconds: float = 1.8) -> int:
    """Drain the trace stream for up to ``max_seconds`` (beat runs it every 2 seconds)."""
    deadline = time.monotonic() + max_seconds
    total = 0
    while time.monotonic() < deadline:
        result = trace_ingest_batch(count=1000)
        total += result.stored
        if result.read < 1000:
            break
    return total


@shared_task(name="routing.tasks.trace_prune", acks_late=True, ignore_result=True)
def trace_prune() -> int:
    """Delete the traces older than ``TRACE_RETENTION_DAYS`` (hourly)."""
    return prune_traces()
