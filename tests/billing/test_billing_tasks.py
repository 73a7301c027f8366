"""Billing's Celery tasks and beat entries: thin, registered, safe to run at any time."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from billing import tasks
from billing.models import StripeEvent
from billing.schedule import BILLING_BEAT_SCHEDULE
from marketplace.celery import app
from marketplace.redis_client import sync_client
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture


def test_every_beat_entry_names_a_registered_task():
    from django.conf import settings

    app.loader.import_default_modules()  # what a worker does: every app's tasks module
    for entry in (*BILLING_BEAT_SCHEDULE.values(), *settings.CELERY_BEAT_SCHEDULE.values()):
        assert entry["task"] in app.tasks


def test_the_sweeper_re_enqueues_events_left_unprocessed(stripe_fake: FakeStripe, client):
    event = stripe_fake.event("customer.created", {"id": "cus_1", "object": "customer"})
    stripe_fake.deliver(client, event)  # in a test transaction: nothing was enqueued
    assert tasks.stripe_events_sweep() == 0  # too recent to be called lost
    StripeEvent.objects.update(received_at=timezone.now() - timedelta(minutes=10))

    assert tasks.stripe_events_sweep() == 1
    assert sync_client().llen("payments") == 1  # one message on the payments queue

    assert tasks.stripe_event_process(event["id"]) == "ignored"  # what the worker runs
    assert tasks.stripe_events_sweep() == 0


def test_the_periodic_tasks_run_on_an_empty_ledger(stripe_fake: FakeStripe):
    assert tasks.settlement_daily() == {}
    assert tasks.invoice_monthly() == 0
    assert tasks.rollups_recent() == 0
