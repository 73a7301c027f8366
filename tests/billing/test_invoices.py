"""Monthly invoices of invoiced organisations: Stripe invoice, receivable, payment."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

import pytest
from django.db.models import Sum

from billing import stripe_gateway
from billing.invoicing import _issue, invoice_issue, invoice_run
from billing.ledger import (
    account_balance,
    account_for_organization_receivable,
    organization_balance,
    platform_account,
)
from billing.models import Invoice, LedgerAccount, LedgerEntry, LedgerTransaction
from billing.money import cents_to_nanos
from billing.refunds import refund_usage
from billing.usage import record_events
from billing.webhooks import stripe_event_process
from marketplace.models import Organization
from tests import factories
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture

BASE_URL = "http://127.0.0.1:9/v1"
OCTOBER = date(2026, 10, 1)
IN_OCTOBER = datetime(2026, 10, 15, 12, tzinfo=UTC).timestamp()


def charge(org, endpoint, cost: int, at: float = IN_OCTOBER) -> str:  # type: ignore[no-untyped-def]
    rid = f"req-{uuid.uuid4().hex}"
    record_events(
        [
            {
                "rid": rid,
                "org": org.pk,
                "ep": endpoint.pk,
                "vendor": endpoint.vendor_id,
                "model": "m",
                "pt": 1000,
                "ct": 500,
                "pin": 1,
                "pout": 1,
                "cost": cost,
                "ms": 80,
                "out": "success",
                "at": int(at * 1000),
            }
        ]
    )
    return rid


def invoiced_org() -> Organization:
    org = factories.organization(credit_usd=None)
    org.billing_mode = Organization.BillingMode.INVOICED
    org.save(update_fields=["billing_mode"])
    return org


@pytest.fixture
def october(stripe_fake: FakeStripe):  # type: ignore[no-untyped-def]
    """An invoiced organisation's October: three endpoints, a refund, usage outside it."""
    org = invoiced_org()
    big, tiny, half = (factories.endpoint(base_url=BASE_URL) for _ in range(3))
    charge(org, big, 12_000_000_000)
    charge(org, big, 345_678_901)  # big: 1234.5678901 cents -> 1235
    charge(org, tiny, 4_999_999)  # tiny: 0.4999999 cents -> 0, no line on Stripe
    charge(org, half, 15_000_000)  # half: 1.5 cents -> 2
    refund_usage(request_id=charge(org, half, 990_000_000), reason="outage")
    charge(org, big, 777_000_000, at=datetime(2026, 11, 1, tzinfo=UTC).timestamp())
    prepaid = factories.organization(credit_usd="1")
    charge(prepaid, big, 1_000_000)
    return org, {"big": big, "tiny": tiny, "half": half}


def test_it_invoices_each_endpoint_of_the_month_through_stripe(stripe_fake: FakeStripe, october):
    org, _ = october
    before = organization_balance(org)

    (invoice,) = invoice_run(month=OCTOBER)

    assert (invoice.status, invoice.amount_cents) == (Invoice.Status.OPEN, 1237)
    usage = 12_000_000_000 + 345_678_901 + 4_999_999 + 15_000_000
    assert invoice.usage_amount == usage
    remote = stripe_fake.get(invoice.stripe_invoice_id)
    assert (remote["status"], remote["total"], remote["collection_method"]) == (
        "open",
        1237,
        "send_invoice",
    )
    assert remote["days_until_due"] == 30 and remote["due_date"]
    assert sorted(line["amount"] for line in remote["lines"]["data"]) == [2, 1235]
    create = stripe_fake.calls("POST", "/v1/invoices")[0]
    assert create.idempotency_key == f"invoice:{org.pk}:2026-10"
    assert create.params["collection_method"] == "send_invoice"
    assert [c.idempotency_key for c in stripe_fake.calls("POST", "/v1/customers")] == [
        f"customer:{org.pk}"
    ]
    assert stripe_fake.calls("POST", r"/v1/invoices/in_\w+/send")
    # The month's usage moved from the credit account to the receivable (in cents).
    assert organization_balance(org) == before + usage
    receivable = account_for_organization_receivable(org)
    assert account_balance(receivable) == -cents_to_nanos(1237)
    issue = LedgerTransaction.objects.get(idempotency_key=f"invoice:{org.pk}:2026-10")
    assert issue.entries.aggregate(total=Sum("amount"))["total"] == 0
    revenue_leg = issue.entries.get(account=platform_account(LedgerAccount.Kind.PLATFORM_REVENUE))
    assert revenue_leg.amount == cents_to_nanos(1237) - usage  # the rounding, documented

    posts = len(stripe_fake.calls("POST"))
    assert invoice_run(month=OCTOBER) == [invoice]  # repeat: nothing new
    assert len(stripe_fake.calls("POST")) == posts
    assert Invoice.objects.count() == 1


def test_a_paid_invoice_clears_the_receivable_once(stripe_fake: FakeStripe, client, october):
    org, _ = october
    (invoice,) = invoice_run(month=OCTOBER)
    stripe_fake.pay_invoice(invoice.stripe_invoice_id)
    event = stripe_fake.event("invoice.paid", invoice.stripe_invoice_id)
    for _ in range(2):
        assert stripe_fake.deliver(client, event).status_code == 200
        stripe_event_process(event_id=event["id"])

    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID
    assert account_balance(account_for_organization_receivable(org)) == 0
    clearing = platform_account(LedgerAccount.Kind.STRIPE_CLEARING)
    assert account_balance(clearing) == -cents_to_nanos(1237)
    assert (
        LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.INVOICE_PAYMENT).count() == 1
    )
    assert LedgerEntry.objects.aggregate(total=Sum("amount"))["total"] == 0


def test_a_failed_payment_is_recorded(stripe_fake: FakeStripe, client, october):
    (invoice,) = invoice_run(month=OCTOBER)
    stripe_fake.fail_invoice_payment(invoice.stripe_invoice_id)
    event = stripe_fake.event("invoice.payment_failed", invoice.stripe_invoice_id)
    stripe_fake.deliver(client, event)
    stripe_event_process(event_id=event["id"])
    invoice.refresh_from_db()
    assert (invoice.status, invoice.payment_failures) == (Invoice.Status.PAYMENT_FAILED, 1)
    assert invoice.payment_transaction is None


def test_it_resumes_an_invoice_interrupted_after_stripe_created_it(
    stripe_fake: FakeStripe, october
):
    org, _ = october
    stored = _issue(org, OCTOBER)
    customer = stripe_gateway.customer_create(
        name=org.name,
        email=None,
        metadata={"organization_id": org.pk, "organization_slug": org.slug},
        idempotency_key=f"customer:{org.pk}",
    )
    # Stripe made the invoice; we crashed before saving its id.
    stripe_gateway.invoice_create(
        customer_id=customer["id"],
        days_until_due=30,
        description="Switchyard usage, October 2026",
        metadata={"organization_id": org.pk, "month": "2026-10", "invoice_id": stored.pk},
        idempotency_key=f"invoice:{org.pk}:2026-10",
    )

    invoice = invoice_issue(organization=org, month=OCTOBER)

    assert invoice.status == Invoice.Status.OPEN
    assert len(stripe_fake.objects("invoice")) == 1
    assert len(stripe_fake.objects("customer")) == 1
    assert stripe_fake.get(invoice.stripe_invoice_id)["total"] == 1237


def test_a_month_without_usage_gets_no_invoice(stripe_fake: FakeStripe):
    invoiced_org()
    assert invoice_run(month=date(2026, 9, 1)) == []
    assert stripe_fake.requests == []
