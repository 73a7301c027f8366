"""The gateway's database reads: after one finds PostgreSQL away, the next ones do not wait
for the pool's timeout again but fail at once, until the pause is over or a probe succeeds."""

from __future__ import annotations

import asyncio

import pytest
from django.db import OperationalError

from routing.gateway.db import off_loop, outage


@pytest.fixture(autouse=True)
def _fresh_outage(settings):  # type: ignore[no-untyped-def]
    settings.GATEWAY_DB_RETRY_SECONDS = 60
    outage.recovered()
    yield
    outage.recovered()


def _away() -> None:
    raise OperationalError("connection refused")


def test_reads_after_a_failed_one_fail_without_trying():
    tried = []

    def read() -> int:
        tried.append(1)
        return 1

    with pytest.raises(OperationalError):
        asyncio.run(off_loop(_away)())
    with pytest.raises(OperationalError, match="unreachable"):
        asyncio.run(off_loop(read)())

    assert tried == []


def test_a_successful_probe_ends_the_pause():
    with pytest.raises(OperationalError):
        asyncio.run(off_loop(_away)())

    assert asyncio.run(off_loop(lambda: "pong", probe=True)()) == "pong"
    assert asyncio.run(off_loop(lambda: 2)()) == 2


def test_reads_are_tried_again_after_the_pause(settings):
    settings.GATEWAY_DB_RETRY_SECONDS = 0
    with pytest.raises(OperationalError):
        asyncio.run(off_loop(_away)())

    assert asyncio.run(off_loop(lambda: 3)()) == 3
