"""The gateway's HTTP/1.1 client against real TCP servers that answer scripted bytes."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from routing.gateway.h1 import H1Pool, UpstreamConnectError, UpstreamProtocolError
from routing.gateway.upstream import GuardedResolver

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def answering(*writes: bytes, pause: float = 0.0) -> Handler:
    """A handler answering every request with ``writes``, ``pause`` seconds apart."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            for index, data in enumerate(writes):
                if index and pause:
                    await asyncio.sleep(pause)
                writer.write(data)
                await writer.drain()

    return handler


class Server:
    """A loopback TCP server; counts connections and keeps every request it read."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/v1/chat/completions"


def pool() -> H1Pool:
    return H1Pool(connect_timeout=2, resolver=GuardedResolver())


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_it_keeps_a_connection_alive_and_sends_a_well_formed_request():
    async def scenario() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                server.requests.append(await read_request(reader))
                writer.write(OK)
                await writer.drain()

        client = pool()
        async with Server(handler) as server:
            for _ in range(3):
                response = await client.post(server.url(), b'{"a":1}', {"X-Request-ID": "gen-1"})
                assert (response.status, await response.read(100)) == (200, b"{}")
                response.release()
            await client.close()
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in first
        assert b"Content-Length: 7\r\n" in first and first.endswith(b'\r\n\r\n{"a":1}')
        assert b"X-Request-ID: gen-1\r\n" in first

    run(scenario())


def test_a_response_released_before_it_arrived_whole_closes_its_connection():
    async def scenario() -> None:
        handler = answering(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123", b"456789", pause=0.2
        )

        client = pool()
        async with Server(handler) as server:
            response = await client.post(server.url(), b"{}", {})
            assert await response.read(4) == b"0123"
            response.release()  # six bytes still to come: this connection cannot be reused
            response = await client.post(server.url(), b"{}", {})
            assert await response.read(100) == b"0123456789"
            response.release()
            await client.close()
        assert server.connections == 2

    run(scenario())


def test_a_response_that_arrived_whole_keeps_its_connection_even_if_read_in_part():
    async def scenario() -> None:
        handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
        client = pool()
        async with Server(handler) as server:
            response = await client.post(server.url(), b"{}", {})
            assert await response.read(4) == b"0123"
            await asyncio.sleep(0.1)  # the rest is in the buffer: the answer is complete
            response.release()
            response = await client.post(server.url(), b"{}", {})
            assert await response.read(100) == b"0123456789"  # nothing of the first is left
            response.release()
            await client.close()
        assert server.connections == 1

    run(scenario())


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
SSE_EVENTS = b'data: {"a":1}\n\ndata: [DONE]\n\n'
SSE_BODY = b"%x\r\n%s\r\n" % (len(SSE_EVENTS), SSE_EVENTS)


async def _read_events(response: object) -> list[bytes]:
    lines = []
    while True:
        line = await response.readline()  # type: ignore[attr-defined]
        assert line, "the stream ended without [DONE]"
        if line.startswith(b"data: [DONE]"):
            response.end_seen = True  # type: ignore[attr-defined]
            return lines
        if line.strip():
            lines.append(line.strip())


def test_a_stream_whose_closing_chunk_comes_after_its_last_event_keeps_its_connection():
    # Servers write an SSE stream's events, then (a write later) the chunked body's closing
    # chunk: the client has read [DONE] and released the answer before that chunk arrives.
    async def scenario() -> None:
        handler = answering(SSE_HEAD + SSE_BODY, b"0\r\n\r\n", pause=0.05)

        client = pool()
        async with Server(handler) as server:
            for _ in range(3):
                response = await client.post(server.url(), b"{}", {})
                assert await _read_events(response) == [b'data: {"a":1}']
                response.release()  # the closing chunk is 50 ms away: the connection waits
                await asyncio.sleep(0.15)
            await client.close()
        assert server.connections == 1

    run(scenario())


def test_a_stream_whose_closing_chunk_never_comes_is_closed_after_the_drain_time():
    async def scenario() -> None:
        handler = answering(SSE_HEAD + SSE_BODY)  # ...and never the closing chunk

        client = H1Pool(connect_timeout=2, drain_seconds=0.1, resolver=GuardedResolver())
        async with Server(handler) as server:
            response = await client.post(server.url(), b"{}", {})
            assert await _read_events(response) == [b'data: {"a":1}']
            response.release()
            await asyncio.sleep(0.3)
            response = await client.post(server.url(), b"{}", {})
            assert await _read_events(response) == [b'data: {"a":1}']
            response.release()
            await client.close()
        assert server.connections == 2

    run(scenario())


def test_a_vendor_that_keeps_sending_after_the_end_loses_the_connection():
    async def scenario() -> None:
        more = b"data: " + b"x" * 8000 + b"\n\n"
        handler = answering(
            SSE_HEAD + SSE_BODY, b"%x\r\n%s\r\n0\r\n\r\n" % (len(more), more), pause=0.05
        )

        client = pool()
        async with Server(handler) as server:
            for _ in range(2):
                response = await client.post(server.url(), b"{}", {})
                assert await _read_events(response) == [b'data: {"a":1}']
                response.release()
                await asyncio.sleep(0.2)
            await client.close()
        # More than DRAIN_LIMIT after [DONE]: not framing, so not worth keeping.
        assert server.connections == 2

    run(scenario())


def test_a_request_on_a_kept_alive_connection_the_vendor_dropped_is_sent_once_more():
    async def scenario() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.requests.append(await read_request(reader))
            writer.write(OK)  # keep-alive advertised...
            await writer.drain()
            if server.connections == 1:
                server.requests.append(await read_request(reader))
                return  # ...but the next request is dropped without a byte of answer
            while True:
                server.requests.append(await read_request(reader))
                writer.write(OK)
                await writer.drain()

        client = pool()
        async with Server(handler) as server:
            response = await client.post(server.url(), b"{}", {})
            await response.read(10)
            response.release()
            response = await client.post(server.url(), b"{}", {})
            assert (response.status, await response.read(10)) == (200, b"{}")
            response.release()
            await client.close()
        assert len(server.requests) == 3 and server.connections == 2

    run(scenario())


def test_an_answer_cut_short_on_a_kept_alive_connection_is_an_error_never_sent_twice():
    async def scenario() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.requests.append(await read_request(reader))
            writer.write(OK)
            await writer.drain()
            server.requests.append(await read_request(reader))
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial')
            await writer.drain()

        client = pool()
        async with Server(handler) as server:
            response = await client.post(server.url(), b"{}", {})
            await response.read(10)
            response.release()
            response = await client.post(server.url(), b"{}", {})
            with pytest.raises(UpstreamProtocolError, match="closed the connection"):
                await response.read(100)
            response.release()
            await client.close()
        assert len(server.requests) == 2 and server.connections == 1

    run(scenario())


def test_it_reads_chunked_and_close_delimited_bodies_line_by_line():
    async def scenario() -> None:
        async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"data: one\n", b"\ndata: t", b"wo\n\n", b"data: [DONE]\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nline 1\nline 2")
            await writer.drain()

        client = pool()
        async with Server(chunked) as server:
            response = await client.post(server.url(), b"{}", {})
            lines = [await response.readline() for _ in range(7)]
            response.release()
        expected = [b"data: one\n", b"\n", b"data: two\n", b"\n", b"data: [DONE]\n", b"\n", b""]
        assert lines == expected
        async with Server(until_close) as server:
            response = await client.post(server.url(), b"{}", {})
            lines = [await response.readline() for _ in range(3)]
            response.release()
        assert lines == [b"line 1\n", b"line 2", b""]
        await client.close()

    run(scenario())


def test_it_skips_an_interim_answer_and_refuses_compressed_or_broken_http():
    async def scenario() -> None:
        answers = [
            b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nxx",
            b"HTTP/1.1 2x0 Nonsense\r\n\r\n",
        ]

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(answers[server.connections - 1])
            await writer.drain()
            await asyncio.sleep(0.5)

        client = pool()
        async with Server(handler) as server:
            response = await client.post(server.url(), b"{}", {})
            assert (response.status, await response.read(10)) == (200, b"{}")
            response.release()
            client = pool()  # a new connection for each answer
            with pytest.raises(UpstreamProtocolError, match="gzip"):
                await client.post(server.url(), b"{}", {})
            with pytest.raises(UpstreamProtocolError, match="invalid HTTP"):
                await client.post(server.url(), b"{}", {})
            await client.close()

    run(scenario())


def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent():
    async def scenario() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.requests.append(await read_request(reader))

        client = pool()
        async with Server(handler) as server:
            with pytest.raises(UpstreamProtocolError, match="line break"):
                await client.post(
                    server.url(), b"{}", {"Authorization": "Bearer x\r\nX-Injected: 1"}
                )
            await client.close()
        assert server.connections == 0

    run(scenario())


def test_nothing_listening_is_a_connect_error():
    async def scenario() -> None:
        async with Server(read_request) as server:
            url = server.url()
        client = pool()
        with pytest.raises(UpstreamConnectError):
            await client.post(url, b"{}", {})
        await client.close()

    run(scenario())


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


def test_https_refuses_a_certificate_nobody_vouches_for(tmp_path):
    async def scenario() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.requests.append(await read_request(reader))
            writer.write(OK)
            await writer.drain()

        client = pool()
        async with Server(handler, tls=_self_signed(tmp_path)) as server:
            with pytest.raises(UpstreamConnectError):
                await client.post(server.url("https"), b"{}", {"Authorization": "Bearer s"})
            await client.close()
        assert server.requests == []  # the secret never left

    run(scenario())
