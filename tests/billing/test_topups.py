"""Top-ups through Stripe Checkout: credited once, only when Stripe says paid."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from billing import credit
from billing.errors import TopUpError
from billing.ledger import account_balance, organization_balance, platform_account
from billing.models import LedgerAccount, LedgerTransaction, StripeEvent, TopUp
from billing.money import cents_to_nanos
from billing.topups import topup_checkout_create, topup_fulfil
from billing.webhooks import stripe_event_process
from marketplace.models import Membership
from tests import factories
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture

SUCCESS_URL = "https://app.example.test/billing/topups/return?session_id={CHECKOUT_SESSION_ID}"
CANCEL_URL = "https://app.example.test/console/billing"


def start(org, cents: int = 2500) -> TopUp:  # type: ignore[no-untyped-def]
    return topup_checkout_create(
        organization=org, amount_cents=cents, success_url=SUCCESS_URL, cancel_url=CANCEL_URL
    ).topup


def deliver(fake: FakeStripe, client, event, **kwargs) -> str:  # type: ignore[no-untyped-def]
    response = fake.deliver(client, event, **kwargs)
    assert response.status_code == 200, response.content
    return stripe_event_process(event_id=event["id"])


def topups_posted() -> int:
    return LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.TOPUP).count()


def test_it_credits_a_paid_checkout_from_a_signed_webhook(
    stripe_fake: FakeStripe, client, django_capture_on_commit_callbacks
):
    org = factories.organization(credit_usd=None)
    topup = start(org)
    assert topup.status == TopUp.Status.PENDING
    assert topup.checkout_url.startswith(stripe_fake.url)
    create = stripe_fake.calls("POST", "/v1/checkout/sessions")[0]
    assert create.idempotency_key == f"topup:{topup.pk}:checkout"
    assert create.params["mode"] == "payment"
    assert create.params["metadata"] == {
        "organization_id": str(org.pk),
        "topup_id": str(topup.pk),
    }
    assert create.params["line_items"][0]["price_data"]["unit_amount"] == "2500"

    stripe_fake.complete_checkout(topup.stripe_session_id)
    event = stripe_fake.event("checkout.session.completed", topup.stripe_session_id)
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        response = stripe_fake.deliver(client, event)
    assert response.status_code == 200
    assert len(enqueued) == 1  # the Celery task is sent only after the event is committed
    assert StripeEvent.objects.get(event_id=event["id"]).status == StripeEvent.Status.RECEIVED

    assert stripe_event_process(event_id=event["id"]) == "processed"

    topup.refresh_from_db()
    assert topup.status == TopUp.Status.PAID
    assert topup.transaction.idempotency_key == f"topup:{topup.stripe_session_id}"
    assert organization_balance(org) == cents_to_nanos(2500)
    clearing = platform_account(LedgerAccount.Kind.STRIPE_CLEARING)
    assert account_balance(clearing) == -cents_to_nanos(2500)
    # The session was read back from Stripe before crediting.
    assert stripe_fake.calls("GET", f"/v1/checkout/sessions/{topup.stripe_session_id}")


def test_it_credits_nothing_while_stripe_says_unpaid_whatever_the_event_claims(
    stripe_fake: FakeStripe, client
):
    org = factories.organization(credit_usd=None)
    topup = start(org)
    stripe_fake.complete_checkout(topup.stripe_session_id, payment_status="unpaid")
    forged = stripe_fake.get(topup.stripe_session_id)
    forged["payment_status"] = "paid"  # the event body is only a hint
    deliver(stripe_fake, client, stripe_fake.event("checkout.session.completed", forged))

    topup.refresh_from_db()
    assert topup.status == TopUp.Status.PENDING
    assert organization_balance(org) == 0
    assert topups_posted() == 0


def test_it_credits_a_delayed_payment_when_it_succeeds(stripe_fake: FakeStripe, client):
    org = factories.organization(credit_usd=None)
    topup = start(org, cents=10_000)
    stripe_fake.complete_checkout(topup.stripe_session_id, payment_status="unpaid")
    deliver(
        stripe_fake,
        client,
        stripe_fake.event("checkout.session.completed", topup.stripe_session_id),
    )
    assert organization_balance(org) == 0

    stripe_fake.settle_async_payment(topup.stripe_session_id)
    deliver(
        stripe_fake,
        client,
        stripe_fake.event("checkout.session.async_payment_succeeded", topup.stripe_session_id),
    )
    assert organization_balance(org) == cents_to_nanos(10_000)
    assert TopUp.objects.get(pk=topup.pk).status == TopUp.Status.PAID


def test_it_marks_failed_and_expired_checkouts_without_crediting(stripe_fake: FakeStripe, client):
    org = factories.organization(credit_usd=None)
    delayed, abandoned = start(org), start(org)
    stripe_fake.complete_checkout(delayed.stripe_session_id, payment_status="unpaid")
    stripe_fake.settle_async_payment(delayed.stripe_session_id, succeeded=False)
    deliver(
        stripe_fake,
        client,
        stripe_fake.event("checkout.session.async_payment_failed", delayed.stripe_session_id),
    )
    stripe_fake.expire_checkout(abandoned.stripe_session_id)
    deliver(
        stripe_fake,
        client,
        stripe_fake.event("checkout.session.expired", abandoned.stripe_session_id),
    )
    delayed.refresh_from_db()
    abandoned.refresh_from_db()
    assert (delayed.status, delayed.failure_reason) == (TopUp.Status.FAILED, "async_payment_failed")
    assert (abandoned.status, abandoned.failure_reason) == (TopUp.Status.FAILED, "expired")
    assert organization_balance(org) == 0


def test_it_credits_once_for_duplicated_and_reordered_webhooks_and_redirects(
    stripe_fake: FakeStripe, client
):
    org = factories.organization(credit_usd=None)
    user = factories.user()
    Membership.objects.create(organization=org, user=user, role=Membership.Role.OWNER)
    topup = start(org, cents=4200)
    session_id = topup.stripe_session_id
    stripe_fake.complete_checkout(session_id)

    # The browser comes back before any webhook...
    client.force_login(user)
    response = client.get(
        "/billing/topups/return", {"session_id": session_id, "next": "/console/billing"}
    )
    assert response.status_code == 302 and response["Location"] == "/console/billing"
    # ...then the webhook arrives twice, an older-style event too, and the redirect again.
    completed = stripe_fake.event("checkout.session.completed", session_id)
    assert deliver(stripe_fake, client, completed) == "processed"
    again = stripe_fake.deliver(client, completed)
    assert again.json()["duplicate"] is True
    assert stripe_event_process(event_id=completed["id"]) == "processed"
    deliver(
        stripe_fake,
        client,
        stripe_fake.event("checkout.session.async_payment_succeeded", session_id),
    )
    assert topup_fulfil(session_id=session_id).status == TopUp.Status.PAID

    assert StripeEvent.objects.count() == 2
    assert topups_posted() == 1
    assert organization_balance(org) == cents_to_nanos(4200)


def test_the_return_page_does_nothing_for_a_session_of_another_organisation(
    stripe_fake: FakeStripe, client
):
    org = factories.organization(credit_usd=None)
    topup = start(org)
    stripe_fake.complete_checkout(topup.stripe_session_id)
    client.force_login(factories.user())
    response = client.get(
        "/billing/topups/return",
        {"session_id": topup.stripe_session_id, "next": "https://evil.test/"},
    )
    assert response.status_code == 302 and response["Location"] == "/"
    assert organization_balance(org) == 0


@pytest.mark.parametrize(
    "tamper",
    ["wrong-secret", "changed-body", "no-header", "connect-endpoint", "stale"],
)
def test_it_refuses_a_bad_signature_and_stores_nothing(stripe_fake: FakeStripe, client, tamper):
    org = factories.organization(credit_usd=None)
    topup = start(org)
    stripe_fake.complete_checkout(topup.stripe_session_id)
    event = stripe_fake.event("checkout.session.completed", topup.stripe_session_id)
    body, header = stripe_fake.signed(event)
    path, headers = "/billing/webhooks/stripe", {"HTTP_STRIPE_SIGNATURE": header}
    if tamper == "wrong-secret":
        headers["HTTP_STRIPE_SIGNATURE"] = stripe_fake.sign(body, "whsec_someone_else")
    elif tamper == "changed-body":
        body = body.replace(b'"livemode": false', b'"livemode": true', 1)
    elif tamper == "no-header":
        headers = {}
    elif tamper == "connect-endpoint":
        path = "/billing/webhooks/stripe-connect"
    elif tamper == "stale":
        headers["HTTP_STRIPE_SIGNATURE"] = stripe_fake.sign(
            body, stripe_fake.webhook_secret, timestamp=1_000_000
        )
    response = client.post(path, data=body, content_type="application/json", **headers)
    assert response.status_code == 400
    assert not StripeEvent.objects.exists()
    assert organization_balance(org) == 0


def test_it_ignores_events_it_has_no_handler_for(stripe_fake: FakeStripe, client):
    event = stripe_fake.event("customer.created", {"id": "cus_1", "object": "customer"})
    assert deliver(stripe_fake, client, event) == "ignored"


@pytest.mark.parametrize("cents", [0, 499, 1_000_001])
def test_it_refuses_amounts_outside_the_limits(stripe_fake: FakeStripe, cents):
    with pytest.raises(TopUpError):
        start(factories.organization(credit_usd=None), cents=cents)
    assert not TopUp.objects.exists()
    assert stripe_fake.requests == []


@pytest.mark.django_db(transaction=True)
def test_it_credits_exactly_once_when_webhooks_and_redirects_race(stripe_fake: FakeStripe, client):
    org = factories.organization(credit_usd=None)
    credit.sync_client().set(credit.credit_key(org.pk), 0)  # the gateway has loaded the balance
    topup = start(org, cents=5000)
    session_id = topup.stripe_session_id
    stripe_fake.complete_checkout(session_id)
    events = [
        stripe_fake.event("checkout.session.completed", session_id),
        stripe_fake.event("checkout.session.async_payment_succeeded", session_id),
    ]
    for event in events:
        assert stripe_fake.deliver(client, event).status_code == 200

    work = [lambda: topup_fulfil(session_id=session_id)] * 4 + [
        (lambda e=e: stripe_event_process(event_id=e["id"])) for e in events for _ in range(2)
    ]
    barrier = threading.Barrier(len(work))
    errors: list[BaseException] = []

    def run(job) -> None:  # type: ignore[no-untyped-def]
        try:
            barrier.wait()
            job()
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(job,)) for job in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert topups_posted() == 1
    assert organization_balance(org) == cents_to_nanos(5000)
    assert credit.spendable(org.pk) == cents_to_nanos(5000)  # the gateway was told once
    assert set(StripeEvent.objects.values_list("status", flat=True)) == {"processed"}
