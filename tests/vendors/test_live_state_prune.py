"""The hourly prune of the gateway's live numbers: a deleted endpoint's live state leaves
Redis (the full refresh and the hold sweep go through every endpoint in it), an existing
endpoint's stays, and so does a deleted one's while a request still holds its slot."""

from __future__ import annotations

import time

import pytest

from marketplace.redis_client import sync_client
from routing.live import TOUCHED, slots_key
from tests import factories
from vendors.pricing import live_key
from vendors.tasks import live_state_prune

pytestmark = pytest.mark.django_db

BASE_URL = "http://127.0.0.1:9/v1"


def _live(redis, endpoint_id: int) -> None:  # type: ignore[no-untyped-def]
    redis.hset(live_key(endpoint_id), mapping={"n": 0, "u": 0.5, "r": 10})
    redis.zadd(TOUCHED, {str(endpoint_id): time.time()})


def test_it_drops_the_live_state_of_deleted_endpoints_only():
    redis = sync_client()
    kept = factories.endpoint(base_url=BASE_URL)
    deleted, busy = 987_650, 987_651  # ids no endpoint has
    for endpoint_id in (kept.pk, deleted, busy):
        _live(redis, endpoint_id)
    redis.zadd(slots_key(busy), {"a-request-in-flight": time.time() + 300})
    redis.zadd(slots_key(deleted), {"expired-lease": time.time() - 1})
    redis.zadd(TOUCHED, {"not-an-endpoint": time.time()})

    assert live_state_prune() == 1

    members = {m.decode() for m in redis.zrange(TOUCHED, 0, -1)}
    assert members == {str(kept.pk), str(busy)}
    assert not redis.exists(live_key(deleted)) and not redis.exists(slots_key(deleted))
    assert redis.hget(live_key(kept.pk), "u") == b"0.5"
    assert redis.hget(live_key(busy), "r") == b"10"  # a request still holds a slot

    redis.delete(slots_key(busy))  # that request finished
    assert live_state_prune() == 1
    assert {m.decode() for m in redis.zrange(TOUCHED, 0, -1)} == {str(kept.pk)}


def test_it_recounts_an_existing_endpoint_left_holding_an_expired_lease():
    """The hold sweep frees the slot of each hold it returns; a lease whose hold did not name
    its endpoint (an older gateway's) is dropped here, and the in-flight number corrected."""
    redis = sync_client()
    endpoint = factories.endpoint(base_url=BASE_URL)
    _live(redis, endpoint.pk)
    redis.hset(live_key(endpoint.pk), "n", 2)
    redis.zadd(slots_key(endpoint.pk), {"dead": time.time() - 1, "alive": time.time() + 300})

    assert live_state_prune() == 0

    assert redis.zrange(slots_key(endpoint.pk), 0, -1) == [b"alive"]
    assert redis.hget(live_key(endpoint.pk), "n") == b"1"
