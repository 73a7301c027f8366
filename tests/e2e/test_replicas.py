"""Two gateway processes share capacity, credit holds and key revocation through Redis;
a usage consumer killed mid-batch loses and doubles nothing."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
from django.db.models import Sum

from billing.credit import USAGE_GROUP, USAGE_STREAM, credit_key
from billing.ledger import organization_balance
from billing.models import LedgerEntry, UsageRecord
from billing.money import usd_to_nanos
from billing.usage import ensure_group
from marketplace.models import ApiKey
from marketplace.redis_client import sync_client
from marketplace.services import api_key_revoke
from tests import factories
from tests.conftest import ingest_all
from tests.support.cluster import start_gateway, start_ingest_consumer, wait_until


def assert_reconciled() -> None:
    """manage.py reconcile finds no mismatch (raises CommandError, exit 1, on any)."""
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command("reconcile", "--skip-stripe", stdout=out)
    assert "no mismatch" in out.getvalue()


pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "share the load"}]


@pytest.fixture
def replicas():  # type: ignore[no-untyped-def]
    started = [start_gateway(), start_gateway()]
    yield started
    for replica in started:
        replica.stop()


def _burst(replicas, key: str, body: dict, count: int) -> list[int]:  # type: ignore[no-untyped-def]
    def one(i: int) -> int:
        with replicas[i % 2].client(key) as client:
            return client.post("/v1/chat/completions", json=body).status_code

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_two_replicas_never_exceed_the_endpoints_capacity_together(replicas, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url, capacity=2)
    customer = factories.customer(credit_usd="100")
    upstream.set_delay(400)

    statuses = _burst(
        replicas, customer.key, {"model": endpoint.full_slug, "messages": MESSAGES}, 12
    )

    assert upstream.stats()["max_in_flight"] <= 2
    assert statuses.count(200) >= 2
    assert set(statuses) <= {200, 503}
    assert 503 in statuses
    ingest_all()
    assert_reconciled()


def test_a_small_balance_never_goes_below_zero_under_a_burst_on_two_replicas(replicas, upstream):
    # Each request holds about 0.0004 USD (prompt bound + 8 tokens at 10/20 USD per 1M
    # tokens); the balance covers a handful of them, the burst asks for 40.
    endpoint = factories.endpoint(
        base_url=upstream.base_url, capacity=100, price_input_usd="10", price_output_usd="20"
    )
    customer = factories.customer(credit_usd="0.002")
    start = organization_balance(customer.organization)
    upstream.set_delay(200)
    body = {"model": endpoint.full_slug, "messages": MESSAGES, "max_tokens": 8}

    statuses = _burst(replicas, customer.key, body, 40)

    assert set(statuses) <= {200, 402}
    assert 402 in statuses and 200 in statuses
    ingest_all()
    charged = UsageRecord.objects.filter(organization=customer.organization).aggregate(
        total=Sum("cost")
    )["total"]
    assert UsageRecord.objects.filter(organization=customer.organization).count() == statuses.count(
        200
    )
    assert organization_balance(customer.organization) == start - charged >= 0
    assert int(sync_client().get(credit_key(customer.organization.pk))) >= 0
    assert_reconciled()


def test_a_key_revoked_through_one_replica_is_refused_by_the_other(replicas, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    body = {"model": endpoint.full_slug, "messages": MESSAGES}
    for replica in replicas:  # both replicas have the key in their caches now
        with replica.client(customer.key) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200

    api_key_revoke(api_key=ApiKey.objects.get(organization=customer.organization))
    revoked_at = time.monotonic()

    def refused_everywhere() -> bool:
        codes = []
        for replica in replicas:
            with replica.client(customer.key) as client:
                codes.append(client.post("/v1/chat/completions", json=body).status_code)
        return codes == [401, 401]

    assert wait_until(refused_everywhere, timeout=10)
    # Pushed over pub/sub, not waiting for the 60 s key cache: the note records the time.
    assert time.monotonic() - revoked_at < 10


def _fill_stream(org, endpoint, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    client = sync_client()
    ensure_group(client)
    ids = []
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        rid = f"gen-crash-{i:06d}"
        ids.append(rid)
        event = {
            "rid": rid,
            "org": org.pk,
            "key": None,
            "ep": endpoint.pk,
            "vendor": endpoint.vendor_id,
            "model": endpoint.full_slug,
            "pt": 10,
            "ct": 5,
            "pin": 1000,
            "pout": 2000,
            "cost": 20,
            "ms": 3,
            "att": 1,
            "out": "success",
            "stream": False,
            "at": time.time_ns() // 1_000_000,
        }
        pipe.xadd(USAGE_STREAM, {"e": orjson.dumps(event)})
    pipe.execute()
    return ids


def test_a_consumer_killed_mid_batch_loses_nothing_and_charges_nothing_twice(upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    org = factories.organization(credit_usd="100")
    before = organization_balance(org)
    ids = _fill_stream(org, endpoint, 6000)

    crashed = start_ingest_consumer("doomed")
    # Kill it while it holds read-but-unacknowledged entries (mid-batch).
    assert wait_until(
        lambda: sync_client().xpending(USAGE_STREAM, USAGE_GROUP)["pending"] > 0, timeout=60
    ), crashed.output()
    crashed.kill()
    assert sync_client().xpending(USAGE_STREAM, USAGE_GROUP)["pending"] > 0

    survivor = start_ingest_consumer("survivor", USAGE_CLAIM_IDLE_MS="200")
    try:
        assert wait_until(
            lambda: (
                UsageRecord.objects.filter(request_id__startswith="gen-crash-").count() == len(ids)
                and sync_client().xpending(USAGE_STREAM, USAGE_GROUP)["pending"] == 0
            ),
            timeout=120,
        ), survivor.output()
    finally:
        survivor.stop()

    recorded = list(
        UsageRecord.objects.filter(request_id__startswith="gen-crash-").values_list(
            "request_id", flat=True
        )
    )
    assert sorted(recorded) == ids  # every event once, none twice
    assert not UsageRecord.objects.filter(
        request_id__startswith="gen-crash-", transaction__isnull=True
    ).exists()  # each charged, by its batch's usage posting (reconcile checks the legs)
    assert organization_balance(org) == before - 20 * len(ids)
    assert LedgerEntry.objects.aggregate(total=Sum("amount"))["total"] == 0
    assert usd_to_nanos("100") - 20 * len(ids) == organization_balance(org)
    assert_reconciled()


def test_a_celery_ingest_worker_stopped_with_sigterm_finishes_its_batch_first(upstream, tmp_path):
    import signal

    from tests.support.cluster import start_celery_ingest

    endpoint = factories.endpoint(base_url=upstream.base_url)
    org = factories.organization(credit_usd="100")
    before = organization_balance(org)
    ids = _fill_stream(org, endpoint, 6000)

    worker, beat = start_celery_ingest(tmp_path)
    try:
        # SIGTERM while the worker holds read-but-unacknowledged entries (mid-batch).
        assert wait_until(
            lambda: sync_client().xpending(USAGE_STREAM, USAGE_GROUP)["pending"] > 0, timeout=60
        ), worker.output()
        beat.stop()
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        worker.process.wait(60)
        # Warm: the batch it held was committed and acknowledged before it left.
        assert sync_client().xpending(USAGE_STREAM, USAGE_GROUP)["pending"] == 0, worker.output()
        assert UsageRecord.objects.filter(request_id__startswith="gen-crash-").exists()
    finally:
        beat.stop()
        worker.stop()

    ingest_all()  # the next worker takes the rest
    recorded = list(
        UsageRecord.objects.filter(request_id__startswith="gen-crash-").values_list(
            "request_id", flat=True
        )
    )
    assert sorted(recorded) == ids  # every event once, none twice
    assert organization_balance(org) == before - 20 * len(ids)
    assert_reconciled()
