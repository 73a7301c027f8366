"""Celery tasks of the control plane (thin; the work is in ``marketplace.live``)."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="marketplace.tasks.live_numbers_push", ignore_result=True)
def live_numbers_push() -> int:
    """Push every endpoint's live numbers (Redis) to the vendor and operations dashboards.

    Beat runs it every ``LIVE_PUSH_INTERVAL_SECONDS``; a missed or doubled run is harmless
    (the figures are replaced, not added)."""
    from marketplace.live.groups import live_publish
    from marketplace.live.numbers import live_numbers_messages

    return live_publish(live_numbers_messages())
