"""Calling vendors: one connection pool per event loop (``routing.gateway.h1``), guarded
against SSRF.

Every connection to a vendor goes through ``GuardedResolver``: the host name is resolved
once, every address is checked by ``vendors.ssrf`` and only checked addresses are handed
to the connection, so the address that was vetted is the address connected to (no DNS
rebinding between check and connect). IP-literal hosts are not resolved; they are checked
in ``check_literal``. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from functools import lru_cache

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from django.conf import settings

from routing.gateway.conf import hot
from routing.gateway.h1 import H1Pool, Response
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
    verdict = _literal_verdict(url, tuple(hot.OUTBOUND_ALLOWED_NETWORKS))
    if verdict is not None:
        raise UnsafeURLError(verdict)


class UpstreamPool:
    """The process's vendor connections: one ``H1Pool`` per event loop (normally one)."""

    def __init__(self) -> None:
        self._pools: dict[int, H1Pool] = {}

    def pool(self) -> H1Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(id(loop))
        if pool is None:
            pool = H1Pool(
                connect_timeout=settings.GATEWAY_CONNECT_TIMEOUT,
                keepalive=30.0,
                resolver=GuardedResolver(),
            )
            self._pools[id(loop)] = pool
        return pool

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST to a vendor; the response once its headers arrived (see ``routing.gateway.h1``)."""
        return await self.pool().post(url, body, headers)

    async def close(self) -> None:
        for pool in list(self._pools.values()):
            await pool.close()
        self._pools.clear()


def upstream_headers(secret: str, request_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    return headers
