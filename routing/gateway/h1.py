"""A lean HTTP/1.1 client for vendor calls: keep-alive connections, httptools' parser.

The gateway makes one POST per attempt to an OpenAI-compatible vendor and reads either a
JSON body or an SSE stream. aiohttp's client did this for 3-4 times the CPU per request (its
request and response objects, timers, multidicts, a task switch per read); this client is
one ``asyncio.Protocol`` per connection feeding ``httptools.HttpResponseParser`` (the C
parser uvicorn uses), a body buffer with one waiter, and an idle list per origin.

What it does and does not do:

* Connections are kept alive per (scheme, host, port) and reused newest first; one idle
  longer than ``keepalive`` seconds or closed by the peer is closed, never reused. A
  response released once it has arrived whole gives its connection back, read to the end or
  not; one released before that is closed, unless the caller saw the body's logical end
  (``end_seen``: an SSE stream's ``[DONE]``): then the connection waits in the background,
  up to ``drain_seconds`` and ``DRAIN_LIMIT`` bytes, for the answer's last bytes (a chunked
  body's closing chunk, which servers write after the last event) and is reused after them.
  Without that, no streamed answer's connection was ever reused: every stream paid a new
  connection (and, to an HTTPS vendor, a TLS handshake).
* Host names are resolved through the pool's resolver, in the gateway
  ``routing.gateway.upstream.GuardedResolver`` (every address checked by the SSRF guard;
  the connection goes to a checked address). IP literals are checked by the caller
  (``check_literal``). Redirects are not followed: a 3xx is returned like any status.
* HTTPS verifies the certificate and the host name (the default SSL context).
* Requests always carry ``Content-Length`` and ``Accept-Encoding: identity``; a response
  with any other ``Content-Encoding`` is refused (``UpstreamProtocolError``).
* A request sent on a reused connection that the peer had already closed (no byte of an
  answer came back) is sent once more on a new connection, as browsers and urllib3 do.
* Timeouts are the caller's: wrap calls in ``asyncio.timeout``; a cancelled read leaves the
  connection unusable and ``release()`` closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import httptools

# Pause reading a connection once this much of its body waits unread (a slow client of a
# stream); resume below half of it.
HIGH_WATER = 256 * 1024
# What a connection waiting for the rest of an answer whose end the caller saw may still
# receive (discarded) before it is closed instead: a closing chunk and blank lines, not
# more events.
DRAIN_LIMIT = 4096


class UpstreamError(Exception):
    """The vendor could not be reached or its answer broke off (retry elsewhere)."""


class UpstreamConnectError(UpstreamError):
    """No connection to the vendor."""


class UpstreamProtocolError(UpstreamError):
    """The vendor's bytes are not valid HTTP/1.1 for us, or the answer was cut short."""


@lru_cache(maxsize=4096)
def _target(url: str) -> tuple[tuple[str, str, int], str, str]:
    """((scheme, host, port), request target, Host header) of a vendor URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamConnectError(f"unsupported URL {url!r}")
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    authority = shown if port == default else f"{shown}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (scheme, host, port), target, authority


def _header_block(headers: dict[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise UpstreamProtocolError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


class Response:
    """One response: status and headers at once, the body read as it arrives."""

    __slots__ = (
        "_buffer",
        "_conn",
        "_done",
        "_eof",
        "_error",
        "_waiter",
        "end_seen",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        # Set by the caller once it read the body's logical end (an SSE stream's [DONE]):
        # what may follow is framing, so release() lets the connection wait for it.
        self.end_seen = False
        self._conn: _Connection | None = conn
        self._buffer = bytearray()
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._done = False

    # --- fed by the connection --------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._eof:
            self._error = exc
        self._wake()

    # --- read by the caller -----------------------------------------------------------------
    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        if self._conn is not None:
            self._conn.resume()  # the reader wants more than the buffer holds
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _took(self) -> None:
        if self._conn is not None and len(self._buffer) < HIGH_WATER // 2:
            self._conn.resume()

    async def read(self, limit: int) -> bytes:
        """The body up to ``limit`` bytes (the whole body if it is shorter)."""
        while not self._eof and len(self._buffer) < limit:
            await self._wait()
        data = bytes(self._buffer[:limit])
        del self._buffer[:limit]
        self._took()
        return data

    async def readline(self) -> bytes:
        """The next line with its ``\\n``; the rest at the end of the body; b"" after it."""
        start = 0
        while True:
            index = self._buffer.find(b"\n", start)
            if index >= 0:
                line = bytes(self._buffer[: index + 1])
                del self._buffer[: index + 1]
                self._took()
                return line
            if self._eof:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            start = len(self._buffer)
            await self._wait()

    def release(self) -> None:
        """Give the connection back: kept alive if the answer arrived whole (what the caller
        left unread is dropped), or once it has if the caller saw its end; else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._buffer.clear()
        if self._error is not None:
            conn.done(reusable=False)
        elif self._eof:
            conn.done(reusable=True)
        elif self.end_seen:
            conn.drain()
        else:
            conn.done(reusable=False)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: H1Pool, origin: tuple[str, str, int]) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.headers_ready: asyncio.Future[None] | None = None
        self.keep_alive = False
        self.until_close = False
        self.closed = False
        self.received = False
        self.idle_since = 0.0
        self.paused = False
        self.draining: asyncio.TimerHandle | None = None  # waiting for an answer's last bytes

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(UpstreamProtocolError(f"invalid HTTP from the vendor ({exc})"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.draining is not None:
            self.draining.cancel()
            self.draining = None
            self.pool._draining.discard(self)
            self.response = None
        if self.response is not None or self.headers_ready is not None:
            response = self.response
            if response is not None and not response._eof and self.until_close:
                response._finish()  # a body without a length ends when the connection does
            self._broken(UpstreamProtocolError("the vendor closed the connection"))

    # --- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.response is None:
            self.response = Response(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        headers = response.headers
        self.until_close = (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
            and response.status not in (204, 304)
        )
        if 100 <= response.status < 200:  # an interim answer: the real one follows
            self.response = None
            return
        ready = self.headers_ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is None:
            return
        if self.draining is not None:
            response._buffer += body  # dropped; counted against DRAIN_LIMIT
            if len(response._buffer) > DRAIN_LIMIT:
                self._drained(reusable=False)
            return
        response._feed(body)

    def on_message_complete(self) -> None:
        if self.draining is not None:
            self._drained(reusable=True)
        elif self.response is not None:
            self.response._finish()

    # --- used by the pool and the response --------------------------------------------------
    def _broken(self, exc: UpstreamError) -> None:
        self.keep_alive = False
        ready = self.headers_ready
        if ready is not None and not ready.done():
            ready.set_exception(exc)
        if self.response is not None:
            self.response._fail(exc)
        if self.transport is not None and not self.closed:
            self.transport.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def drain(self) -> None:
        """Wait (no task: the parser's callbacks and one timer) for the last bytes of an
        answer whose caller has finished with it, then go back to the pool; closed if they
        do not come within ``drain_seconds`` or exceed ``DRAIN_LIMIT``."""
        if self.closed or not self.keep_alive or self.transport is None:
            self.done(reusable=False)
            return
        self.resume()
        self.pool._draining.add(self)
        self.draining = asyncio.get_running_loop().call_later(
            self.pool.drain_seconds, self._drained, False
        )

    def _drained(self, reusable: bool) -> None:
        timer, self.draining = self.draining, None
        if timer is not None:
            timer.cancel()
        self.pool._draining.discard(self)
        self.done(reusable=reusable)

    def done(self, *, reusable: bool) -> None:
        self.response = None
        self.headers_ready = None
        if reusable and self.keep_alive and not self.closed and not self.paused:
            self.pool._idle(self)
        elif self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    async def send(self, head: bytes, body: bytes) -> Response:
        assert self.transport is not None
        self.received = False
        self.response = None
        self.headers_ready = asyncio.get_running_loop().create_future()
        self.transport.write(head + body)
        try:
            await self.headers_ready
        except BaseException:
            self.done(reusable=False)
            raise
        self.headers_ready = None
        assert self.response is not None
        return self.response


class H1Pool:
    """Keep-alive connections per origin, for one event loop."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        keepalive: float = 30.0,
        max_idle_per_origin: int = 256,
        drain_seconds: float = 1.0,
        resolver: Any,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.drain_seconds = drain_seconds
        self._draining: set[_Connection] = set()
        self.max_idle = max_idle_per_origin
        self.resolver = resolver  # async resolve(host, port, family) -> [{"host": ...}]
        self._idle_by_origin: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    def _idle(self, conn: _Connection) -> None:
        idle = self._idle_by_origin.setdefault(conn.origin, deque())
        if len(idle) >= self.max_idle:
            conn.closed = True
            assert conn.transport is not None
            conn.transport.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle_by_origin.get(conn.origin)
        if idle:
            with contextlib.suppress(ValueError):
                idle.remove(conn)

    def _take_idle(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle_by_origin.get(origin)
        oldest = time.monotonic() - self.keepalive
        while idle:
            conn = idle.pop()  # the newest: the least likely to have been closed by the peer
            if not conn.closed and conn.idle_since >= oldest:
                return conn
            if not conn.closed and conn.transport is not None:
                conn.closed = True
                conn.transport.close()
        return None

    async def _connect(self, origin: tuple[str, str, int]) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        try:
            literal = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except OSError:
            literal = None
        if literal is not None:
            addresses = [host]  # checked by the caller (check_literal)
        else:
            results = await self.resolver.resolve(host, port, socket.AF_UNSPEC)
            addresses = [str(result["host"]) for result in results]
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        last: Exception | None = None
        for address in addresses:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(self, origin),
                        address,
                        port,
                        ssl=context,
                        server_hostname=host if context is not None else None,
                    )
                return protocol
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                last = exc
        raise UpstreamConnectError(f"cannot connect to {host}:{port} ({type(last).__name__})")

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST ``body`` to ``url``; returns once the status line and headers arrived."""
        origin, target, authority = _target(url)
        head = (
            (
                f"POST {target} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {len(body)}\r\n"
                "Accept-Encoding: identity\r\n"
            ).encode("latin-1")
            + _header_block(headers)
            + b"\r\n"
        )
        conn = self._take_idle(origin)
        if conn is not None:
            try:
                return self._checked(await conn.send(head, body))
            except UpstreamError:
                if conn.received:
                    raise
                # The peer had closed this idle connection: once more on a new one.
        conn = await self._connect(origin)
        return self._checked(await conn.send(head, body))

    @staticmethod
    def _checked(response: Response) -> Response:
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", ""):
            response.release()
            raise UpstreamProtocolError(f"the vendor answered with {encoding} content encoding")
        return response

    async def close(self) -> None:
        for conn in list(self._draining):
            conn._drained(reusable=False)
        for idle in self._idle_by_origin.values():
            while idle:
                conn = idle.pop()
                if conn.transport is not None and not conn.closed:
                    conn.closed = True
                    conn.transport.close()
        self._idle_by_origin.clear()
        await self.resolver.close()
