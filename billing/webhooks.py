"""Stripe webhook events: stored once by id, processed once, in Celery.

The views (``billing/views.py``) verify the signature over the raw body and call
``stripe_event_receive``, which stores the event by its unique id and, after commit,
enqueues ``billing.tasks.stripe_event_process``. Stripe retries deliveries and does not
order them; a duplicate finds the stored row and is not processed again.

``stripe_event_process`` locks the event row, returns when it was already processed, and
dispatches on (source, type) to a handler. Handlers never trust the event body: they
re-read the object from Stripe and act on that, each under its own row lock and idempotency
key, so an event processed twice or out of order changes nothing the second time. A
handler that raises rolls the whole processing back; the task retries with back-off and
the sweeper (``stripe_events_sweep``) re-enqueues events left unprocessed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from billing.models import StripeEvent

logger = logging.getLogger("switchyard.billing.webhooks")

Handler = Callable[[StripeEvent], None]


def _object(event: StripeEvent) -> dict[str, Any]:
    data: dict[str, Any] = event.payload.get("data") or {}
    return data.get("object") or {}


def _checkout_paid(event: StripeEvent) -> None:
    from billing.topups import topup_fulfil

    topup_fulfil(session_id=_object(event)["id"])


def _checkout_failed(event: StripeEvent) -> None:
    from billing.topups import topup_fail

    reason = "expired" if event.type.endswith("expired") else "async_payment_failed"
    topup_fail(session_id=_object(event)["id"], reason=reason)


def _invoice_changed(event: StripeEvent) -> None:
    from billing.invoicing import invoice_sync

    invoice_sync(
        stripe_invoice_id=_object(event)["id"],
        payment_failed=event.type == "invoice.payment_failed",
    )


def _account_updated(event: StripeEvent) -> None:
    from billing.connect import connect_account_sync

    connect_account_sync(stripe_account_id=event.account or _object(event)["id"])


HANDLERS: dict[tuple[str, str], Handler] = {
    ("platform", "checkout.session.completed"): _checkout_paid,
    ("platform", "checkout.session.async_payment_succeeded"): _checkout_paid,
    ("platform", "checkout.session.async_payment_failed"): _checkout_failed,
    ("platform", "checkout.session.expired"): _checkout_failed,
    ("platform", "invoice.paid"): _invoice_changed,
    ("platform", "invoice.payment_failed"): _invoice_changed,
    ("platform", "invoice.voided"): _invoice_changed,
    ("platform", "invoice.marked_uncollectible"): _invoice_changed,
    ("connect", "account.updated"): _account_updated,
}


def _enqueue(event_id: str) -> None:
    from billing.tasks import stripe_event_process as task

    try:
        task.delay(event_id)
    except Exception:  # the broker is down: the event is stored, the sweeper enqueues it later
        logger.exception("could not enqueue Stripe event %s", event_id)


def stripe_event_receive(*, event: dict[str, Any], source: str) -> tuple[StripeEvent, bool]:
    """Store a verified event once by its id; enqueue its processing after commit.

    Returns (the stored event, whether it was new). A duplicate that is still unprocessed
    is enqueued again (processing is idempotent); a processed one is left alone.
    """
    with transaction.atomic():
        stored, created = StripeEvent.objects.get_or_create(
            event_id=event["id"],
            defaults={
                "type": event["type"],
                "source": source,
                "account": str(event.get("account") or ""),
                "livemode": bool(event.get("livemode")),
                "payload": event,
            },
        )
        if stored.status == StripeEvent.Status.RECEIVED:
            event_id = stored.event_id
            transaction.on_commit(lambda: _enqueue(event_id))
    return stored, created


def stripe_event_process(*, event_id: str) -> str:
    """Process a stored event once; returns its status (``processed`` or ``ignored``)."""
    try:
        with transaction.atomic():
            event = StripeEvent.objects.select_for_update().get(event_id=event_id)
            if event.status != StripeEvent.Status.RECEIVED:
                return event.status
            handler = HANDLERS.get((event.source, event.type))
            if handler is not None:
                handler(event)
            event.status = StripeEvent.Status.PROCESSED if handler else StripeEvent.Status.IGNORED
            event.processed_at = timezone.now()
            event.attempts = F("attempts") + 1
            event.last_error = ""
            event.save(update_fields=["status", "processed_at", "attempts", "last_error"])
            return event.status
    except Exception as exc:
        # The processing rolled back; remember why, then let the task retry.
        StripeEvent.objects.filter(event_id=event_id).update(
            attempts=F("attempts") + 1, last_error=f"{type(exc).__name__}: {exc}"[:2000]
        )
        logger.warning("processing Stripe event %s failed: %s", event_id, exc)
        raise


def stripe_events_pending(*, older_than: timedelta, max_attempts: int = 20) -> list[str]:
    """Ids of events still unprocessed after ``older_than`` (for the sweeper to re-enqueue)."""
    cutoff = timezone.now() - older_than
    return list(
        StripeEvent.objects.filter(
            status=StripeEvent.Status.RECEIVED, received_at__lt=cutoff, attempts__lt=max_attempts
        )
        .order_by("received_at")
        .values_list("event_id", flat=True)[:500]
    )
