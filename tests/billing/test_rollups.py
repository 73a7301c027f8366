"""Hourly rollups rebuilt from usage records: same totals, idempotent, late records included."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db.models import Max, Sum

from billing.models import UsageRecord, UsageRollup
from billing.rollups import rollup_rebuild
from billing.usage import record_events
from marketplace.services import api_key_create
from tests import factories

pytestmark = pytest.mark.django_db

BASE_URL = "http://127.0.0.1:9/v1"
NOON = datetime(2026, 11, 20, 12, tzinfo=UTC)


def event(org, key, endpoint, at: datetime, n: int, outcome: str = "success") -> dict:  # type: ignore[no-untyped-def]
    return {
        "rid": f"req-{uuid.uuid4().hex}",
        "org": org.pk,
        "key": key,
        "ep": endpoint.pk,
        "vendor": endpoint.vendor_id,
        "model": "m",
        "pt": 10 * n,
        "ct": 3 * n,
        "pin": 1,
        "pout": 1,
        "cost": 1_000 * n,
        "ms": 40 + n,
        "out": outcome,
        "at": int(at.timestamp() * 1000),
    }


def totals(qs, fields: dict[str, str]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    result = qs.aggregate(**{name: Sum(f) for name, f in fields.items()})
    return {k: int(v or 0) for k, v in result.items()}


def test_rebuilding_gives_the_records_totals_and_is_idempotent():
    orgs = [factories.organization(credit_usd="1") for _ in range(2)]
    keys = [api_key_create(organization=o, name="k").api_key.pk for o in orgs]
    endpoints = [factories.endpoint(base_url=BASE_URL) for _ in range(2)]
    events = []
    for n in range(30):
        at = NOON + timedelta(minutes=7 * n)  # spans 12:00 to 15:23
        events.append(
            event(
                orgs[n % 2],
                keys[n % 2],
                endpoints[n % 3 % 2],
                at,
                n,
                "failed" if n % 5 == 0 else "success",
            )
        )
    outside = NOON + timedelta(hours=6)
    events.append(event(orgs[0], keys[0], endpoints[0], outside, 99))
    record_events(events)

    written = rollup_rebuild(start=NOON, end=NOON + timedelta(hours=4))
    assert written == UsageRollup.objects.count() > 4
    assert rollup_rebuild(start=NOON, end=NOON + timedelta(hours=4)) == written

    records = UsageRecord.objects.filter(occurred_at__lt=NOON + timedelta(hours=4))
    assert totals(
        UsageRollup.objects,
        {
            "n": "requests",
            "pt": "prompt_tokens",
            "ct": "completion_tokens",
            "cost": "cost",
            "ms": "latency_ms_sum",
            "fee": "platform_fee",
        },
    ) == {
        "n": records.count(),
        **totals(
            records,
            {
                "pt": "prompt_tokens",
                "ct": "completion_tokens",
                "cost": "cost",
                "ms": "latency_ms",
                "fee": "platform_fee",
            },
        ),
    }
    assert (
        UsageRollup.objects.aggregate(e=Sum("errors"))["e"]
        == records.filter(outcome="failed").count()
    )
    assert (
        UsageRollup.objects.aggregate(m=Max("latency_ms_max"))["m"]
        == records.aggregate(m=Max("latency_ms"))["m"]
    )
    per_org = {
        r["organization"]: r["n"]
        for r in UsageRollup.objects.values("organization").annotate(n=Sum("requests"))
    }
    assert per_org == {orgs[0].pk: 15, orgs[1].pk: 15}
    assert {r.hour.minute for r in UsageRollup.objects.all()} == {0}


def test_a_late_record_appears_after_the_next_rebuild_of_its_hour():
    org = factories.organization(credit_usd="1")
    endpoint = factories.endpoint(base_url=BASE_URL)
    record_events([event(org, None, endpoint, NOON + timedelta(minutes=5), 1)])
    rollup_rebuild(start=NOON, end=NOON + timedelta(hours=1))
    record_events([event(org, None, endpoint, NOON + timedelta(minutes=50), 2)])
    call_command("rollups", "--start", "2026-11-20T12:30:00", "--end", "2026-11-20T12:45:00")
    (bucket,) = UsageRollup.objects.all()
    assert (bucket.hour, bucket.requests, bucket.cost) == (NOON, 2, 3_000)
