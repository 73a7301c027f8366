"""Celery tasks of billing: thin wrappers over the services.

Every task is idempotent (keyed by Stripe event id, settlement period + vendor, invoice
month + organisation, rollup hour) and acknowledged late, so a worker that dies mid-task
only causes a harmless repeat. Beat entries for them are in ``billing/schedule.py``.
"""

from __future__ import annotations

import time
from datetime import timedelta

import stripe
from celery import shared_task
from django.db import OperationalError
from django.utils import timezone

from billing.errors import PaymentProviderError
from billing.usage import linger_after, usage_ingest_batch

# Worth retrying: Stripe or the database were unreachable or busy for a moment.
TRANSIENT = (
    PaymentProviderError,
    stripe.APIConnectionError,
    stripe.APIError,
    stripe.RateLimitError,
    OperationalError,
)


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
        linger_after(result.read)
    return total


@shared_task(
    name="billing.tasks.stripe_event_process",
    acks_late=True,
    ignore_result=True,
    autoretry_for=TRANSIENT,
    retry_backoff=5,
    retry_backoff_max=600,
    max_retries=12,
)
def stripe_event_process(event_id: str) -> str:
    """Process one stored Stripe webhook event (once; repeats are no-ops)."""
    from billing.webhooks import stripe_event_process as process

    return process(event_id=event_id)


@shared_task(name="billing.tasks.stripe_events_sweep", acks_late=True, ignore_result=True)
def stripe_events_sweep(older_than_seconds: int = 300) -> int:
    """Re-enqueue webhook events still unprocessed (a lost task, a long Stripe outage)."""
    from billing.webhooks import stripe_events_pending

    pending = stripe_events_pending(older_than=timedelta(seconds=older_than_seconds))
    for event_id in pending:
        stripe_event_process.delay(event_id)
    return len(pending)


@shared_task(name="billing.tasks.settlement_daily", acks_late=True, ignore_result=True)
def settlement_daily() -> dict[str, int]:
    """Settle vendors for yesterday (UTC); failed or skipped vendors are paid by a later run."""
    from billing.settlement import settlement_run

    yesterday = timezone.now().date() - timedelta(days=1)
    report = settlement_run(period_start=yesterday, period_end=yesterday)
    counts: dict[str, int] = {}
    for outcome in report.outcomes:
        counts[outcome.outcome] = counts.get(outcome.outcome, 0) + 1
    return counts


@shared_task(name="billing.tasks.settlement_period", acks_late=True, ignore_result=True)
def settlement_period(period_start: str, period_end: str) -> dict[str, int]:
    """Settle vendors for a period of days (ISO dates, both included), as the operations
    page asks; safe to repeat (one transfer per vendor and period)."""
    from datetime import date

    from billing.settlement import settlement_run

    report = settlement_run(
        period_start=date.fromisoformat(period_start), period_end=date.fromisoformat(period_end)
    )
    counts: dict[str, int] = {}
    for outcome in report.outcomes:
        counts[outcome.outcome] = counts.get(outcome.outcome, 0) + 1
    return counts


@shared_task(name="billing.tasks.rollups_recent", acks_late=True, ignore_result=True)
def rollups_recent(hours: int = 3) -> int:
    """Rebuild the last ``hours`` hours of rollups (late-ingested usage included)."""
    from billing.rollups import hour_floor, rollup_rebuild

    now = timezone.now()
    return rollup_rebuild(start=hour_floor(now) - timedelta(hours=hours - 1), end=now)


@shared_task(name="billing.tasks.invoice_monthly", acks_late=True, ignore_result=True)
def invoice_monthly() -> int:
    """Invoice every invoiced organisation for the previous month."""
    from billing.invoicing import invoice_run, previous_month

    return len(invoice_run(month=previous_month(timezone.now().date())))


@shared_task(name="billing.tasks.budget_alerts", acks_late=True, ignore_result=True)
def budget_alerts() -> int:
    """Email budget and low-balance alerts (each at most once per organisation and month)."""
    from billing.alerts import budget_alerts_check

    return budget_alerts_check()
