"""A minimal pipelined Redis client for the gateway's two hot-path scripts.

Every request runs ``reserve`` and ``settle`` (``routing.live``): two EVALSHA calls with
about twenty arguments each. Through redis-py's asyncio client each costs a pool checkout,
an argument encoder per value, a retry wrapper and a stream writer: measured about 100 µs of
CPU per call, a fifth of the gateway's CPU per request. This client does only what those
calls need:

* ONE connection per event loop, shared by every request: commands are written as they
  come and replies matched in order (Redis answers a connection's commands in order), so
  concurrent requests pipeline on the socket instead of queueing for pooled connections.
* Commands packed into RESP with one ``join``; replies parsed by ``hiredis`` (C).
* EVALSHA. The scripts the client is told of (``preload``) are loaded on every connection,
  before any other command: after a restart, the first settle must not need a second trip
  (NOSCRIPT, SCRIPT LOAD, EVALSHA) that lands after its answer has gone out. A script
  Redis does not know all the same (a SCRIPT FLUSH) is loaded when it answers NOSCRIPT.
* Errors are redis-py's own exceptions (``ConnectionError``, ``ResponseError``), so callers
  handle a lost Redis exactly as before: a request fails closed with 503, a settlement goes
  to the spool. A lost connection fails every command in flight; the next command
  reconnects (with AUTH and SELECT from the URL).

A caller that is cancelled while waiting leaves its reply to be read and dropped, so the
order of the others is kept.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any, cast
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

Arg = str | bytes | int | float


def _encode(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):  # bool before int: redis-py refuses booleans, so do we
        raise TypeError("booleans are not Redis arguments; pass 0 or 1")
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode()
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


def pack(*args: Arg) -> bytes:
    """One command in RESP: ``*<n>`` then ``$<len>`` and the bytes of each argument.

    hiredis packs in C (2 µs for a settle's thirty arguments, 6.6 µs in Python) and gives
    the same bytes; it refuses what it does not know (booleans, int subclasses such as
    IntEnum), which the Python packer below then encodes or refuses with a clear message.
    """
    try:
        # hiredis's stub types the argument as a one-element tuple; it takes any length.
        return hiredis.pack_command(args)  # type: ignore[arg-type]
    except TypeError:
        return _pack(args)


def _pack(args: Sequence[Arg]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _encode(arg)
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.closed = False
        # Commands sent during one turn of the event loop go out in one write at its end:
        # concurrent requests share a system call (and Redis a read) instead of one each.
        self._outgoing: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.pending:  # a reply nobody asked for: the stream is out of step
                self._fail(RedisConnectionError("unexpected reply from Redis"))
                return
            future = self.pending.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, error: Exception) -> None:
        self.closed = True
        self._outgoing.clear()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def send(self, command: bytes, *, now: bool = False) -> asyncio.Future[Any]:
        """Queue ``command`` for this turn's write; ``now``: write it (and the queue) at once."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("connection to Redis is closed")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self.pending.append(future)
        if now:
            self._outgoing.append(command)
            self._flush()
            return future
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        return future

    def _flush(self) -> None:
        if not self._outgoing:
            return  # written early by a ``now`` send
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        # else: _fail has already failed every pending future, these commands' included


class RespClient:
    """The gateway's pipelined connection to Redis (one per event loop)."""

    def __init__(self, url: str, *, connect_timeout: float = 2.0) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r}")
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        path = (parsed.path or "/").lstrip("/")
        self.db = int(path) if path else 0
        self.ssl = ssl.create_default_context() if parsed.scheme == "rediss" else None
        self.connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._scripts: list[str] = []

    def preload(self, script: str) -> None:
        """Load ``script`` on every connection (from the next one on), before anything else."""
        if script not in self._scripts:
            self._scripts.append(script)

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from None
        except TimeoutError:
            raise RedisConnectionError("timed out connecting to Redis") from None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _transport, protocol = await loop.create_connection(
                _Protocol, self.host, self.port, ssl=self.ssl
            )
            setup = []
            if self.password is not None:
                auth = (self.username, self.password) if self.username else (self.password,)
                setup.append(protocol.send(pack("AUTH", *auth)))
            if self.db:
                setup.append(protocol.send(pack("SELECT", self.db)))
            setup.extend(protocol.send(pack("SCRIPT", "LOAD", s)) for s in self._scripts)
            for reply in setup:
                await reply
        self._protocol = protocol
        return protocol

    async def execute(self, *args: Arg) -> Any:
        protocol = await self._connection()
        return await protocol.send(pack(*args))

    async def evalsha(self, sha: str, script: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run a Lua script by its SHA-1, loading it once if Redis does not know it."""
        protocol = await self._connection()
        sent = protocol.send(pack("EVALSHA", sha, len(keys), *keys, *args))
        return await self._reply(sent, sha, script, keys, args)

    def evalsha_now(
        self, sha: str, script: str, keys: Sequence[Arg], args: Sequence[Arg]
    ) -> Awaitable[Any]:
        """``evalsha``, but written to the socket before this returns when connected.

        The caller can then do other work (send an answer to its client) and await the reply
        after: Redis receives the command first. Not connected, nothing is sent until the
        result is awaited (which connects first).
        """
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return self.evalsha(sha, script, keys, args)
        try:
            sent = protocol.send(pack("EVALSHA", sha, len(keys), *keys, *args), now=True)
        except RedisConnectionError:  # closing: evalsha reconnects when awaited
            return self.evalsha(sha, script, keys, args)
        return self._reply(sent, sha, script, keys, args)

    async def _reply(
        self,
        sent: asyncio.Future[Any],  # the EVALSHA below, already written
        sha: str,
        script: str,
        keys: Sequence[Arg],
        args: Sequence[Arg],
    ) -> Any:
        try:
            return await sent
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", script)
        return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._protocol is not None:
            self._protocol._fail(RedisConnectionError("client closed"))
            self._protocol = None
