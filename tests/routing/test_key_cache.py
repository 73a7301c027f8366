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


class _Database:
    """The key's row as PostgreSQL holds it. A read sees the row as it is when it starts;
    with ``hold`` armed, its answer comes back only once the test releases it (the thread
    hop, a slow query), while the row may change and the change's invalidation arrive."""

    def __init__(self) -> None:
        self.rpm = 60
        self.reads = 0
        self.reading = asyncio.Event()  # the held read has seen the row
        self.hold: asyncio.Event | None = None

    async def loader(self, key_hash: str) -> KeyInfo | None:
        self.reads += 1
        seen = self.rpm
        hold, self.hold = self.hold, None
        if hold is not None:
            self.reading.set()
            await hold.wait()
        return KeyInfo(
            key_id=1,
            organization_id=2,
            key_hash=key_hash,
            prefix="p",
            expires_at=None,
            revoked=False,
            rate_limit_rpm=seen,
        )

    def change(self, cache: KeyCache, key_hash: str, *, clear: bool) -> None:
        """The control plane commits a change, then the gateway hears of it."""
        self.rpm = 6
        if clear:  # the gateway (re)subscribed: it drops every key
            cache.clear()
        else:
            cache.forget(key_hash)


async def _background_tasks_done() -> None:
    """Let the cache's background refreshes finish (waiting on them, not on a clock)."""
    while others := asyncio.all_tasks() - {asyncio.current_task()}:
        await asyncio.gather(*others)


@pytest.mark.parametrize("clear", [False, True], ids=["forget", "clear"])
def test_a_key_invalidated_while_a_miss_reads_it_is_not_cached_as_it_was_read(clear):
    key = generate_key()
    bearer = f"Bearer {key.plaintext}"
    db = _Database()

    async def scenario() -> tuple[int | None, int | None, int]:
        cache = KeyCache(ttl=60, loader=db.loader)
        release = db.hold = asyncio.Event()
        request = asyncio.create_task(cache.authenticate(bearer))
        await asyncio.wait_for(db.reading.wait(), 5)  # the miss read the row; its answer is due
        db.change(cache, key.key_hash, clear=clear)
        release.set()
        first = await asyncio.wait_for(request, 5)
        later = await cache.authenticate(bearer)  # within the TTL: from the cache
        return first.rate_limit_rpm, later.rate_limit_rpm, db.reads

    # The request that raced the change read the key once more; the new row is cached.
    assert asyncio.run(scenario()) == (6, 6, 2)


def test_a_miss_raced_by_invalidations_twice_answers_without_caching_either_read():
    key = generate_key()
    bearer = f"Bearer {key.plaintext}"
    db = _Database()

    async def scenario() -> tuple[int | None, int | None, int]:
        cache = KeyCache(ttl=60, loader=db.loader)
        first_read = db.hold = asyncio.Event()
        request = asyncio.create_task(cache.authenticate(bearer))
        await asyncio.wait_for(db.reading.wait(), 5)
        db.change(cache, key.key_hash, clear=False)
        db.reading.clear()
        second_read = db.hold = asyncio.Event()  # the read once more is held and raced too
        first_read.set()
        await asyncio.wait_for(db.reading.wait(), 5)
        db.rpm = 3
        cache.forget(key.key_hash)
        second_read.set()
        answered = await asyncio.wait_for(request, 5)  # no third read: answered, not cached
        later = await cache.authenticate(bearer)
        return answered.rate_limit_rpm, later.rate_limit_rpm, db.reads

    assert asyncio.run(scenario()) == (6, 3, 3)


def test_a_refresh_that_raced_an_invalidation_does_not_overwrite_the_fresh_answer():
    key = generate_key()
    bearer = f"Bearer {key.plaintext}"
    db = _Database()

    async def scenario() -> tuple[int | None, int | None, int | None, int]:
        cache = KeyCache(ttl=0.0, loader=db.loader)  # every answer from the cache is stale
        await cache.authenticate(bearer)
        release = db.hold = asyncio.Event()
        stale = await cache.authenticate(bearer)  # answered from the cache, re-read behind
        await asyncio.wait_for(db.reading.wait(), 5)  # the refresh has read the old row
        db.change(cache, key.key_hash, clear=False)
        fresh = await cache.authenticate(bearer)  # forgotten: a miss reads the new row
        release.set()  # the refresh's old row comes back now ...
        await _background_tasks_done()
        later = await cache.authenticate(bearer)  # ... and must not replace the new one
        await _background_tasks_done()
        return stale.rate_limit_rpm, fresh.rate_limit_rpm, later.rate_limit_rpm, db.reads

    # Reads: the first miss, the raced refresh, the miss after the change, the refresh
    # behind `later`.
    assert asyncio.run(scenario()) == (60, 6, 6, 4)


def test_a_refresh_that_raced_an_invalidation_does_not_bring_the_key_back():
    key = generate_key()
    bearer = f"Bearer {key.plaintext}"
    db = _Database()

    async def scenario() -> tuple[int | None, int]:
        cache = KeyCache(ttl=0.0, loader=db.loader)
        await cache.authenticate(bearer)
        release = db.hold = asyncio.Event()
        await cache.authenticate(bearer)  # stale: re-read behind
        await asyncio.wait_for(db.reading.wait(), 5)
        db.change(cache, key.key_hash, clear=True)
        release.set()
        await _background_tasks_done()
        later = await cache.authenticate(bearer)  # not cached: read afresh
        await _background_tasks_done()
        return later.rate_limit_rpm, db.reads

    assert asyncio.run(scenario()) == (6, 3)
