"""Prometheus metrics of the gateway, multiprocess-safe.

Counters and histograms are updated on the hot path (a few microseconds each). Per-endpoint
gauges (utilisation, surge multiplier, circuit state, in-flight) and queue depths are
computed when ``/metrics`` is scraped, from the gateway's live cache and one Redis pipeline.
With several worker processes set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory shared by
the processes of one host); the scrape then merges every process's counters.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "switchyard_requests_total",
    "Requests answered by the gateway",
    ["kind", "endpoint", "vendor", "outcome"],
)
LATENCY = Histogram(
    "switchyard_request_seconds", "Whole request time", ["kind"], buckets=LATENCY_BUCKETS
)
CACHE_HITS = Counter(
    "switchyard_cache_hits_total", "Requests answered from the response cache", ["kind"]
)
PRIVACY = Counter(
    "switchyard_privacy_actions_total",
    "Requests whose prompt held personal data, by what the privacy guard did",
    ["action"],
)
TTFT = Histogram(
    "switchyard_time_to_first_token_seconds",
    "Time to the vendor's first byte",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
FALLBACKS = Counter(
    "switchyard_fallbacks_total", "Attempts that moved on to the next candidate", ["reason"]
)
REFUSED = Counter(
    "switchyard_refused_total", "Requests refused before any vendor was called", ["reason"]
)


def content_type() -> str:
    return str(CONTENT_TYPE_LATEST)


class _Snapshot:
    """Scrape-time values, collected by the async handler before rendering."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def endpoint_gauges(
    numbers: dict[int, Any], names: dict[int, tuple[str, str]], multipliers: dict[int, float]
) -> list[Metric]:
    labels = ["endpoint", "vendor"]
    util = GaugeMetricFamily(
        "switchyard_endpoint_utilisation", "Smoothed utilisation", labels=labels
    )
    inflight = GaugeMetricFamily(
        "switchyard_endpoint_inflight", "Requests in flight", labels=labels
    )
    circuit = GaugeMetricFamily(
        "switchyard_endpoint_circuit_open", "1 when the circuit is open", labels=labels
    )
    surge = GaugeMetricFamily(
        "switchyard_endpoint_surge_multiplier", "Current price multiplier", labels=labels
    )
    for endpoint_id, (slug, vendor) in names.items():
        n = numbers.get(endpoint_id)
        util.add_metric([slug, vendor], n.utilisation if n else 0.0)
        inflight.add_metric([slug, vendor], n.inflight if n else 0)
        circuit.add_metric([slug, vendor], 1.0 if n and n.circuit_opened_at else 0.0)
        surge.add_metric([slug, vendor], multipliers.get(endpoint_id, 1.0))
    return [util, inflight, circuit, surge]


def queue_gauges(
    stream_length: int, stream_pending: int, celery_depth: int, trace_stream_length: int = 0
) -> list[Metric]:
    length = GaugeMetricFamily("switchyard_usage_stream_length", "Entries in the usage stream")
    length.add_metric([], stream_length)
    pending = GaugeMetricFamily(
        "switchyard_usage_stream_pending", "Usage entries read but not yet acknowledged"
    )
    pending.add_metric([], stream_pending)
    celery = GaugeMetricFamily("switchyard_celery_queue_depth", "Tasks waiting in Celery's queue")
    celery.add_metric([], celery_depth)
    traces = GaugeMetricFamily(
        "switchyard_trace_stream_length",
        "Route traces waiting for PostgreSQL (capped: beyond GATEWAY_TRACE_STREAM_MAXLEN the"
        " oldest are dropped)",
    )
    traces.add_metric([], trace_stream_length)
    return [length, pending, celery, traces]


def render(extra: Iterable[Metric]) -> bytes:
    """The exposition text: this process's (or every process's) metrics plus ``extra``."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        for collector in list(REGISTRY._collector_to_names):
            registry.register(collector)
    registry.register(_Snapshot(list(extra)))  # type: ignore[arg-type]
    return bytes(generate_latest(registry))
