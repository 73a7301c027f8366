"""Holds in Redis: the spendable credit never goes below zero, whatever the concurrency."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from django.conf import settings

from billing.credit import AsyncCredit, credit_key, credit_version_key
from marketplace.redis_client import sync_client


async def _with_credit(fn):  # type: ignore[no-untyped-def]
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    try:
        return await fn(AsyncCredit(client))
    finally:
        await client.aclose()


def test_it_never_holds_more_than_the_balance_under_concurrency():
    sync_client().set(credit_key(1), 1_000)

    async def burst(credit: AsyncCredit) -> list[bool]:
        async def balance(_: int) -> int:
            raise AssertionError("the key exists; no database read is needed")

        return await asyncio.gather(*(credit.reserve(1, 70, balance) for _ in range(100)))

    results = asyncio.run(_with_credit(burst))
    assert sum(results) == 1_000 // 70
    assert int(sync_client().get(credit_key(1))) == 1_000 % 70


def test_it_loads_the_balance_once_on_first_use():
    calls = []

    async def run(credit: AsyncCredit) -> bool:
        async def balance(org: int) -> int:
            calls.append(org)
            return 500

        return await credit.reserve(7, 200, balance) and await credit.reserve(7, 200, balance)

    assert asyncio.run(_with_credit(run))
    assert calls == [7]
    assert int(sync_client().get(credit_key(7))) == 100


def test_it_retries_instead_of_storing_a_balance_that_a_grant_made_stale():
    async def run(credit: AsyncCredit) -> bool:
        loads = []

        async def balance(org: int) -> int:
            loads.append(org)
            if len(loads) == 1:
                # A grant commits while we read: it bumps the version after our read.
                sync_client().incr(credit_version_key(org))
                return 100
            return 300

        ok = await credit.reserve(9, 250, balance)
        assert len(loads) == 2
        return ok

    assert asyncio.run(_with_credit(run))
    assert int(sync_client().get(credit_key(9))) == 50


def test_settling_returns_the_unused_hold_and_emits_the_event_together():
    sync_client().set(credit_key(3), 1000)

    async def run(credit: AsyncCredit) -> None:
        async def balance(_: int) -> int:
            return 0

        assert await credit.reserve(3, 400, balance)
        await credit.settle(3, refund=300, event={"rid": "gen-1", "cost": 100})

    asyncio.run(_with_credit(run))
    assert int(sync_client().get(credit_key(3))) == 900
    entries = sync_client().xrange("sy:usage")
    assert len(entries) == 1 and b"gen-1" in entries[0][1][b"e"]
