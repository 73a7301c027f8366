"""Failed authentications per client IP: a key guesser is refused with 429 after the limit,
good keys cost no extra Redis work, X-Forwarded-For counts only from trusted proxies."""

from __future__ import annotations

import pytest

from marketplace.client_ip import client_ip
from marketplace.keys import generate_key
from marketplace.redis_client import sync_client
from tests import factories
from tests.conftest import start_asgi_server

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "who am i"}]


@pytest.fixture
def limited(settings, gateway_server, upstream):  # type: ignore[no-untyped-def]
    settings.GATEWAY_AUTH_FAILURES_PER_MINUTE = 3
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    return gateway_server, endpoint, customer


def _post(server, key: str, model: str, **headers: str):  # type: ignore[no-untyped-def]
    with server.client(key) as client:
        return client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": MESSAGES},
            headers=headers,
        )


def _counters() -> list[bytes]:
    return list(sync_client().scan_iter("sy:authfail:*"))


def test_it_refuses_an_address_after_too_many_failed_keys(limited):
    server, endpoint, customer = limited

    statuses = [_post(server, generate_key().plaintext, endpoint.full_slug) for _ in range(4)]

    assert [r.status_code for r in statuses] == [401, 401, 401, 429]
    refused = statuses[-1]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "too_many_auth_failures"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # While blocked, even a right guess is refused: the guesser cannot tell it was right.
    blocked = _post(server, customer.key, endpoint.full_slug)
    assert blocked.status_code == 429
    assert blocked.json()["error"]["code"] == "too_many_auth_failures"


def test_it_counts_revoked_and_missing_keys_too(limited):
    server, endpoint, _ = limited
    with server.client() as client:  # no Authorization header at all
        statuses = [
            client.post("/v1/chat/completions", json={"model": endpoint.full_slug}).status_code
            for _ in range(4)
        ]

    assert statuses == [401, 401, 401, 429]


def test_good_keys_do_not_touch_the_counter(limited):
    server, endpoint, customer = limited

    for _ in range(6):
        assert _post(server, customer.key, endpoint.full_slug).status_code == 200

    assert _counters() == []


def test_the_count_is_shared_by_replicas(limited):
    from marketplace.asgi import build_application

    server, endpoint, customer = limited
    other = start_asgi_server(build_application())
    try:
        for _ in range(3):
            assert _post(server, generate_key().plaintext, endpoint.full_slug).status_code == 401
        # The other replica's first failure from this address crosses the shared limit.
        assert _post(other, generate_key().plaintext, endpoint.full_slug).status_code == 429
        assert _post(other, customer.key, endpoint.full_slug).status_code == 429
    finally:
        other.server.should_exit = True
        other.thread.join(timeout=10)


def test_forwarded_for_is_ignored_from_an_untrusted_peer(limited):
    server, endpoint, _ = limited
    model = endpoint.full_slug

    statuses = [
        _post(server, generate_key().plaintext, model, **{"X-Forwarded-For": f"198.51.100.{i}"})
        for i in range(4)
    ]

    # Every request counted against the connection's address, whatever the header said.
    assert [r.status_code for r in statuses] == [401, 401, 401, 429]


def test_forwarded_for_names_the_client_behind_a_trusted_proxy(limited, settings):
    settings.TRUSTED_PROXIES = ["127.0.0.0/8"]
    server, endpoint, customer = limited
    guesser = {"X-Forwarded-For": "203.0.113.7"}
    statuses = [
        _post(server, generate_key().plaintext, endpoint.full_slug, **guesser).status_code
        for _ in range(4)
    ]
    assert statuses == [401, 401, 401, 429]

    # Another client behind the same proxy is not affected.
    neighbour = {"X-Forwarded-For": "203.0.113.8, 127.0.0.1"}
    assert _post(server, customer.key, endpoint.full_slug, **neighbour).status_code == 200
    assert [c.decode().rsplit(":", 1)[0] for c in _counters()] == ["sy:authfail:203.0.113.7"]


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        ([], "192.0.2.1", "203.0.113.9", "192.0.2.1"),
        (["10.0.0.0/8"], "192.0.2.1", "203.0.113.9", "192.0.2.1"),
        (["10.0.0.0/8"], "10.0.0.2", "203.0.113.9", "203.0.113.9"),
        # A client-written hop left of the one our proxy appended is never believed.
        (["10.0.0.0/8"], "10.0.0.2", "6.6.6.6, 203.0.113.9", "203.0.113.9"),
        (["10.0.0.0/8"], "10.0.0.2", "6.6.6.6, 203.0.113.9, 10.0.0.3", "203.0.113.9"),
        (["10.0.0.0/8"], "10.0.0.2", "not-an-ip", "10.0.0.2"),
        (["10.0.0.0/8"], "10.0.0.2", None, "10.0.0.2"),
        (["10.0.0.0/8"], None, "203.0.113.9", "unknown"),
    ],
)
def test_it_finds_the_client_ip(settings, trusted, peer, forwarded, expected):
    settings.TRUSTED_PROXIES = trusted

    assert client_ip(peer, forwarded) == expected
