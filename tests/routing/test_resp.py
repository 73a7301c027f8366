"""The gateway's pipelined Redis client, against the real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from marketplace.redis_client import sync_client
from routing.resp import RespClient, pack

SCRIPT = "return {redis.call('INCRBY', KEYS[1], ARGV[1]), ARGV[2]}"


def _sha(script: str) -> str:
    import hashlib

    return hashlib.sha1(script.encode()).hexdigest()


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def _applied() -> bytes | None:
    """``sy:test:now`` once a command has set it (up to 2 s). A blocking read: the calling
    event loop cannot turn (nor flush anything) meanwhile."""
    for _ in range(200):
        value = sync_client().get("sy:test:now")
        if value is not None:
            return value
        time.sleep(0.01)
    return None


def test_it_packs_commands_as_resp():
    assert (
        pack("SET", "k", 10, b"\x00v")
        == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n10\r\n$2\r\n\x00v\r\n"
    )
    with pytest.raises(TypeError):
        pack("SET", "k", True)


def test_it_loads_a_script_redis_does_not_know_and_runs_it():
    sync_client().script_flush()

    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        try:
            first = await client.evalsha(_sha(SCRIPT), SCRIPT, ["sy:test:n"], [5, "a"])
            second = await client.evalsha(_sha(SCRIPT), SCRIPT, ["sy:test:n"], [2, "b"])
            return first, second
        finally:
            await client.aclose()

    assert _run(main()) == ([5, b"a"], [7, b"b"])


def test_concurrent_commands_on_one_connection_get_their_own_replies():
    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute("DEL", "sy:test:c")
            replies = await asyncio.gather(
                *(client.execute("RPUSH", "sy:test:c", i) for i in range(200))
            )
            stored = await client.execute("LRANGE", "sy:test:c", 0, -1)
            return replies, stored
        finally:
            await client.aclose()

    replies, stored = _run(main())
    # Each caller got the list length right after its own push: replies are matched in order.
    assert sorted(replies) == list(range(1, 201))
    assert [int(v) for v in stored] == [replies.index(n + 1) for n in range(200)]


def test_an_error_reply_raises_for_its_caller_only():
    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute("SET", "sy:test:s", "text")
            bad = client.execute("INCR", "sy:test:s")
            good = client.execute("GET", "sy:test:s")
            results = await asyncio.gather(bad, good, return_exceptions=True)
            return results
        finally:
            await client.aclose()

    bad, good = _run(main())
    assert isinstance(bad, ResponseError) and good == b"text"


def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others():
    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute("SET", "sy:test:a", "A")
            await client.execute("SET", "sy:test:b", "B")
            slow = asyncio.ensure_future(client.execute("GET", "sy:test:a"))
            await asyncio.sleep(0)  # written, not yet answered
            slow.cancel()
            return await client.execute("GET", "sy:test:b")
        finally:
            await client.aclose()

    assert _run(main()) == b"B"


def test_a_killed_connection_fails_its_commands_and_the_next_one_reconnects():
    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute("CLIENT", "SETNAME", "resp-under-test")
            hang = asyncio.ensure_future(client.execute("BLPOP", "sy:test:never", 5))
            await asyncio.sleep(0.05)
            sync_client().client_kill_filter(_type="normal", skipme=True)
            with pytest.raises(RedisConnectionError):
                await hang
            return await client.execute("PING")
        finally:
            await client.aclose()

    assert _run(main()) == b"PONG"


def test_it_selects_the_database_of_its_url():
    base = settings.REDIS_URL.rsplit("/", 1)[0]

    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(f"{base}/7")
        try:
            await client.execute("SET", "sy:test:db", "seven")
        finally:
            await client.aclose()

    _run(main())
    import redis

    assert redis.Redis.from_url(f"{base}/7").get("sy:test:db") == b"seven"
    assert sync_client().get("sy:test:db") is None


def test_it_says_clearly_when_redis_cannot_be_reached():
    async def main():  # type: ignore[no-untyped-def]
        client = RespClient("redis://127.0.0.1:1/0", connect_timeout=1)
        await client.execute("PING")

    with pytest.raises(RedisConnectionError, match="cannot connect"):
        _run(main())


def test_it_runs_on_uvloop_the_servers_event_loop():
    import uvloop

    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        try:
            return await client.evalsha(_sha(SCRIPT), SCRIPT, ["sy:test:u"], [3, "u"])
        finally:
            await client.aclose()

    assert uvloop.run(main()) == [3, b"u"]


def test_the_c_packer_and_the_python_packer_agree():
    import enum

    from routing.resp import _pack

    class Flag(enum.IntEnum):
        ON = 1

    args = ("EVALSHA", "f" * 40, 2, "k", b"\x00\xff", 1795822231.1234567, 1e-07, -5, 2**63, "é")
    assert pack(*args) == _pack(args)
    # hiredis refuses int subclasses; the Python packer sends their number
    assert pack("SET", "k", Flag.ON) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n"


def test_commands_of_one_event_loop_turn_leave_in_one_write():
    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute("PING")  # connected
            protocol = client._protocol
            assert protocol is not None and protocol.transport is not None
            transport = protocol.transport
            writes: list[bytes] = []
            real_write = transport.write

            def counting_write(data: bytes) -> None:  # a spy on the event loop's transport
                writes.append(data)
                real_write(data)

            transport.write = counting_write  # type: ignore[method-assign]
            replies = await asyncio.gather(
                *(client.execute("INCR", "sy:test:w") for _ in range(50))
            )
            later = await client.execute("GET", "sy:test:w")
            return replies, later, writes
        finally:
            await client.aclose()

    sync_client().delete("sy:test:w")
    replies, later, writes = _run(main())
    assert replies == list(range(1, 51))
    assert later == b"50"
    # the fifty INCRs in one write, the GET (a later turn) in another
    assert len(writes) == 2
    assert writes[0].count(b"INCR") == 50


def test_evalsha_now_writes_before_it_returns_and_the_await_reads_the_reply():
    sync_client().delete("sy:test:now")

    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        try:
            await client.execute("PING")  # connected
            sync_client().script_load(SCRIPT)
            pending = client.evalsha_now(_sha(SCRIPT), SCRIPT, ["sy:test:now"], [3, "x"])
            seen = _applied()  # before the loop turns: only a command already written counts
            return seen, await pending
        finally:
            await client.aclose()

    assert _run(main()) == (b"3", [3, b"x"])


def test_evalsha_now_loads_an_unknown_script_when_awaited():
    sync_client().script_flush()
    sync_client().delete("sy:test:now")

    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        try:
            before = client.evalsha_now(_sha(SCRIPT), SCRIPT, ["sy:test:now"], [1, "a"])
            first = await before  # not connected yet: connects when awaited
            await client.execute("SCRIPT", "FLUSH")
            second = await client.evalsha_now(_sha(SCRIPT), SCRIPT, ["sy:test:now"], [2, "b"])
            return first, second
        finally:
            await client.aclose()

    assert _run(main()) == ([1, b"a"], [3, b"b"])


def test_a_preloaded_script_is_loaded_on_each_connection_so_evalsha_now_needs_one_trip():
    # After a Redis restart its script cache is empty. Without the preload the first
    # evalsha_now meets NOSCRIPT and is applied only after a second trip, once awaited:
    # a settlement would reach Redis after the answer had reached the client.
    sync_client().delete("sy:test:now")

    async def main():  # type: ignore[no-untyped-def]
        client = RespClient(settings.REDIS_URL)
        client.preload(SCRIPT)
        try:
            await client.execute("CLIENT", "SETNAME", "resp-under-test")
            sync_client().script_flush()  # Redis restarted...
            sync_client().client_kill_filter(_type="normal", skipme=True)  # ...and dropped us
            with pytest.raises(RedisConnectionError):
                await client.execute("PING")
            await client.execute("PING")  # the gateway's next command reconnects
            pending = client.evalsha_now(_sha(SCRIPT), SCRIPT, ["sy:test:now"], [4, "y"])
            seen = _applied()  # before the loop turns
            return seen, await pending
        finally:
            await client.aclose()

    assert _run(main()) == (b"4", [4, b"y"])
