"""allauth's limits on the login page, over real HTTP (the whole ASGI application): failed
logins are refused per e-mail address and per client IP, the IP found as the gateway finds
it (X-Forwarded-For only from TRUSTED_PROXIES)."""

from __future__ import annotations

import re

import pytest

from tests import factories

pytestmark = pytest.mark.django_db(transaction=True)

REFUSED = "Too many failed login attempts"


def _login(client, email: str, password: str, **headers: str) -> str:  # type: ignore[no-untyped-def]
    """Post the login form; the page that comes back (the form again, or the refusal)."""
    page = client.get("/accounts/login/", headers=headers)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token, page.text[:500]
    response = client.post(
        "/accounts/login/",
        data={"login": email, "password": password, "csrfmiddlewaretoken": token.group(1)},
        headers={"Referer": f"{client.base_url}/accounts/login/", **headers},
    )
    assert response.status_code in (200, 302, 429), response.status_code
    return "logged in" if response.status_code == 302 else response.text


def test_it_refuses_a_sixth_try_for_one_address_even_with_the_right_password(gateway_server):
    user = factories.user(password="the-right-password")
    with gateway_server.client() as client:
        pages = [_login(client, user.email, "wrong-password") for _ in range(5)]
        sixth = _login(client, user.email, "the-right-password")

    assert not any(REFUSED in page for page in pages)
    assert REFUSED in sixth


def test_the_right_password_is_not_refused_before_the_limit(gateway_server):
    user = factories.user(password="the-right-password")
    with gateway_server.client() as client:
        _login(client, user.email, "wrong-password")
        assert _login(client, user.email, "the-right-password") == "logged in"


def test_it_refuses_an_address_guessing_many_accounts(gateway_server):
    with gateway_server.client() as client:
        pages = [_login(client, f"nobody{i}@example.test", "guess") for i in range(11)]

    assert not any(REFUSED in page for page in pages[:10])
    assert REFUSED in pages[10]


def test_it_counts_the_client_behind_a_trusted_proxy(gateway_server, settings):
    settings.TRUSTED_PROXIES = ["127.0.0.0/8"]
    guesser = {"X-Forwarded-For": "203.0.113.7"}
    with gateway_server.client() as client:
        for i in range(10):
            _login(client, f"nobody{i}@example.test", "guess", **guesser)
        refused = _login(client, "nobody@example.test", "guess", **guesser)
        neighbour = _login(
            client, "other@example.test", "guess", **{"X-Forwarded-For": "203.0.113.8"}
        )

    assert REFUSED in refused
    assert REFUSED not in neighbour
