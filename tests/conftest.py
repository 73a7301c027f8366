"""Fixtures shared by the whole suite: real PostgreSQL (pytest-django's test database),
real Redis (flushed before each test), real HTTP servers for the gateway and vendors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from django.conf import settings

from marketplace.devenv import free_port
from marketplace.redis_client import sync_client


@pytest.fixture(autouse=True)
def _allow_loopback_vendors(settings):  # type: ignore[no-untyped-def]
    """Test vendors listen on loopback; production refuses it unless the operator allows."""
    settings.OUTBOUND_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]


@pytest.fixture(autouse=True)
def redis_clean() -> Iterator[None]:
    """Each test starts with an empty Redis database (holds, streams, caches)."""
    sync_client().flushdb()
    yield


@pytest.fixture(autouse=True)
def fresh_channel_layer() -> Iterator[None]:
    """Each test's servers get their own channel layer: the layer belongs to the event loop
    that first receives on it, and a test server's loop ends with its test."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield


@dataclass
class RunningServer:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def gateway(self):  # type: ignore[no-untyped-def]
        return self.app.gateway  # type: ignore[attr-defined]

    def client(self, key: str | None = None, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]


def start_asgi_server(app: object, *, gc_freeze: bool = False) -> RunningServer:
    """Serve ``app`` with uvicorn on a free loopback port in a background thread.

    The server shares pytest's process, so the gateway's start-up ``gc.freeze()``
    (routing/gateway/gcpause.py) would freeze every test's leftovers: off unless asked for.
    """
    gateway = getattr(app, "gateway", None)
    if gateway is not None and not gc_freeze:
        gateway.gc.enabled, gateway.gc.remaining = False, 0
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",  # type: ignore[arg-type]
        lifespan="on",
        loop="asyncio",
        # As deployed: X-Forwarded-For is read by marketplace.client_ip (TRUSTED_PROXIES) only.
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server failed to start")
        threading.Event().wait(0.01)
    return RunningServer(url=f"http://127.0.0.1:{port}", app=app, server=server, thread=thread)


@pytest.fixture
def gateway_server(transactional_db) -> Iterator[RunningServer]:  # type: ignore[no-untyped-def]
    """The whole ASGI application (gateway + Django) behind a real HTTP server.

    A fresh application per test, so no routing table or key cache outlives its test.
    """
    from marketplace.asgi import build_application

    running = start_asgi_server(build_application())
    try:
        yield running
    finally:
        running.server.should_exit = True
        running.thread.join(timeout=10)


@pytest.fixture
def upstream() -> Iterator[object]:
    """A fault-injecting OpenAI-compatible vendor on a random loopback port."""
    from tests.support.upstream import FaultUpstream

    with FaultUpstream() as server:
        yield server


@pytest.fixture(scope="session")
def smollm2() -> Iterator[object]:
    """A real SmolLM2-135M-Instruct server, one per test session."""
    from vendors.reference.launch import start_reference_vendor

    vendor = start_reference_vendor("smollm2", parallel=2, ctx=2048)
    try:
        yield vendor
    finally:
        vendor.stop()


def _drain(batch: Callable[..., Any], stored: str) -> int:
    total = 0
    while True:
        result = batch(count=1000)
        total += getattr(result, stored)
        if result.read == 0:
            return total


def ingest_all() -> int:
    """Run usage ingest until the stream is drained (what the Celery beat task does)."""
    from billing.usage import usage_ingest_batch

    return _drain(usage_ingest_batch, "recorded")


def ingest_traces() -> int:
    """Run trace ingest until the stream is drained (what the Celery beat task does)."""
    from routing.traces import trace_ingest_batch

    return _drain(trace_ingest_batch, "stored")


def run_async(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


__all__ = ["RunningServer", "ingest_all", "settings", "start_asgi_server"]
