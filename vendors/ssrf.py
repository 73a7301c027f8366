"""One guard for every outbound call to a vendor-supplied URL (server-side request forgery).

``check_url`` parses the URL strictly, resolves the host name and refuses any address that
is loopback, private, link-local, multicast, reserved, unspecified, a cloud metadata
service or an IPv4-mapped IPv6 form of one of those, unless it lies in a network that the
operator listed in ``OUTBOUND_ALLOWED_NETWORKS`` (self-hosted vendors, the demo, tests).
Numeric tricks (``2130706433``, ``0177.0.0.1``, ``0x7f.1``) are refused outright: a host is
either a proper dotted quad, a bracketed IPv6 literal or a DNS name.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("169.254.170.2"),
    ipaddress.ip_address("100.100.100.200"),
    ipaddress.ip_address("fd00:ec2::254"),
}
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$"
)


class UnsafeURLError(ValueError):
    """The URL may not be called: the message says why, for the vendor to read."""


@dataclass(frozen=True)
class SafeTarget:
    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


@lru_cache(maxsize=8)
def _allowed_networks(raw: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in raw)


def allowed_networks() -> tuple[IPNetwork, ...]:
    return _allowed_networks(tuple(settings.OUTBOUND_ALLOWED_NETWORKS))


def _unwrap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
    return address


def address_is_allowed(address: IPAddress) -> bool:
    inner = _unwrap(address)
    if any(inner in net or address in net for net in allowed_networks()):
        return True
    if inner in METADATA_ADDRESSES or address in METADATA_ADDRESSES:
        return False
    return bool(inner.is_global) and not (
        inner.is_multicast or inner.is_reserved or inner.is_unspecified
    )


def _parse_host(host: str) -> IPAddress | None:
    """An IP literal, None for a DNS name, or UnsafeURLError for a numeric trick."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.x]+", host) or host.replace(".", "").isdigit():
        raise UnsafeURLError("numeric host names other than dotted quads are not accepted")
    if not _HOSTNAME.match(host):
        raise UnsafeURLError("the host name is not valid")
    return None


def parse_url(url: str) -> tuple[str, str, int]:
    if not isinstance(url, str) or len(url) > 500:
        raise UnsafeURLError("the URL must be a string of at most 500 characters")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise UnsafeURLError("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UnsafeURLError(f"the URL cannot be parsed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeURLError("only http and https URLs are accepted")
    if parts.username or parts.password:
        raise UnsafeURLError("credentials in the URL are not accepted; use the endpoint secret")
    host = (parts.hostname or "").lower()
    if not host:
        raise UnsafeURLError("the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeURLError("the port is not valid") from None
    return parts.scheme, host, port


def resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURLError(f"the host name does not resolve: {host}") from exc
    return tuple(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def check_url(url: str) -> SafeTarget:
    """Check that ``url`` may be called now; returns the vetted addresses to connect to.

    Every resolved address must be allowed (a name that resolves to one public and one
    private address is refused), and the caller must connect to these addresses, not
    resolve the name again (DNS rebinding).
    """
    scheme, host, port = parse_url(url)
    literal = _parse_host(host)
    addresses = (literal,) if literal is not None else resolve(host, port)
    if not addresses:
        raise UnsafeURLError(f"the host name does not resolve: {host}")
    for address in addresses:
        if not address_is_allowed(address):
            raise UnsafeURLError(
                f"{host} resolves to {address}, a private, loopback, link-local or reserved "
                "address; the operator has not allowed it"
            )
    return SafeTarget(scheme=scheme, host=host, port=port, addresses=addresses)
