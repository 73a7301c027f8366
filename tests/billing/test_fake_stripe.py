"""The fake Stripe speaks Stripe's wire format, checked through the real ``stripe`` SDK."""

from __future__ import annotations

import pytest
import stripe

from billing import stripe_gateway
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe, parse_form

stripe_fake = fake_stripe.stripe_fake  # the fixture


def test_it_parses_stripes_form_encoding():
    body = (
        "mode=payment&metadata[org]=7&line_items[0][quantity]=1"
        "&line_items[0][price_data][unit_amount]=500&line_items[1][quantity]=2&empty="
    )
    assert parse_form(body) == {
        "mode": "payment",
        "metadata": {"org": "7"},
        "line_items": [
            {"quantity": "1", "price_data": {"unit_amount": "500"}},
            {"quantity": "2"},
        ],
        "empty": "",
    }


def test_it_answers_the_sdk_with_stripe_shaped_objects(stripe_fake: FakeStripe):
    session = stripe_gateway.checkout_session_create(
        amount_cents=1500,
        product_name="credit",
        success_url="https://example.test/ok",
        cancel_url="https://example.test/cancel",
        client_reference_id="9",
        metadata={"topup_id": 9},
        idempotency_key="topup:9:checkout",
    )
    assert session["object"] == "checkout.session"
    assert session["id"].startswith("cs_test_")
    assert (session["amount_total"], session["currency"]) == (1500, "usd")
    assert (session["payment_status"], session["status"]) == ("unpaid", "open")
    assert session["metadata"] == {"topup_id": "9"}
    call = stripe_fake.calls("POST", "/v1/checkout/sessions")[0]
    assert call.idempotency_key == "topup:9:checkout"
    assert call.params["line_items"][0]["price_data"]["unit_amount"] == "1500"
    assert stripe_gateway.checkout_session_retrieve(session["id"])["id"] == session["id"]


def test_it_replays_an_idempotent_request_and_refuses_other_parameters(stripe_fake: FakeStripe):
    account = stripe_gateway.account_create(
        email=None, business_name="V", metadata={}, idempotency_key="connect-account:1"
    )
    stripe_fake.update_account(account["id"])
    first = stripe_gateway.transfer_create(
        amount_cents=100,
        destination=account["id"],
        transfer_group="g",
        description="d",
        metadata={},
        idempotency_key="settle:x:1",
    )
    again = stripe_gateway.transfer_create(
        amount_cents=100,
        destination=account["id"],
        transfer_group="g",
        description="d",
        metadata={},
        idempotency_key="settle:x:1",
    )
    assert again["id"] == first["id"]
    assert len(stripe_fake.objects("transfer")) == 1
    assert stripe_fake.calls("POST", "/v1/transfers")[1].replayed
    with pytest.raises(stripe.IdempotencyError):
        stripe_gateway.transfer_create(
            amount_cents=101,
            destination=account["id"],
            transfer_group="g",
            description="d",
            metadata={},
            idempotency_key="settle:x:1",
        )


def test_it_refuses_transfers_beyond_the_available_balance(stripe_fake: FakeStripe):
    account = stripe_gateway.account_create(
        email=None, business_name="V", metadata={}, idempotency_key="connect-account:2"
    )
    with pytest.raises(stripe.InvalidRequestError) as not_onboarded:
        stripe_gateway.transfer_create(
            amount_cents=100,
            destination=account["id"],
            transfer_group="g",
            description="d",
            metadata={},
            idempotency_key="k0",
        )
    assert not_onboarded.value.code == "insufficient_capabilities_for_transfer"
    stripe_fake.update_account(account["id"])
    stripe_fake.set_available_balance(99)
    with pytest.raises(stripe.InvalidRequestError) as short:
        stripe_gateway.transfer_create(
            amount_cents=100,
            destination=account["id"],
            transfer_group="g",
            description="d",
            metadata={},
            idempotency_key="k1",
        )
    assert short.value.code == "balance_insufficient"
    assert stripe_gateway.is_definite_failure(short.value)
    assert stripe_fake.objects("transfer") == []


def test_its_signatures_verify_with_the_stripe_library(stripe_fake: FakeStripe):
    event = stripe_fake.event(
        "checkout.session.completed", {"id": "cs_test_x", "object": "checkout.session"}
    )
    body, header = stripe_fake.signed(event)
    assert (
        stripe_gateway.webhook_event(body, header, stripe_fake.webhook_secret)["id"] == event["id"]
    )
    stripe.WebhookSignature.verify_header(body.decode(), header, stripe_fake.webhook_secret)
    with pytest.raises(stripe_gateway.WebhookSignatureError):
        stripe_gateway.webhook_event(body + b" ", header, stripe_fake.webhook_secret)
    stale = stripe_fake.sign(body, stripe_fake.webhook_secret, timestamp=1)
    with pytest.raises(stripe_gateway.WebhookSignatureError):
        stripe_gateway.webhook_event(body, stale, stripe_fake.webhook_secret)


def test_it_builds_invoices_like_stripe(stripe_fake: FakeStripe):
    customer = stripe_gateway.customer_create(
        name="Acme", email=None, metadata={}, idempotency_key="customer:1"
    )
    invoice = stripe_gateway.invoice_create(
        customer_id=customer["id"],
        days_until_due=14,
        description="d",
        metadata={},
        idempotency_key="invoice:1:2026-10",
    )
    assert (invoice["object"], invoice["status"]) == ("invoice", "draft")
    stripe_gateway.invoice_item_create(
        customer_id=customer["id"],
        invoice_id=invoice["id"],
        amount_cents=250,
        description="line",
        metadata={},
        idempotency_key="invoice:1:2026-10:line:a",
    )
    final = stripe_gateway.invoice_finalize(invoice["id"], idempotency_key="f")
    assert (final["status"], final["amount_due"], final["total"]) == ("open", 250, 250)
    assert final["due_date"] and final["hosted_invoice_url"]
    sent = stripe_gateway.invoice_send(invoice["id"], idempotency_key="s")
    assert sent["status"] == "open"
    assert stripe_fake.pay_invoice(invoice["id"])["amount_paid"] == 250


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def test_its_checkout_url_is_a_page_that_links_back_to_the_success_url(stripe_fake: FakeStripe):
    session = stripe_gateway.checkout_session_create(
        amount_cents=2550,
        product_name="credit",
        success_url="https://example.test/back?session_id={CHECKOUT_SESSION_ID}&next=/x",
        cancel_url="https://example.test/cancel",
        client_reference_id="9",
        metadata={},
        idempotency_key="topup:9:checkout",
    )
    status, page = _get(session["url"])
    assert status == 200 and "<h1>Pay $25.50</h1>" in page
    assert f'href="https://example.test/back?session_id={session["id"]}&amp;next=/x"' in page
    assert 'href="https://example.test/cancel"' in page
    assert len(stripe_fake.requests) == 1  # a browser's visit is not an API call

    stripe_fake.expire_checkout(session["id"])
    status, page = _get(f"{stripe_fake.url}/checkout/pay/{session['id']}")
    assert status == 200 and "no longer active" in page and "example.test/back" not in page
    assert _get(f"{stripe_fake.url}/checkout/pay/cs_test_nothing")[0] == 404


def test_it_sends_signed_events_over_http_and_returns_error_answers(stripe_fake: FakeStripe):
    event = stripe_fake.event("checkout.session.completed", {"id": "cs_test_x"})
    # The fake's own API refuses an unauthenticated POST: the answer comes back, not raised.
    status, body = stripe_fake.send(event, f"{stripe_fake.url}/v1/webhook-probe")
    assert status == 401 and body["error"]["message"] == "Invalid API Key provided."


def _request(url: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, Location header, body) without following redirects, as a browser sees it."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, parts.path)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Location") or "", answer.read().decode()
    finally:
        connection.close()


@pytest.fixture
def webhook_receiver():  # type: ignore[no-untyped-def]
    """A tiny HTTP server that keeps what it receives (body and Stripe-Signature)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[tuple[bytes, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((body, self.headers["Stripe-Signature"]))
            answer = json.dumps({"received": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def test_its_account_link_is_a_single_use_onboarding_page(stripe_fake: FakeStripe):
    account = stripe_gateway.account_create(
        email=None, business_name="Tiny Models", metadata={}, idempotency_key="a"
    )
    link = stripe_gateway.account_link_create(
        account_id=account["id"],
        refresh_url="https://example.test/refresh",
        return_url="https://example.test/return",
        idempotency_key="l",
    )
    status, _, page = _request(link["url"])
    assert status == 200 and "<h1>Set up payouts for Tiny Models</h1>" in page
    assert "<li>external_account</li>" in page
    assert 'href="https://example.test/return">Return without finishing' in page
    # Used once: like Stripe, a second visit goes to the platform's refresh_url.
    assert _request(link["url"])[:2] == (302, "https://example.test/refresh")
    assert _request(f"{stripe_fake.url}/connect/setup/e/{account['id']}/nope")[0] == 404
    assert stripe_fake.get(account["id"])["payouts_enabled"] is False


def test_its_onboarding_submit_enables_payouts_and_sends_the_connect_event(
    stripe_fake: FakeStripe, webhook_receiver
):
    import json

    url, received = webhook_receiver
    stripe_fake.set_connect_webhook_url(url)
    account = stripe_gateway.account_create(
        email=None, business_name="Tiny Models", metadata={}, idempotency_key="a"
    )
    link = stripe_gateway.account_link_create(
        account_id=account["id"],
        refresh_url="https://example.test/refresh",
        return_url="https://example.test/return",
        idempotency_key="l",
    )
    assert _request(link["url"] + "/submit", "POST")[0] == 400  # the page was never shown
    _request(link["url"])

    status, location, _ = _request(link["url"] + "/submit", "POST")

    assert (status, location) == (303, "https://example.test/return")
    remote = stripe_fake.get(account["id"])
    assert remote["payouts_enabled"] is True and remote["details_submitted"] is True
    assert remote["capabilities"]["transfers"] == "active"
    assert remote["requirements"]["currently_due"] == []
    (body, signature) = received[0]
    event = stripe.Webhook.construct_event(
        body.decode(), signature, stripe_fake.connect_webhook_secret
    )
    payload = json.loads(body)
    assert payload["type"] == "account.updated" and payload["account"] == account["id"]
    assert payload["data"]["object"]["payouts_enabled"] is True
    previous = payload["data"]["previous_attributes"]
    assert previous["payouts_enabled"] is False and previous["details_submitted"] is False
    assert previous["requirements"]["currently_due"] == ["external_account", "tos_acceptance.date"]
    assert "id" not in previous and "email" not in previous  # only what changed
    assert stripe_fake.webhook_deliveries == [(event["id"], 200)]
    assert _request(link["url"] + "/submit", "POST")[0] == 400  # submitted once
