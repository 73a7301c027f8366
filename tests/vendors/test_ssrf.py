"""Server-side request forgery: hostile vendor URLs are refused at registration and never
connected to at call time."""

from __future__ import annotations

import asyncio
import socket

import pytest

from routing.gateway.upstream import GuardedResolver, check_literal
from vendors.ssrf import UnsafeURLError, check_url


@pytest.fixture(autouse=True)
def _nothing_private_allowed(settings):  # type: ignore[no-untyped-def]
    settings.OUTBOUND_ALLOWED_NETWORKS = []


HOSTILE_URLS = [
    # loopback, every spelling
    "http://127.0.0.1/v1",
    "http://127.1.2.3:8080/v1",
    "http://localhost/v1",
    "http://LOCALHOST./v1",
    "http://[::1]/v1",
    "http://[0:0:0:0:0:0:0:1]/v1",
    "http://[::ffff:127.0.0.1]/v1",
    "http://[::ffff:7f00:1]/v1",
    "http://2130706433/v1",
    "http://0x7f000001/v1",
    "http://0177.0.0.1/v1",
    "http://0x7f.0.0.1/v1",
    "http://127.1/v1",
    "http://017700000001/v1",
    "http://0/v1",
    "http://0.0.0.0/v1",
    "http://[::]/v1",
    # private ranges
    "http://10.0.0.1/v1",
    "http://10.255.255.254/v1",
    "http://172.16.0.1/v1",
    "http://172.31.255.1/v1",
    "http://192.168.1.1/v1",
    "http://100.64.0.1/v1",
    "http://[fc00::1]/v1",
    "http://[fd12:3456::1]/v1",
    "http://[::ffff:10.0.0.1]/v1",
    "http://[::ffff:192.168.0.1]/v1",
    "http://[64:ff9b::a00:1]/v1",
    # link-local and cloud metadata
    "http://169.254.169.254/latest/meta-data",
    "http://169.254.170.2/v2/credentials",
    "http://[fd00:ec2::254]/latest",
    "http://[fe80::1]/v1",
    "http://[::ffff:169.254.169.254]/latest",
    "http://100.100.100.200/latest",
    "http://2852039166/latest",
    "http://0xA9FEA9FE/latest",
    "http://0251.0376.0251.0376/latest",
    # multicast, broadcast, reserved, documentation
    "http://224.0.0.1/v1",
    "http://239.255.255.250/v1",
    "http://255.255.255.255/v1",
    "http://240.0.0.1/v1",
    "http://192.0.2.1/v1",
    "http://198.18.0.1/v1",
    "http://[ff02::1]/v1",
    "http://[2001:db8::1]/v1",
    # schemes, credentials and malformed hosts
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "ftp://example.com/v1",
    "dict://127.0.0.1:11211/",
    "javascript:alert(1)",
    "http://user:pass@example.com/v1",
    "http://example.com@127.0.0.1/v1",
    "http:///v1",
    "http://exa mple.com/v1",
    "http://example.com\r\nHost: evil/v1",
    "http://[::1/v1",
    "http://example.com:99999/v1",
    "http://-bad-.example/v1",
    "//127.0.0.1/v1",
    "http://a" + "b" * 600 + ".com/v1",
    # names that resolve to forbidden addresses
    "http://localhost.localdomain/v1",
    "http://ip6-localhost/v1",
]


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_it_refuses_a_hostile_url(url):
    with pytest.raises(UnsafeURLError):
        check_url(url)


def test_the_table_is_big_enough():
    assert len(HOSTILE_URLS) >= 60


def test_it_accepts_a_public_address():
    target = check_url("https://93.184.216.34:8443/v1")
    assert target.port == 8443 and str(target.addresses[0]) == "93.184.216.34"


def test_an_allowed_network_opens_only_that_network(settings):
    settings.OUTBOUND_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    assert check_url("http://127.0.0.1:9000/v1").port == 9000
    with pytest.raises(UnsafeURLError):
        check_url("http://169.254.169.254/latest")
    with pytest.raises(UnsafeURLError):
        check_url("http://10.0.0.1/v1")


def test_a_name_with_one_private_answer_is_refused(monkeypatch):
    def answers(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", answers)
    with pytest.raises(UnsafeURLError, match=r"10\.1\.2\.3"):
        check_url("http://mixed.example.com/v1")


class _ChangingResolver:
    """DNS that answers a public address first and a private one afterwards (rebinding)."""

    def __init__(self) -> None:
        self.calls = 0

    async def resolve(self, host, port=0, family=socket.AF_INET):  # type: ignore[no-untyped-def]
        self.calls += 1
        address = "93.184.216.34" if self.calls == 1 else "169.254.169.254"
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": family,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


def test_the_connect_time_resolver_refuses_a_rebound_name():
    resolver = GuardedResolver(ttl=0)
    resolver._inner = _ChangingResolver()  # the system resolver, replaced by a rebinding one

    async def scenario() -> None:
        first = await resolver.resolve("rebind.example.com", 80)
        assert first[0]["host"] == "93.184.216.34"
        with pytest.raises(UnsafeURLError):
            await resolver.resolve("rebind.example.com", 80)

    asyncio.run(scenario())


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/v1/chat", "http://[::ffff:169.254.169.254]/x"])
def test_the_gateway_refuses_forbidden_literals_at_call_time(url):
    with pytest.raises(UnsafeURLError):
        check_literal(url)


@pytest.mark.django_db(transaction=True)
def test_a_vendor_url_that_became_forbidden_is_never_called(gateway_server, upstream, settings):
    """Registered while loopback was allowed; the operator then withdraws it: the gateway
    refuses to connect, at call time, and the upstream sees nothing."""
    from tests import factories

    settings.OUTBOUND_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    settings.OUTBOUND_ALLOWED_NETWORKS = []
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": endpoint.full_slug, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 502
    assert "outbound guard" in response.json()["error"]["message"]
    assert upstream.stats()["total"] == 0
