"""Calling vendors: one shared aiohttp session per event loop, guarded against SSRF.

Every connection to a vendor goes through ``GuardedResolver``: the host name is resolved
once, every address is checked by ``vendors.ssrf`` and only checked addresses are handed
to the connector, so the address that was vetted is the address connected to (no DNS
rebinding between check and connect). IP-literal hosts bypass resolvers in aiohttp and are
checked in ``check_literal``. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from functools import lru_cache
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from django.conf import settings

from vendors.ssrf import UnsafeURLError, address_is_allowed, parse_url


class GuardedResolver(AbstractResolver):
    """A caching resolver that drops every address the SSRF guard refuses."""

    def __init__(self, ttl: float = 30.0) -> None:
        self._inner: AbstractResolver | None = None  # made on first use, inside the loop
        self._ttl = ttl
        self._cache: dict[tuple[str, int, int], tuple[float, list[ResolveResult]]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        key = (host, port, int(family))
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not address_is_allowed(ipaddress.ip_address(result["host"])):
                raise UnsafeURLError(f"{host} resolves to {result['host']}, which is not allowed")
        self._cache[key] = (now + self._ttl, results)
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


@lru_cache(maxsize=4096)
def _literal_verdict(url: str, allowed: tuple[str, ...]) -> str | None:
    try:
        _, host, _ = parse_url(url)
    except UnsafeURLError as exc:
        return str(exc)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: the resolver checks it
    if not address_is_allowed(address):
        return f"{address} is not an allowed address"
    return None


def check_literal(url: str) -> None:
    """Refuse a URL whose host is a forbidden IP literal (cached per URL and setting)."""
    verdict = _literal_verdict(url, tuple(settings.OUTBOUND_ALLOWED_NETWORKS))
    if verdict is not None:
        raise UnsafeURLError(verdict)


class UpstreamPool:
    """The process's aiohttp sessions, one per event loop (normally exactly one)."""

    def __init__(self) -> None:
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(id(loop))
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=0,  # capacity is enforced per endpoint by the router, not here
                limit_per_host=0,
                ttl_dns_cache=30,
                resolver=GuardedResolver(),
                enable_cleanup_closed=True,
                keepalive_timeout=30,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=settings.GATEWAY_CONNECT_TIMEOUT,
                ),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
                json_serialize=None,  # type: ignore[arg-type]
            )
            self._sessions[id(loop)] = session
        return session

    async def close(self) -> None:
        for session in list(self._sessions.values()):
            await session.close()
        self._sessions.clear()


def upstream_headers(secret: str, request_id: str) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    return headers
