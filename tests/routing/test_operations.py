"""Health, readiness, metrics and logs of the gateway."""

from __future__ import annotations

import json
import logging

import pytest

from marketplace.logs import JsonFormatter, RequestIdFilter, request_id_var, scrub
from tests import factories

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_reports_ready_when_its_dependencies_answer(gateway_server):
    with gateway_server.client() as client:
        ready = client.get("/readyz")
        alive = client.get("/healthz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "checks": {"redis": "ok", "database": "ok", "routing_table": "ok"},
    }
    assert alive.status_code == 200


def _sample(text: str, name: str) -> float:
    """The value of one sample line (counters are per process, so tests compare deltas)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_it_exposes_request_counters_and_endpoint_gauges(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    served = (
        f'switchyard_requests_total{{endpoint="{endpoint.full_slug}",kind="chat",'
        f'outcome="success",vendor="{endpoint.vendor.slug}"}}'
    )
    refused = 'switchyard_refused_total{reason="invalid_type"}'
    with gateway_server.client(customer.key) as client:
        before = client.get("/metrics").text
        client.post(
            "/v1/chat/completions",
            json={"model": endpoint.full_slug, "messages": [{"role": "user", "content": "x"}]},
        )
        client.post("/v1/chat/completions", json={"model": "nobody/nothing", "messages": []})
        text = client.get("/metrics").text
    assert _sample(text, served) == _sample(before, served) + 1
    assert _sample(text, refused) == _sample(before, refused) + 1
    assert f'switchyard_endpoint_surge_multiplier{{endpoint="{endpoint.full_slug}"' in text
    assert _sample(text, "switchyard_usage_stream_length") == 1
    assert _sample(text, "switchyard_trace_stream_length") == 1  # not yet in PostgreSQL
    assert "switchyard_request_seconds_bucket" in text


def test_log_lines_are_json_with_the_request_id_and_no_secrets():
    record = logging.LogRecord(
        "switchyard.gateway",
        logging.WARNING,
        __file__,
        1,
        "vendor said no to Bearer abc.def for sy-0123abcd-SECRETSECRETSECRET",
        None,
        None,
    )
    token = request_id_var.set("gen-123")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "gen-123" and line["level"] == "WARNING"
    assert "SECRET" not in line["message"] and "abc.def" not in line["message"]
    assert scrub("sy-0123abcd-abcdefghijkl") == "sy-0123abcd-[redacted]"


def test_pages_answer_with_a_request_id(client):
    response = client.get("/healthz")
    assert response["X-Request-ID"].startswith("req-")


def test_the_gateway_freezes_start_up_objects_and_again_after_warm_up(upstream):
    """Full collections skip what start-up loaded (routing/gateway/gcpause.py)."""
    import gc

    from marketplace.asgi import build_application
    from routing.gateway.gcpause import GcFreezer
    from tests.conftest import start_asgi_server

    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    app = build_application()
    app.gateway.gc = GcFreezer(enabled=True, refreeze_after=3, young_threshold=5000)
    gc.unfreeze()
    thresholds = gc.get_threshold()
    running = start_asgi_server(app, gc_freeze=True)
    try:
        at_startup = gc.get_freeze_count()
        assert at_startup > 0
        assert gc.get_threshold() == (5000, *thresholds[1:])
        body = {"model": endpoint.full_slug, "messages": [{"role": "user", "content": "x"}]}
        with running.client(customer.key) as client:
            for _ in range(2):
                assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert app.gateway.gc.remaining == 1
            held = []  # objects alive across the re-freeze, so there is something to freeze
            held.append(object.__new__(type("Kept", (), {})))
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            after_warm_up = gc.get_freeze_count()
            assert app.gateway.gc.remaining == 0
            assert after_warm_up > at_startup
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        # Once only: later objects are not frozen (frozen ones freed by refcount leave it).
        assert gc.get_freeze_count() <= after_warm_up
    finally:
        running.server.should_exit = True
        running.thread.join(timeout=10)
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_in_process_test_servers_never_freeze_the_test_process(gateway_server):
    import gc

    assert gateway_server.gateway.gc.enabled is False
    with gateway_server.client() as client:
        assert client.get("/readyz").status_code == 200
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold()[0] == 700  # CPython's default, as pytest left it
