"""Live dashboards over Channels: who may join which group, and what one ingested batch
pushes (real Redis channel layer, real PostgreSQL, the real ASGI application)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

import orjson
import pytest
from django.test import Client
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from billing.credit import USAGE_STREAM
from billing.usage import usage_ingest_batch
from marketplace.models import Membership
from marketplace.redis_client import sync_client
from marketplace.services import organization_create
from tests import factories
from vendors.services import endpoint_approve, endpoint_create, vendor_approve, vendor_create

pytestmark = pytest.mark.django_db(transaction=True)

BASE_URL = "http://127.0.0.1:9/v1"


def cookie_of(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def open_socket(server, path: str, cookie: str | None, origin: str | None = None):  # type: ignore[no-untyped-def]
    """A WebSocket to the running application, as a page of ``origin`` (the site itself)."""
    url = server.url.replace("http://", "ws://") + path
    headers = {"Cookie": cookie} if cookie else {}
    return connect(url, origin=origin or server.url, additional_headers=headers, open_timeout=10)


def refused(server, path: str, cookie: str | None, origin: str | None = None) -> bool:  # type: ignore[no-untyped-def]
    try:
        with open_socket(server, path, cookie, origin):
            return False
    except InvalidStatus as exc:
        return exc.response.status_code == 403


def receive(socket) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return json.loads(socket.recv(timeout=10))


def receives_nothing(socket) -> bool:  # type: ignore[no-untyped-def]
    try:
        socket.recv(timeout=0.5)
    except TimeoutError:
        return True
    return False


@pytest.fixture
def world():  # type: ignore[no-untyped-def]
    """Two organisations with a member each, a vendor with two endpoints, staff, a stranger."""
    alice, bob, carol, vera = (
        factories.user(f"{n}@example.test") for n in ("alice", "bob", "carol", "vera")
    )
    acme = organization_create(name="Acme", slug="acme", owner=alice)
    globex = organization_create(name="Globex", slug="globex", owner=bob)
    idle = organization_create(name="Idle", slug="idle", owner=carol)
    vendor = vendor_approve(vendor=vendor_create(name="Tiny Models", slug="tiny", owner=vera))
    endpoints = [
        endpoint_approve(
            endpoint=endpoint_create(
                vendor=vendor,
                slug=f"model-{n}",
                base_url=BASE_URL,
                upstream_model="m",
                price_input=1,
                price_output=1,
            )
        )
        for n in (1, 2)
    ]
    staff = factories.user("ops@example.test")
    staff.is_staff = True
    staff.save()
    return {
        "acme": acme,
        "globex": globex,
        "idle": idle,
        "vendor": vendor,
        "endpoints": endpoints,
        "cookies": {
            name: cookie_of(u)
            for name, u in [
                ("alice", alice),
                ("bob", bob),
                ("carol", carol),
                ("vera", vera),
                ("staff", staff),
            ]
        },
        "users": {"alice": alice, "bob": bob},
    }


def usage_event(org, endpoint, *, pt: int, ct: int, cost: int, outcome: str = "success") -> dict:  # type: ignore[no-untyped-def]
    return {
        "rid": f"req-{uuid.uuid4().hex}",
        "org": org.pk,
        "key": None,
        "ep": endpoint.pk,
        "vendor": endpoint.vendor_id,
        "model": "tag:chat",
        "pt": pt,
        "ct": ct,
        "pin": 1000,
        "pout": 2000,
        "cost": cost,
        "ms": 12,
        "att": 1,
        "out": outcome,
        "at": time.time_ns() // 1_000_000,
    }


def append(events: list[dict]) -> None:  # type: ignore[type-arg]
    pipe = sync_client().pipeline(transaction=False)
    for event in events:
        pipe.xadd(USAGE_STREAM, {"e": orjson.dumps(event)})
    pipe.execute()


def test_it_refuses_strangers_anonymous_users_and_other_sites(gateway_server, world):
    cookies = world["cookies"]
    for path, cookie in (
        ("/ws/console/acme/usage/", cookies["bob"]),  # another organisation's member
        ("/ws/console/acme/usage/", None),  # not signed in
        ("/ws/console/no-such-org/usage/", cookies["alice"]),
        ("/ws/vendor/tiny/", cookies["alice"]),  # not a member of the vendor
        ("/ws/ops/", cookies["alice"]),  # not staff
    ):
        assert refused(gateway_server, path, cookie), path
    # A page of another site cannot ride on the member's cookie.
    assert refused(
        gateway_server, "/ws/console/acme/usage/", cookies["alice"], "https://evil.example"
    )

    # The members themselves are let in and start from today's figures.
    for path, who in (
        ("/ws/console/acme/usage/", "alice"),
        ("/ws/vendor/tiny/", "vera"),
        ("/ws/ops/", "staff"),
    ):
        with open_socket(gateway_server, path, cookies[who]) as socket:
            first = receive(socket)
            assert first["kind"] == "figures" and first["mode"] == "set"
            assert first["values"]["today.requests"] == 0


def test_a_removed_member_cannot_join_any_more(gateway_server, world):
    Membership.objects.filter(user=world["users"]["alice"], organization=world["acme"]).delete()
    assert refused(gateway_server, "/ws/console/acme/usage/", world["cookies"]["alice"])


def test_one_ingested_batch_pushes_one_message_per_organisation_with_its_sums(
    gateway_server, world
):
    cookies = world["cookies"]
    sockets = {}
    stack = contextlib.ExitStack()
    for name, path, who in (
        ("acme", "/ws/console/acme/usage/", "alice"),
        ("globex", "/ws/console/globex/usage/", "bob"),
        ("idle", "/ws/console/idle/usage/", "carol"),
        ("vendor", "/ws/vendor/tiny/", "vera"),
        ("ops", "/ws/ops/", "staff"),
    ):
        sockets[name] = stack.enter_context(open_socket(gateway_server, path, cookies[who]))
        receive(sockets[name])  # today's figures
    try:
        acme, globex = world["acme"], world["globex"]
        first, second = world["endpoints"]
        events = [
            usage_event(acme, first, pt=10, ct=5, cost=1_000),
            usage_event(acme, second, pt=20, ct=7, cost=2_500),
            usage_event(acme, first, pt=3, ct=0, cost=0, outcome="error"),
            usage_event(globex, second, pt=100, ct=50, cost=40_000),
        ]
        append(events)
        assert usage_ingest_batch(count=1000).recorded == 4

        # Given a batch of four requests, when it is committed, then each organisation gets
        # exactly one message with its own sums, and nobody else's.
        acme_message = receive(sockets["acme"])
        assert acme_message == {
            "kind": "figures",
            "mode": "add",
            "values": {
                "today.requests": 3,
                "today.errors": 1,
                "today.tokens": 45,
                "today.spend": 3_500,
            },
        }
        assert receive(sockets["globex"])["values"] == {
            "today.requests": 1,
            "today.errors": 0,
            "today.tokens": 150,
            "today.spend": 40_000,
        }
        # The vendor sees its endpoints' requests and earnings (80 % after the platform fee).
        vendor_values = receive(sockets["vendor"])["values"]
        assert vendor_values["today.requests"] == 4
        assert vendor_values["today.earnings"] == 34_800  # (1000 + 2500 + 40000) x 0.8
        assert vendor_values[f"ep.{first.pk}.today.requests"] == 2
        assert vendor_values[f"ep.{first.pk}.today.errors"] == 1
        assert vendor_values[f"ep.{second.pk}.today.earnings"] == 34_000
        ops_values = receive(sockets["ops"])["values"]
        assert ops_values["today.requests"] == 4
        assert ops_values["today.spend"] == 43_500
        assert ops_values["today.revenue"] == 8_700
        assert all(receives_nothing(socket) for socket in sockets.values())

        # A duplicate delivery of the same events records nothing and pushes nothing.
        append(events)
        assert usage_ingest_batch(count=1000).recorded == 0
        assert all(receives_nothing(socket) for socket in sockets.values())

        # A page that connects now starts from today's totals.
        with open_socket(gateway_server, "/ws/console/acme/usage/", cookies["alice"]) as late:
            assert receive(late)["values"] == acme_message["values"]
    finally:
        stack.close()
