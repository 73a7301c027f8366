"""Reconciliation: passes on a clean ledger, names each injected mismatch and fails."""

from __future__ import annotations

import io
import re
import time
import uuid

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from billing import stripe_gateway
from billing.connect import connect_account_create, connect_account_sync
from billing.invoicing import invoice_run
from billing.models import Payout, TopUp, UsageRecord
from billing.refunds import refund_usage
from billing.settlement import settlement_run
from billing.topups import topup_checkout_create, topup_fulfil
from billing.usage import record_events
from tests import factories
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture

BASE_URL = "http://127.0.0.1:9/v1"


def charge(org, endpoint, cost: int) -> str:  # type: ignore[no-untyped-def]
    rid = f"req-{uuid.uuid4().hex}"
    record_events(
        [
            {
                "rid": rid,
                "org": org.pk,
                "ep": endpoint.pk,
                "vendor": endpoint.vendor_id,
                "model": "m",
                "pt": 1,
                "ct": 1,
                "pin": 1,
                "pout": 1,
                "cost": cost,
                "ms": 5,
                "out": "success",
                "at": time.time_ns() // 1_000_000,
            }
        ]
    )
    return rid


def reconcile(*args: str) -> tuple[str, bool]:
    out = io.StringIO()
    try:
        call_command("reconcile", *args, stdout=out)
    except CommandError:
        return out.getvalue(), False
    return out.getvalue(), True


@pytest.fixture
def busy_ledger(stripe_fake: FakeStripe):  # type: ignore[no-untyped-def]
    """Top-ups, usage, a refund, a payout and a paid invoice: everything that moves money."""
    org = factories.organization(credit_usd="5")
    topup = topup_checkout_create(
        organization=org,
        amount_cents=2000,
        success_url="https://x.test/ok",
        cancel_url="https://x.test/no",
    ).topup
    stripe_fake.complete_checkout(topup.stripe_session_id)
    topup_fulfil(session_id=topup.stripe_session_id)
    vendor = factories.vendor()
    account = connect_account_create(vendor=vendor)
    stripe_fake.update_account(account.stripe_account_id)
    connect_account_sync(stripe_account_id=account.stripe_account_id)
    endpoint = factories.endpoint(base_url=BASE_URL, vendor_obj=vendor)
    charge(org, endpoint, 3_000_000_000)
    refund_usage(request_id=charge(org, endpoint, 1_000_000_000), reason="test")
    today = timezone.now().date()
    settlement_run(period_start=today, period_end=today)
    invoiced = factories.organization(credit_usd=None)
    invoiced.billing_mode = "invoiced"
    invoiced.save()
    charge(invoiced, endpoint, 2_500_000_000)
    (invoice,) = invoice_run(month=today)
    stripe_fake.pay_invoice(invoice.stripe_invoice_id)
    from billing.invoicing import invoice_sync

    invoice_sync(stripe_invoice_id=invoice.stripe_invoice_id)
    return {"org": org, "endpoint": endpoint, "vendor": vendor}


def test_it_passes_on_a_clean_ledger(busy_ledger):
    output, ok = reconcile()
    assert ok, output
    assert "reconciled: no mismatch" in output


def test_it_finds_a_charged_usage_record_without_its_transaction(busy_ledger):
    record = UsageRecord.objects.create(
        request_id="req-sneaked-in",
        organization=busy_ledger["org"],
        model_requested="m",
        price_input=1,
        price_output=1,
        cost=5_000,
        outcome="success",
        occurred_at=timezone.now(),
    )
    output, ok = reconcile()
    assert not ok
    assert f"[usage] {record.request_id}: charged 5000 nanos but has no usage transaction" in output
    assert "[vendor_payable]" not in output


def test_it_finds_a_reversed_transfer_and_an_unrecorded_one(stripe_fake: FakeStripe, busy_ledger):
    payout = Payout.objects.get()
    stripe_gateway.transfer_reversal_create(
        payout.stripe_transfer_id, amount_cents=1, metadata={}, idempotency_key="oops"
    )
    stripe_gateway.transfer_create(
        amount_cents=7,
        destination=payout.stripe_account_id,
        transfer_group=f"settle:{payout.run.period_key}",
        description="by hand",
        metadata={},
        idempotency_key="by-hand",
    )
    output, ok = reconcile()
    assert not ok
    assert f"[payout] {payout.idempotency_key}: Stripe transfer" in output
    assert "is not recorded as paid" in output
    clean, ok = reconcile("--skip-stripe")
    assert ok, clean


def test_it_finds_a_paid_top_up_missing_from_the_ledger(busy_ledger):
    topup = TopUp.objects.get()
    TopUp.objects.filter(pk=topup.pk).update(transaction=None)
    output, ok = reconcile("--start", timezone.now().date().isoformat())
    assert not ok
    assert "[topup] topup" in output and "paid but not in the ledger" in output
    assert "ledger top-up without a paid top-up" in output


def test_every_stripe_post_carries_a_key_derived_from_our_ids(stripe_fake: FakeStripe, busy_ledger):
    posts = stripe_fake.calls("POST")
    assert {p.path.split("/")[2] for p in posts} >= {
        "checkout",
        "accounts",
        "transfers",
        "customers",
        "invoices",
        "invoiceitems",
    }
    ours = re.compile(r"^(topup|connect-account|settle|customer|invoice):[\w:.\-]+$")
    assert [p.idempotency_key for p in posts if not ours.match(p.idempotency_key or "")] == []


def test_it_finds_a_record_whose_cost_its_batch_posting_does_not_carry(busy_ledger):
    org, endpoint = busy_ledger["org"], busy_ledger["endpoint"]
    rid = charge(org, endpoint, 1_000_000)
    record = UsageRecord.objects.get(request_id=rid)
    # The record claims more than its batch debited (share and fee still add up to it).
    UsageRecord.objects.filter(pk=record.pk).update(
        cost=2_000_000, vendor_share=2_000_000 - record.platform_fee
    )
    output, ok = reconcile()
    assert not ok
    key = record.transaction.idempotency_key
    assert re.search(
        rf"\[usage\] {re.escape(key)}: account \d+: its records make -2000000 nanos, "
        r"the entries -1000000",
        output,
    ), output


def test_it_finds_a_record_whose_split_does_not_add_up_to_its_cost(busy_ledger):
    rid = charge(busy_ledger["org"], busy_ledger["endpoint"], 1_000_000)
    UsageRecord.objects.filter(request_id=rid).update(platform_fee=1)
    output, ok = reconcile()
    assert not ok
    assert f"[usage] {rid}: cost 1000000 != share" in output


def test_it_finds_a_record_linked_to_a_transaction_that_is_not_a_usage_charge(busy_ledger):
    rid = charge(busy_ledger["org"], busy_ledger["endpoint"], 1_000_000)
    topup = TopUp.objects.filter(transaction__isnull=False).first()
    assert topup is not None
    UsageRecord.objects.filter(request_id=rid).update(transaction=topup.transaction)
    output, ok = reconcile()
    assert not ok
    assert f"[usage] {rid}: linked to transaction 'topup:" in output
