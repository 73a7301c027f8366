"""Celery routes metering, probes and payments to separate queues."""

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

    root = Path(__file__).resolve().parent.parent
    for path in (root / "marketplace" / "runner.py", root / "docker-compose.yml"):
        assert "ingest,probes,payments,default" in path.read_text(), path
