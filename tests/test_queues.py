"""Celery routes metering, probes and payments to separate queues."""

from django.conf import settings

from marketplace.celery import app


def _queue(task_name: str) -> str:
    route = app.amqp.router.route({}, task_name)
    return route["queue"].name


def test_metering_probes_and_payments_have_their_own_queues():
    assert _queue("billing.tasks.usage_ingest") == "ingest"
    assert _queue("vendors.tasks.health_probe_all") == "probes"
    assert _queue("vendors.tasks.quality_probe_endpoint") == "probes"
    assert _queue("billing.tasks.settlement_daily") == "payments"
    assert _queue("billing.tasks.stripe_event_process") == "payments"


def test_the_dev_runner_and_compose_workers_consume_every_queue():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    assert "ingest,probes,payments,default" in (root / "marketplace" / "runner.py").read_text()
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    consumed = []
    for service in compose["services"].values():
        command = service.get("command") or []
        if "worker" in command and "-Q" in command:
            consumed += command[command.index("-Q") + 1].split(",")
    # Each queue has its own worker service (a slow Stripe call never delays metering).
    assert sorted(consumed) == sorted(settings.CELERY_QUEUES_ALL.split(","))
