"""The client's IP address, as the per-IP limits see it (gateway and Django alike).

The peer of the TCP connection is the client, unless that peer is one of the operator's
``TRUSTED_PROXIES`` (a load balancer). Then ``X-Forwarded-For`` is read from the right:
each proxy appends the address it received the request from, so the rightmost address
that is not a trusted proxy is the first one no proxy of ours vouches for. Addresses to
its left were written by the client and may be forged, so they are never used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(
    values: Sequence[str], *, setting: str = "TRUSTED_PROXIES"
) -> tuple[Network, ...]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ImproperlyConfigured(
                f"{setting}: {value!r} is not an IP address or network"
            ) from None
    return tuple(networks)


@lru_cache(maxsize=8)
def _trusted(values: tuple[str, ...]) -> tuple[Network, ...]:
    return parse_networks(values)


def _is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(peer: str | None, forwarded_for: str | None) -> str:
    """The client's address from the connection's ``peer`` and its ``X-Forwarded-For``."""
    networks = _trusted(tuple(settings.TRUSTED_PROXIES))
    if not peer:
        return "unknown"
    if not forwarded_for or not _is_trusted(peer, networks):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, networks):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                # Garbage where an address should be: the proxy that wrote it vouches for
                # nothing, so the last trusted hop is the one to hold accountable.
                return peer
    return hops[0] if hops else peer
