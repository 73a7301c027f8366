"""Celery beat entries of billing, merged into ``CELERY_BEAT_SCHEDULE`` by the settings.

All times are UTC. Each task is idempotent, so a missed or doubled beat is harmless.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

BILLING_BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "billing-stripe-events-sweep": {
        "task": "billing.tasks.stripe_events_sweep",
        "schedule": 300.0,
    },
    "billing-rollups-recent": {
        "task": "billing.tasks.rollups_recent",
        "schedule": crontab(minute=5),
    },
    "billing-settlement-daily": {
        "task": "billing.tasks.settlement_daily",
        "schedule": crontab(hour=2, minute=0),
    },
    "billing-budget-alerts": {
        "task": "billing.tasks.budget_alerts",
        "schedule": 300.0,
    },
    "billing-invoice-monthly": {
        "task": "billing.tasks.invoice_monthly",
        "schedule": crontab(day_of_month=2, hour=6, minute=0),
    },
}
