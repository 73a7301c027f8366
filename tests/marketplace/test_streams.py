"""Reading a stream through a consumer group in short Redis commands (marketplace.streams)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from django.test import override_settings

from marketplace import streams
from marketplace.redis_client import sync_client

GROUP = "g"


@pytest.fixture
def stream() -> Iterator[tuple[redis.Redis, str]]:
    client = sync_client()
    name = f"test:stream:{uuid.uuid4().hex}"
    streams.ensure_group(client, name, GROUP)
    yield client, name
    client.delete(name)


def _add(client: redis.Redis, name: str, n: int) -> list[bytes]:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(name, {"i": str(i)})
    return list(pipe.execute())


def _calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        command: int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
        for command in ("xreadgroup", "xautoclaim", "xack", "xdel")
    }


def _more(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {command: after[command] - before[command] for command in before}


def test_a_batch_is_read_and_dropped_a_slice_per_command(stream):
    client, name = stream
    ids = _add(client, name, 2 * streams.SLICE + 50)
    before = _calls(client)

    entries = streams.read_batch(client, name, GROUP, "c", count=1000)
    streams.drop(client, name, GROUP, [entry_id for entry_id, _ in entries])

    assert [entry_id for entry_id, _ in entries] == ids  # all of them, in order
    # Three short reads (100, 100, 50: the last one short, so the stream is drained), and
    # three acknowledge-and-delete transactions: no command held Redis for the whole batch.
    assert _more(before, _calls(client)) == {"xreadgroup": 3, "xautoclaim": 1, "xack": 3, "xdel": 3}
    assert client.xlen(name) == 0 and client.xpending(name, GROUP)["pending"] == 0


def test_a_batch_stops_at_its_count_and_the_rest_waits_for_the_next(stream):
    client, name = stream
    ids = _add(client, name, streams.SLICE + 30)

    first = streams.read_batch(client, name, GROUP, "c", count=streams.SLICE + 10)
    second = streams.read_batch(client, name, GROUP, "c", count=1000)

    assert [e for e, _ in first] == ids[: streams.SLICE + 10]
    assert [e for e, _ in second] == ids[streams.SLICE + 10 :]


def test_a_dead_consumers_entries_are_claimed_in_slices_before_new_ones(stream):
    client, name = stream
    left = _add(client, name, streams.SLICE + 20)
    streams.read_batch(client, name, GROUP, "dead", count=1000)  # read, never acknowledged
    fresh = _add(client, name, 5)

    with override_settings(USAGE_CLAIM_IDLE_MS=0):
        capped = streams.read_batch(client, name, GROUP, "alive", count=streams.SLICE + 10)
        rest = streams.read_batch(client, name, GROUP, "alive", count=1000)

    assert [e for e, _ in capped] == left[: streams.SLICE + 10]
    # The next batch claims again from the start: the alive consumer's own unacknowledged
    # entries too (idle 0 here), then the dead one's rest, then the new entries.
    assert [e for e, _ in rest] == left + fresh
    assert client.xpending(name, GROUP)["consumers"] == [
        {"name": b"alive", "pending": len(left) + len(fresh)}
    ]
