"""The gateway's key cache keeps serving known keys while the database is away."""

from __future__ import annotations

import asyncio

import pytest

from marketplace.keys import generate_key
from routing.errors import Unauthorized
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

    with pytest.raises(ConnectionError):
        asyncio.run(scenario())


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
