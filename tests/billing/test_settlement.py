"""Vendor settlement: one transfer per vendor and period, posted once, failures retried."""

from __future__ import annotations

import csv
import io
import time
import uuid
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from billing import stripe_gateway
from billing.connect import connect_account_create, connect_account_sync
from billing.ledger import account_balance, account_for_vendor, account_for_vendor_payouts
from billing.models import LedgerTransaction, Payout, SettlementRun, VendorPayoutAccount
from billing.money import NANOS_PER_CENT, format_usd_plain, nanos_to_cents_floor
from billing.refunds import refund_usage
from billing.settlement import _decide, period_cutoff, settlement_run
from billing.statements import vendor_statement_csv
from billing.usage import record_events
from tests import factories
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture

BASE_URL = "http://127.0.0.1:9/v1"


def charge(org, endpoint, cost: int) -> str:  # type: ignore[no-untyped-def]
    """One metered request of ``cost`` nanos, ingested like the gateway's events."""
    rid = f"req-{uuid.uuid4().hex}"
    record_events(
        [
            {
                "rid": rid,
                "org": org.pk,
                "ep": endpoint.pk,
                "vendor": endpoint.vendor_id,
                "model": "m",
                "pt": 100,
                "ct": 50,
                "pin": 1,
                "pout": 1,
                "cost": cost,
                "ms": 120,
                "out": "success",
                "at": time.time_ns() // 1_000_000,
            }
        ]
    )
    return rid


def onboarded_vendor(fake: FakeStripe, *, payouts: bool = True):  # type: ignore[no-untyped-def]
    vendor = factories.vendor()
    account = connect_account_create(vendor=vendor)
    fake.update_account(account.stripe_account_id, payouts_enabled=payouts)
    connect_account_sync(stripe_account_id=account.stripe_account_id)
    return vendor


def share(cost: int) -> int:
    return cost - cost * 2000 // 10_000  # the default 20 % platform fee


def transfers_posted() -> int:
    return len([r for r in LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.PAYOUT)])


@pytest.fixture
def today():  # type: ignore[no-untyped-def]
    return timezone.now().date()


def test_it_makes_one_transfer_per_vendor_and_is_a_no_op_the_second_time(
    stripe_fake: FakeStripe, today
):
    org = factories.organization(credit_usd="100")
    alpha, beta = onboarded_vendor(stripe_fake), onboarded_vendor(stripe_fake)
    unboarded = factories.vendor()
    disabled = onboarded_vendor(stripe_fake, payouts=False)
    endpoints = {
        v.pk: factories.endpoint(base_url=BASE_URL, vendor_obj=v)
        for v in (alpha, beta, unboarded, disabled)
    }
    charge(org, endpoints[alpha.pk], 1_234_567_891)
    charge(org, endpoints[alpha.pk], 765_432_109)
    charge(org, endpoints[beta.pk], 333_333_333)
    charge(org, endpoints[unboarded.pk], 500_000_000)
    charge(org, endpoints[disabled.pk], 500_000_000)

    report = settlement_run(period_start=today, period_end=today)

    period = f"{today.isoformat()}..{today.isoformat()}"
    outcomes = {o.vendor_id: (o.outcome, o.reason) for o in report.outcomes}
    assert outcomes == {
        alpha.pk: ("paid", ""),
        beta.pk: ("paid", ""),
        unboarded.pk: ("skipped", "no_stripe_account"),
        disabled.pk: ("skipped", "payouts_disabled"),
    }
    transfers = {t["destination"]: t for t in stripe_fake.objects("transfer")}
    assert len(transfers) == 2
    alpha_owed = share(1_234_567_891) + share(765_432_109)
    alpha_account = VendorPayoutAccount.objects.get(vendor=alpha).stripe_account_id
    assert transfers[alpha_account]["amount"] == nanos_to_cents_floor(alpha_owed)
    assert transfers[alpha_account]["transfer_group"] == f"settle:{period}"
    keys = sorted(c.idempotency_key for c in stripe_fake.calls("POST", "/v1/transfers"))
    assert keys == sorted(f"settle:{period}:{v.pk}" for v in (alpha, beta))
    # The ledger moved exactly the cents transferred; sub-cent remainders wait for next time.
    payable = account_for_vendor(alpha)
    assert account_balance(payable) == alpha_owed % NANOS_PER_CENT
    assert (
        account_balance(account_for_vendor_payouts(alpha))
        == alpha_owed - alpha_owed % NANOS_PER_CENT
    )
    assert account_balance(account_for_vendor(unboarded)) == share(500_000_000)
    run = SettlementRun.objects.get()
    assert run.status == SettlementRun.Status.COMPLETED
    assert {o["reason"] for o in run.report["outcomes"]} >= {
        "no_stripe_account",
        "payouts_disabled",
    }

    again = settlement_run(period_start=today, period_end=today)
    assert {o.outcome for o in again.of("paid", "already_paid")} == {"already_paid"}
    assert len(stripe_fake.calls("POST", "/v1/transfers")) == 2
    assert len(stripe_fake.objects("transfer")) == 2
    assert transfers_posted() == 2


def test_an_insufficient_stripe_balance_fails_the_payout_and_the_next_run_retries(
    stripe_fake: FakeStripe, today
):
    org = factories.organization(credit_usd="100")
    big, small = onboarded_vendor(stripe_fake), onboarded_vendor(stripe_fake)
    charge(org, factories.endpoint(base_url=BASE_URL, vendor_obj=big), 50_000_000_000)
    charge(org, factories.endpoint(base_url=BASE_URL, vendor_obj=small), 1_000_000_000)
    stripe_fake.set_available_balance(nanos_to_cents_floor(share(1_000_000_000)))

    report = settlement_run(period_start=today, period_end=today)

    outcomes = {o.vendor_id: (o.outcome, o.reason) for o in report.outcomes}
    assert outcomes == {big.pk: ("failed", "balance_insufficient"), small.pk: ("paid", "")}
    failed = Payout.objects.get(vendor=big)
    assert (failed.status, failed.failure_code) == (Payout.Status.FAILED, "balance_insufficient")
    assert failed.transaction is None
    assert account_balance(account_for_vendor(big)) == share(50_000_000_000)  # untouched
    assert not report.ok

    stripe_fake.set_available_balance(None)  # funds arrived
    retry = settlement_run(period_start=today, period_end=today)

    outcomes = {o.vendor_id: o.outcome for o in retry.outcomes}
    assert outcomes == {big.pk: "paid", small.pk: "already_paid"}
    failed.refresh_from_db()
    assert failed.status == Payout.Status.PAID and failed.attempts == 2
    period = f"{today.isoformat()}..{today.isoformat()}"
    # Stripe replays a key's first answer (the error), so the retry used a fresh key.
    assert failed.idempotency_key == f"settle:{period}:{big.pk}:retry1"
    assert failed.transaction.idempotency_key == f"settle:{period}:{big.pk}"
    assert account_balance(account_for_vendor(big)) == 0
    assert len(stripe_fake.objects("transfer")) == 2


def test_a_payout_interrupted_after_the_transfer_is_recorded_once(stripe_fake: FakeStripe, today):
    org = factories.organization(credit_usd="100")
    vendor = onboarded_vendor(stripe_fake)
    charge(org, factories.endpoint(base_url=BASE_URL, vendor_obj=vendor), 2_000_000_000)
    run = SettlementRun.objects.create(period_start=today, period_end=today)
    payout, _ = _decide(run, vendor, period_cutoff(today))
    # The worker sent the transfer and died before recording it.
    stripe_gateway.transfer_create(
        amount_cents=payout.amount_cents,
        destination=payout.stripe_account_id,
        transfer_group=f"settle:{run.period_key}",
        description=f"Switchyard earnings {run.period_key}",
        metadata={"vendor_id": vendor.pk, "payout_id": payout.pk, "period": run.period_key},
        idempotency_key=payout.idempotency_key,
    )
    # Another period's run leaves the vendor alone while that payout is in flight.
    other = settlement_run(period_start=today - timedelta(days=1), period_end=today)
    assert [(o.outcome, o.reason) for o in other.outcomes] == [("skipped", "payout_in_flight")]

    report = settlement_run(period_start=today, period_end=today)

    assert [o.outcome for o in report.outcomes] == ["paid"]
    assert len(stripe_fake.objects("transfer")) == 1
    payout.refresh_from_db()
    assert payout.stripe_transfer_id == stripe_fake.objects("transfer")[0]["id"]
    assert account_balance(account_for_vendor(vendor)) == 0


def test_a_refund_after_a_payout_reduces_the_next_settlement(stripe_fake: FakeStripe, today):
    org = factories.organization(credit_usd="100")
    vendor = onboarded_vendor(stripe_fake)
    endpoint = factories.endpoint(base_url=BASE_URL, vendor_obj=vendor)
    refunded = charge(org, endpoint, 3_000_000_000)
    settlement_run(period_start=today, period_end=today)

    refund_usage(request_id=refunded, reason="model returned garbage")
    payable = account_for_vendor(vendor)
    assert account_balance(payable) == -share(3_000_000_000)  # already paid: carried over

    nothing = settlement_run(period_start=today - timedelta(days=1), period_end=today)
    assert [o.outcome for o in nothing.outcomes] == ["nothing_to_pay"]

    charge(org, endpoint, 5_000_000_000)
    later = settlement_run(period_start=today - timedelta(days=2), period_end=today)
    assert [o.outcome for o in later.outcomes] == ["paid"]
    assert later.outcomes[0].amount_cents == nanos_to_cents_floor(
        share(5_000_000_000) - share(3_000_000_000)
    )
    assert len(stripe_fake.objects("transfer")) == 2


def test_the_statement_explains_the_payable_balance(stripe_fake: FakeStripe, today):
    org = factories.organization(credit_usd="100")
    vendor = onboarded_vendor(stripe_fake)
    endpoint = factories.endpoint(base_url=BASE_URL, vendor_obj=vendor)
    first = charge(org, endpoint, 1_000_000_001)
    charge(org, endpoint, 2_000_000_000)
    settlement_run(period_start=today, period_end=today)
    refund_usage(request_id=first, reason="outage")
    charge(org, endpoint, 7)

    rows = list(
        csv.DictReader(io.StringIO(vendor_statement_csv(vendor=vendor, start=today, end=today)))
    )

    kinds = [row["type"] for row in rows]
    assert kinds[0] == "opening_balance" and kinds[-1] == "closing_balance"
    assert sorted(kinds[1:-1]) == ["payout", "refund", "usage"]
    usage = next(row for row in rows if row["type"] == "usage")
    assert usage["requests"] == "3"
    assert usage["gross_usd"] == format_usd_plain(3_000_000_008)
    assert rows[-1]["balance_usd"] == format_usd_plain(account_balance(account_for_vendor(vendor)))
    assert rows[-2]["balance_usd"] == rows[-1]["balance_usd"]


def test_the_settle_command_pays_and_reports(stripe_fake: FakeStripe, today):
    org = factories.organization(credit_usd="10")
    vendor = onboarded_vendor(stripe_fake)
    charge(org, factories.endpoint(base_url=BASE_URL, vendor_obj=vendor), 1_000_000_000)
    out = io.StringIO()
    call_command("settle", "--period", f"{today.isoformat()}..{today.isoformat()}", stdout=out)
    assert f"vendor {vendor.pk}: paid 0.80 USD" in out.getvalue()
    with pytest.raises(CommandError, match="not a period"):
        call_command("settle", "--period", "last week")
