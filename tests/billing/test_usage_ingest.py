"""Usage ingest posts one balanced usage transaction per batch, built from what it recorded."""

from __future__ import annotations

import io
import time
import uuid

import pytest
from django.core.management import call_command
from django.db.models import Sum

from billing.ledger import account_for_organization, account_for_vendor, platform_account
from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction, UsageRecord
from billing.money import split_fee
from billing.usage import record_events
from tests import factories

pytestmark = pytest.mark.django_db


def event(org, endpoint, cost: int) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return {
        "rid": f"req-{uuid.uuid4().hex}",
        "org": org.pk,
        "ep": endpoint.pk if endpoint else None,
        "vendor": endpoint.vendor_id if endpoint else None,
        "model": "m",
        "pt": 3,
        "ct": 4,
        "pin": 1,
        "pout": 1,
        "cost": cost,
        "ms": 5,
        "out": "success",
        "at": time.time_ns() // 1_000_000,
    }


def entries(txn: LedgerTransaction) -> dict[str, int]:
    return dict(
        LedgerEntry.objects.filter(transaction=txn)
        .values("account__code")
        .annotate(n=Sum("amount"))
        .values_list("account__code", "n")
    )


def reconciled() -> str:
    out = io.StringIO()
    call_command("reconcile", "--skip-stripe", stdout=out)
    return out.getvalue()


def test_a_batch_is_one_transaction_with_a_leg_per_organisation_and_vendor():
    a, b = factories.organization(credit_usd="10"), factories.organization(credit_usd="10")
    cheap = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    special = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    special.vendor.fee_bps = 2500
    special.vendor.save()
    batch = [
        event(a, cheap, 1_000_001),
        event(a, special, 2_000_003),
        event(b, cheap, 3_000_007),
        event(b, special, 5),
        event(a, cheap, 0),  # a free request: recorded, not charged
    ]

    assert record_events(batch) == (5, 0)

    records = {r.request_id: r for r in UsageRecord.objects.all()}
    txns = {r.transaction_id for r in records.values() if r.cost}
    assert len(txns) == 1 and records[batch[4]["rid"]].transaction_id is None
    txn = LedgerTransaction.objects.get(pk=txns.pop())
    assert txn.kind == LedgerTransaction.Kind.USAGE
    for e in batch[:4]:
        record = records[e["rid"]]
        assert record.vendor_share + record.platform_fee == record.cost == e["cost"]
    expected = {
        account_for_organization(a).code: -3_000_004,
        account_for_organization(b).code: -3_000_012,
        account_for_vendor(cheap.vendor).code: sum(
            records[e["rid"]].vendor_share for e in batch if e["vendor"] == cheap.vendor_id
        ),
        account_for_vendor(special.vendor).code: sum(
            records[e["rid"]].vendor_share for e in batch if e["vendor"] == special.vendor_id
        ),
        platform_account(LedgerAccount.Kind.PLATFORM_REVENUE).code: sum(
            r.platform_fee for r in records.values()
        ),
    }
    assert entries(txn) == expected
    # The special vendor's fee is 25 % (the fee rounds down): 500,000 of 2,000,003.
    assert records[batch[1]["rid"]].platform_fee == split_fee(2_000_003, 2500)[1] == 500_000
    assert "reconciled: no mismatch" in reconciled()


def test_a_replayed_batch_records_and_posts_nothing_and_a_mixed_one_posts_only_the_new():
    org = factories.organization(credit_usd="10")
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    first = [event(org, endpoint, 1_000) for _ in range(3)]
    assert record_events(first) == (3, 0)
    txns_before = LedgerTransaction.objects.filter(kind="usage").count()

    assert record_events(first) == (0, 3)
    assert LedgerTransaction.objects.filter(kind="usage").count() == txns_before

    fresh = event(org, endpoint, 7_000)
    assert record_events([*first, fresh]) == (1, 3)
    txn = UsageRecord.objects.get(request_id=fresh["rid"]).transaction
    assert txn is not None
    assert entries(txn)[account_for_organization(org).code] == -7_000
    debited = LedgerEntry.objects.filter(
        account=account_for_organization(org), transaction__kind="usage"
    )
    assert debited.aggregate(n=Sum("amount"))["n"] == -10_000  # 3 x 1,000 + 7,000, each once
    assert "reconciled: no mismatch" in reconciled()


def test_a_batch_that_charges_an_unknown_vendor_leaves_nothing_behind():
    org = factories.organization(credit_usd="10")
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    good = event(org, endpoint, 1_000)
    bad = event(org, endpoint, 1_000) | {"vendor": 999_999_999}
    with pytest.raises(ValueError, match="unknown vendor"):
        record_events([good, bad])
    assert not UsageRecord.objects.filter(request_id__in=[good["rid"], bad["rid"]]).exists()
    assert not LedgerTransaction.objects.filter(kind="usage").exists()
