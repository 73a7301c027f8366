"""Health probes and the guarded vendor client, against real HTTP servers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.celery import app as celery_app
from marketplace.devenv import free_port
from marketplace.redis_client import sync_client
from routing.live import CIRCUIT, FAILURES, TOUCHED, record_health_probe, trial_key
from tests import factories
from vendors import selectors, tasks
from vendors.models import HealthCheck
from vendors.pricing import live_key
from vendors.probes import (
    HEALTH_KEY_TTL_SECONDS,
    VendorCallError,
    VendorClient,
    VendorUnreachableError,
    health_key,
)
from vendors.services import endpoint_probe_health

pytestmark = pytest.mark.django_db


@pytest.fixture
def celery_eager() -> Iterator[None]:
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    try:
        yield
    finally:
        celery_app.conf.task_always_eager = False
        celery_app.conf.task_eager_propagates = False


def _published(endpoint_id: int) -> dict[str, object] | None:
    raw = sync_client().get(health_key(endpoint_id))
    return None if raw is None else json.loads(raw)


def test_it_records_a_healthy_endpoint_and_publishes_it_for_the_gateway(upstream):
    # given an endpoint with a secret
    endpoint = factories.endpoint(base_url=upstream.base_url, secret="vendor-secret")

    # when its health is probed
    check = endpoint_probe_health(endpoint=endpoint)

    # then the cheap model listing was asked with the vendor's secret
    assert (check.ok, check.status, check.error) == (True, 200, "")
    assert check.latency_ms is not None
    request = upstream.last_request()
    assert (request["method"], request["path"]) == ("GET", "/v1/models")
    assert request["headers"]["Authorization"] == "Bearer vendor-secret"

    # and the outcome is in Redis for ten minutes
    published = _published(endpoint.pk)
    assert published == {
        "ok": True,
        "status": 200,
        "latency_ms": check.latency_ms,
        "checked_at": check.checked_at.timestamp(),
    }
    assert 0 < sync_client().ttl(health_key(endpoint.pk)) <= HEALTH_KEY_TTL_SECONDS


def test_it_records_a_failing_endpoint(upstream):
    # given an upstream that answers the next call with HTTP 500
    endpoint = factories.endpoint(base_url=upstream.base_url)
    upstream.script(["status:500"])

    # when its health is probed
    check = endpoint_probe_health(endpoint=endpoint)

    # then the failure is recorded with the status and the vendor's message
    assert (check.ok, check.status) == (False, 500)
    assert check.error == "HTTP 500: Injected upstream fault: HTTP 500"
    assert _published(endpoint.pk)["ok"] is False  # type: ignore[index]


def test_it_falls_back_to_a_one_token_chat_when_the_model_listing_is_missing(upstream):
    # given a server without /models
    endpoint = factories.endpoint(base_url=upstream.base_url, upstream_model="fake-small")
    upstream.script(["status:404"], path="/v1/models")

    # when its health is probed
    check = endpoint_probe_health(endpoint=endpoint)

    # then a one-token chat completion decided it
    assert (check.ok, check.status) == (True, 200)
    chat = upstream.last_request("/v1/chat/completions")
    assert chat["body"]["max_tokens"] == 1
    assert chat["body"]["model"] == "fake-small"


def test_it_records_an_endpoint_where_nothing_listens():
    endpoint = factories.endpoint(base_url=f"http://127.0.0.1:{free_port()}/v1")

    check = endpoint_probe_health(endpoint=endpoint)

    assert (check.ok, check.status) == (False, None)
    assert check.error.startswith("could not reach http://127.0.0.1:")


def test_it_refuses_to_probe_a_url_on_an_address_that_is_not_allowed(settings, upstream):
    # given an endpoint on loopback, which the operator no longer allows
    endpoint = factories.endpoint(base_url=upstream.base_url)
    settings.OUTBOUND_ALLOWED_NETWORKS = []

    # when its health is probed
    check = endpoint_probe_health(endpoint=endpoint)

    # then no request left and the refusal is the recorded error
    assert not check.ok
    assert check.error.startswith("the URL is refused: 127.0.0.1 resolves to 127.0.0.1")
    assert upstream.stats()["total"] == 0


def test_it_does_not_follow_redirects(upstream):
    # given a server that redirects every request elsewhere
    from tests.vendors.test_conformance import redirecting_server

    with redirecting_server(upstream.url) as url:
        endpoint = factories.endpoint(base_url=f"{url}/v1")

        # when its health is probed
        check = endpoint_probe_health(endpoint=endpoint)

    # then the redirect is a failure naming its target, and the target was never called
    assert (check.ok, check.status) == (False, 307)
    assert "redirect (HTTP 307 to " + upstream.url in check.error
    assert upstream.stats()["total"] == 0


def test_it_computes_uptime_over_a_window(upstream):
    # given three healthy probes and one failing probe today, and a failure moved to two
    # days ago
    endpoint = factories.endpoint(base_url=upstream.base_url)
    other = factories.endpoint(base_url=upstream.base_url)
    upstream.script(["none", "status:503", "none", "none", "status:503"])
    for _ in range(5):
        endpoint_probe_health(endpoint=endpoint)
    latest = HealthCheck.objects.filter(endpoint=endpoint).order_by("pk").last()
    HealthCheck.objects.filter(pk=latest.pk).update(checked_at=timezone.now() - timedelta(days=2))

    # when uptime is read
    # then the last day counts 3 of 4, a week 3 of 5, and an unprobed endpoint has none
    assert selectors.uptime(endpoint) == pytest.approx(0.75)
    assert selectors.uptime(endpoint, window=timedelta(days=7)) == pytest.approx(0.6)
    assert selectors.uptime_map([endpoint.pk, other.pk]) == {
        endpoint.pk: pytest.approx(0.75),
        other.pk: None,
    }


def test_it_fans_health_probes_out_over_approved_endpoints(upstream, celery_eager):
    # given an approved endpoint, a pending one and one of a suspended vendor
    approved = factories.endpoint(base_url=upstream.base_url)
    pending = factories.endpoint(base_url=upstream.base_url, approved=False)
    suspended = factories.endpoint(
        base_url=upstream.base_url, vendor_obj=factories.vendor(approved=False)
    )

    # when the periodic fan-out runs
    queued = tasks.health_probe_all()

    # then only the approved endpoint was probed
    assert queued == 1
    assert HealthCheck.objects.filter(endpoint=approved, ok=True).count() == 1
    assert not HealthCheck.objects.filter(endpoint__in=[pending, suspended]).exists()
    assert _published(approved.pk)["ok"] is True  # type: ignore[index]
    assert tasks.health_probe_endpoint(10**9) is None  # deleted since: nothing to do


def test_celery_beat_runs_the_health_probes_every_30_seconds(settings):
    entries = [
        e
        for e in settings.CELERY_BEAT_SCHEDULE.values()
        if e["task"] == tasks.health_probe_all.name
    ]
    assert [e["schedule"] for e in entries] == [30.0]


def test_it_caps_the_size_of_an_answer(upstream):
    # given an upstream answering with a 2 MB body
    upstream.script(["oversize:2000000"])

    # when the guarded client reads it, then it stops at 1 MiB
    with (
        VendorClient(upstream.base_url) as client,
        pytest.raises(VendorCallError, match="larger than 1024 KiB"),
    ):
        client.call(
            "POST",
            "chat/completions",
            json_body={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )


def test_it_connects_to_the_vetted_address_and_keeps_the_host_name(upstream):
    # given a URL with a host name rather than an address
    base_url = f"http://localhost:{upstream.port}/v1"

    # when it is called
    with VendorClient(base_url) as client:
        response = client.call("GET", "models")

    # then the server saw the name in the Host header, and no User-Agent that marks a probe
    assert response.status == 200
    headers = {k.lower(): v for k, v in upstream.last_request()["headers"].items()}
    assert headers["host"] == f"localhost:{upstream.port}"
    assert "user-agent" not in headers


def test_it_reports_a_timeout_as_unreachable(upstream):
    upstream.script(["ttfb-hang"])
    with (
        VendorClient(upstream.base_url, read_timeout=0.3) as client,
        pytest.raises(VendorUnreachableError, match="within the time limit"),
    ):
        client.call("GET", "models")


# --- the probes feed the circuit breaker the gateway reads ----------------------------------


def _circuit(endpoint_id: int) -> tuple[str | None, str | None]:
    failures, opened = sync_client().hmget(live_key(endpoint_id), FAILURES, CIRCUIT)
    return (
        failures.decode() if failures else None,
        "open" if opened else None,
    )


def test_failed_probes_open_the_circuit_after_the_failure_threshold(upstream, settings):
    settings.GATEWAY_CIRCUIT_FAILURES = 3
    endpoint = factories.endpoint(base_url=upstream.base_url)
    upstream.script(["status:500", "status:500", "status:500"])

    seen = []
    for _ in range(3):
        endpoint_probe_health(endpoint=endpoint)
        seen.append(_circuit(endpoint.pk))

    assert seen == [("1", None), ("2", None), ("3", "open")]
    assert sync_client().zscore(TOUCHED, endpoint.pk) is not None  # replicas re-read it


def test_a_healthy_probe_closes_an_open_circuit_only_after_its_cooldown(upstream, settings):
    settings.GATEWAY_CIRCUIT_FAILURES = 1
    settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS = 3600.0
    endpoint = factories.endpoint(base_url=upstream.base_url)
    upstream.script(["status:503"])
    endpoint_probe_health(endpoint=endpoint)
    assert _circuit(endpoint.pk) == ("1", "open")

    endpoint_probe_health(endpoint=endpoint)  # healthy, but within the cooldown
    assert _circuit(endpoint.pk) == ("1", "open")

    settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS = 0.0
    sync_client().set(trial_key(endpoint.pk), "a-customer-trial", ex=30)
    endpoint_probe_health(endpoint=endpoint)  # a trial request is in flight: it decides
    assert _circuit(endpoint.pk) == ("1", "open")

    sync_client().delete(trial_key(endpoint.pk))
    endpoint_probe_health(endpoint=endpoint)
    assert _circuit(endpoint.pk) == (None, None)


def test_a_healthy_probe_leaves_the_failures_of_real_requests_counted(upstream, settings):
    settings.GATEWAY_CIRCUIT_FAILURES = 5
    endpoint = factories.endpoint(base_url=upstream.base_url)
    sync_client().hset(live_key(endpoint.pk), FAILURES, 4)  # four failed requests in a row

    assert (
        record_health_probe(sync_client(), endpoint.pk, ok=True, threshold=5, cooldown=30.0)
        == "closed"
    )
    assert _circuit(endpoint.pk) == ("4", None)
