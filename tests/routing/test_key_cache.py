"""The gateway's key cache keeps serving known keys while the database is away."""

from __future__ import annotations

import asyncio

import pytest

from marketplace.keys import generate_key
from routing.errors import Unauthorized, Unavailable
from routing.gateway.auth import KeyCache, KeyInfo


def _info(key_hash: str) -> KeyInfo:
    return KeyInfo(
        key_id=1,
        organization_id=2,
        key_hash=key_hash,
        prefix="p",
        expires_at=None,
        revoked=False,
        rate_limit_rpm=None,
    )


def test_a_known_key_survives_a_database_outage_after_its_ttl():
    key = generate_key()
    database_up = {"value": True}

    async def loader(key_hash: str) -> KeyInfo | None:
        if not database_up["value"]:
            raise ConnectionError("database unavailable")
        return _info(key_hash)

    async def scenario() -> KeyInfo:
        cache = KeyCache(ttl=0.0, loader=loader)
        await cache.authenticate(f"Bearer {key.plaintext}")
        database_up["value"] = False
        return await cache.authenticate(f"Bearer {key.plaintext}")  # TTL expired, DB down

    assert asyncio.run(scenario()).organization_id == 2


def test_an_unknown_key_is_not_let_in_while_the_database_is_away():
    key = generate_key()

    async def loader(key_hash: str) -> KeyInfo | None:
        raise ConnectionError("database unavailable")

    async def scenario() -> None:
        await KeyCache(ttl=60, loader=loader).authenticate(f"Bearer {key.plaintext}")

    with pytest.raises(Unavailable) as refused:
        asyncio.run(scenario())
    assert (refused.value.status, refused.value.code) == (503, "auth_unavailable")


def test_a_revoked_key_is_refused_from_the_cache():
    key = generate_key()

    async def loader(key_hash: str) -> KeyInfo | None:
        return KeyInfo(
            key_id=1,
            organization_id=2,
            key_hash=key_hash,
            prefix="p",
            expires_at=None,
            revoked=True,
            rate_limit_rpm=None,
        )

    async def scenario() -> None:
        await KeyCache(ttl=60, loader=loader).authenticate(f"Bearer {key.plaintext}")

    with pytest.raises(Unauthorized):
        asyncio.run(scenario())


def test_a_known_key_past_its_ttl_is_answered_without_waiting_and_refreshed_behind():
    key = generate_key()
    release = {"event": None}
    loads = []

    async def loader(key_hash: str) -> KeyInfo | None:
        loads.append(key_hash)
        if len(loads) > 1:  # the refresh: the database is slow, then says "revoked"
            await release["event"].wait()
            return KeyInfo(
                key_id=1,
                organization_id=2,
                key_hash=key_hash,
                prefix="p",
                expires_at=None,
                revoked=True,
                rate_limit_rpm=None,
            )
        return _info(key_hash)

    async def scenario() -> tuple[int, int]:
        release["event"] = asyncio.Event()
        cache = KeyCache(ttl=0.0, loader=loader)
        await cache.authenticate(f"Bearer {key.plaintext}")
        # Past its TTL, with the database hanging: answered from the cache at once.
        stale = await asyncio.wait_for(cache.authenticate(f"Bearer {key.plaintext}"), 5)
        again = await asyncio.wait_for(cache.authenticate(f"Bearer {key.plaintext}"), 5)
        assert len(loads) == 2  # one refresh for both stale answers
        release["event"].set()
        for _ in range(100):
            await asyncio.sleep(0)
        with pytest.raises(Unauthorized):  # the refreshed answer is used from now on
            await cache.authenticate(f"Bearer {key.plaintext}")
        return stale.organization_id, again.organization_id

    assert asyncio.run(scenario()) == (2, 2)
