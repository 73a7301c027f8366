"""Refunds: a usage charge reversed exactly, once; the gateway's credit follows."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import Sum

from billing import credit
from billing.errors import RefundError
from billing.ledger import (
    account_balance,
    account_for_vendor,
    organization_balance,
    platform_account,
)
from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction, Refund, UsageRecord
from billing.money import usd_to_nanos
from billing.refunds import refund_period, refund_usage
from billing.usage import record_events
from tests import factories

pytestmark = pytest.mark.django_db

BASE_URL = "http://127.0.0.1:9/v1"


def charge(org, endpoint, cost: int, *, at: float | None = None) -> str:  # type: ignore[no-untyped-def]
    rid = f"req-{uuid.uuid4().hex}"
    record_events(
        [
            {
                "rid": rid,
                "org": org.pk,
                "ep": endpoint.pk,
                "vendor": endpoint.vendor_id,
                "model": "m",
                "pt": 10,
                "ct": 5,
                "pin": 1,
                "pout": 1,
                "cost": cost,
                "ms": 50,
                "out": "success",
                "at": int((at if at is not None else time.time()) * 1000),
            }
        ]
    )
    return rid


def test_it_reverses_a_charge_exactly_and_once(django_capture_on_commit_callbacks):
    org = factories.organization(credit_usd="5")
    endpoint = factories.endpoint(base_url=BASE_URL)
    rid = charge(org, endpoint, 123_456_789)
    credit.sync_client().set(credit.credit_key(org.pk), 42)  # the gateway's view of the credit
    actor = factories.user()

    with django_capture_on_commit_callbacks(execute=True):
        refund = refund_usage(request_id=rid, reason="wrong answers", actor=actor)
    with django_capture_on_commit_callbacks(execute=True):
        again = refund_usage(request_id=rid, reason="clicked twice", actor=actor)

    assert again.pk == refund.pk
    assert (refund.amount, refund.reason, refund.actor) == (123_456_789, "wrong answers", actor)
    assert refund.transaction.idempotency_key == f"refund:{rid}"
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.REFUND).count() == 1
    usage_txn = UsageRecord.objects.get(request_id=rid).transaction
    per_account = (
        LedgerEntry.objects.filter(transaction__in=[usage_txn, refund.transaction])
        .values("account")
        .annotate(total=Sum("amount"))
    )
    assert {row["total"] for row in per_account} == {0}
    assert organization_balance(org) == usd_to_nanos("5")
    assert account_balance(account_for_vendor(endpoint.vendor)) == 0
    assert account_balance(platform_account(LedgerAccount.Kind.PLATFORM_REVENUE)) == 0
    assert credit.spendable(org.pk) == 42 + 123_456_789  # told once, after commit


def test_it_refuses_what_cannot_be_refunded():
    org = factories.organization(credit_usd="1")
    endpoint = factories.endpoint(base_url=BASE_URL)
    free = charge(org, endpoint, 0)
    with pytest.raises(RefundError, match="not charged"):
        refund_usage(request_id=free, reason="x")
    with pytest.raises(RefundError, match="no usage record"):
        refund_usage(request_id="nope", reason="x")
    with pytest.raises(RefundError, match="reason"):
        refund_usage(request_id=charge(org, endpoint, 5), reason=" ")
    assert not Refund.objects.exists()


def test_it_refunds_a_period_of_an_organisation_only():
    org, other = factories.organization(credit_usd="5"), factories.organization(credit_usd="5")
    endpoint = factories.endpoint(base_url=BASE_URL)
    start = datetime(2026, 11, 2, tzinfo=UTC)
    inside = [
        charge(org, endpoint, 1_000 * n, at=(start + timedelta(hours=n)).timestamp())
        for n in (1, 2, 3)
    ]
    before = charge(org, endpoint, 7_000, at=(start - timedelta(seconds=1)).timestamp())
    theirs = charge(other, endpoint, 9_000, at=(start + timedelta(hours=1)).timestamp())
    refund_usage(request_id=inside[0], reason="single")

    summary = refund_period(
        organization=org, start=start, end=start + timedelta(days=1), reason="outage"
    )

    assert (summary.refunds, summary.amount) == (2, 5_000)
    assert set(Refund.objects.values_list("usage_record__request_id", flat=True)) == set(inside)
    assert not Refund.objects.filter(usage_record__request_id__in=[before, theirs]).exists()
    assert organization_balance(org) == usd_to_nanos("5") - 7_000
    repeat = refund_period(
        organization=org, start=start, end=start + timedelta(days=1), reason="again"
    )
    assert repeat.refunds == 0
