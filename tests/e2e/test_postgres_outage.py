"""PostgreSQL stopped and restarted under two gateway processes and a Celery ingest worker.

The test owns its PostgreSQL and Redis (so it may stop them); the gateways, the worker and
its beat are real processes. Setup and checks that need Django run in ``manage.py shell``
against that database, the usage count is polled over a plain connection.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import psycopg
import pytest
import redis

from billing.credit import credit_key
from marketplace.devenv import ROOT, EmbeddedRedis
from tests.support.cluster import (
    OwnPostgres,
    child_env,
    run_django,
    start_celery_ingest,
    start_gateway,
    wait_until,
)

SETUP = """
import json
from billing.ledger import organization_balance
from tests import factories
endpoint = factories.endpoint(base_url={base_url!r})
customer = factories.customer(credit_usd="5")
print("RESULT", json.dumps({{
    "key": customer.key,
    "org": customer.organization.pk,
    "model": endpoint.full_slug,
    "balance": organization_balance(customer.organization),
}}))
"""

OUTCOME = """
import json
from billing.ledger import organization_balance
from billing.models import LedgerEntry, UsageRecord
from marketplace.models import Organization
org = Organization.objects.get(pk={org})
records = list(UsageRecord.objects.filter(organization=org).values_list("request_id", "cost"))
print("RESULT", json.dumps({{
    "balance": organization_balance(org),
    "records": records,
    "uncharged": list(
        UsageRecord.objects.filter(organization=org, cost__gt=0, transaction__isnull=True)
        .values_list("request_id", flat=True)
    ),
    "usage_debits": -sum(
        LedgerEntry.objects.filter(
            account__organization=org, transaction__kind="usage"
        ).values_list("amount", flat=True)
    ),
}}))
"""


def _ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def _recorded(database_url: str, org: int) -> int:
    try:
        with psycopg.connect(database_url, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT count(*) FROM billing_usagerecord WHERE organization_id = %s", (org,)
            ).fetchone()
            return int(row[0]) if row else 0
    except psycopg.OperationalError:
        return -1


@pytest.mark.timeout(900)
def test_postgres_down_known_keys_are_served_and_ingest_catches_up(tmp_path, upstream):
    own_redis = EmbeddedRedis(tmp_path / "redis", persistent=False).start()
    database = OwnPostgres().start()
    processes = []
    try:
        database.migrate()
        env = {"DATABASE_URL": database.url, "REDIS_URL": own_redis.url}
        given = run_django(SETUP.format(base_url=upstream.base_url), **env)
        # Short cache lifetimes, so that the outage does hit the key and routing-table
        # reloads (and their fall-back to what was known) rather than hiding behind a TTL.
        fast = {
            "GATEWAY_KEY_CACHE_SECONDS": "1",
            "GATEWAY_SNAPSHOT_REFRESH_SECONDS": "1",
            "GATEWAY_DB_RETRY_SECONDS": "1",
        }
        gateways = [start_gateway(**env, **fast), start_gateway(**env, **fast)]
        processes += gateways
        processes += start_celery_ingest(
            tmp_path, **env, USAGE_INGEST_INTERVAL_SECONDS="0.5", USAGE_CLAIM_IDLE_MS="1000"
        )
        spendable = redis.Redis.from_url(own_redis.url)
        body = {"model": given["model"], "messages": [{"role": "user", "content": "outage"}]}
        succeeded: list[str] = []
        failed: list[int] = []
        lowest = [given["balance"]]

        slowest = [0.0]

        def drive(count: int) -> None:
            for i in range(count):
                sent = time.monotonic()
                with gateways[i % 2].client(given["key"]) as client:
                    response = client.post("/v1/chat/completions", json=body)
                slowest[0] = max(slowest[0], time.monotonic() - sent)
                if response.status_code == 200:
                    succeeded.append(response.json()["id"])
                else:
                    failed.append(response.status_code)
                held = spendable.get(credit_key(given["org"]))
                if held is not None:
                    lowest.append(int(held))

        # Before: traffic flows and is ingested.
        drive(10)
        assert wait_until(lambda: _recorded(database.url, given["org"]) == 10, timeout=60)

        # During: PostgreSQL is away. Known keys keep being served from the caches.
        database.stop()
        stopped = time.monotonic()
        for _ in range(3):
            drive(4)
            time.sleep(1.5)  # past the caches' lifetimes and the pause between database tries
        with httpx.Client(base_url=gateways[0].url, timeout=30) as client:
            ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"].startswith("error")
        assert failed == [], [p.output()[-3000:] for p in processes]
        assert len(succeeded) == 22
        outage = time.monotonic() - stopped

        # After: PostgreSQL comes back; usage of the outage is ingested without help.
        restarted = time.monotonic()
        database.restart()
        assert wait_until(lambda: _recorded(database.url, given["org"]) == 22, timeout=120), [
            p.output()[-3000:] for p in processes
        ]
        caught_up = time.monotonic() - restarted
        # Both replicas report ready again by themselves.
        assert wait_until(lambda: all(_ready(g.url) for g in gateways), timeout=60), [
            httpx.get(f"{g.url}/readyz", timeout=30).text for g in gateways
        ]
        ready_again = time.monotonic() - restarted
        drive(10)
        assert wait_until(lambda: _recorded(database.url, given["org"]) == 32, timeout=60)
        assert failed == []

        outcome = run_django(OUTCOME.format(org=given["org"]), **env)
        recorded = [request_id for request_id, _ in outcome["records"]]
        lost = set(succeeded) - set(recorded)
        assert not lost
        assert sorted(recorded) == sorted(succeeded)  # nothing the client did not see charged
        assert outcome["uncharged"] == []
        charged = sum(cost for _, cost in outcome["records"])
        assert outcome["usage_debits"] == charged  # the ledger debited each record once
        assert outcome["balance"] == given["balance"] - charged >= 0
        assert min(lowest) >= 0
        reconcile = subprocess.run(
            [sys.executable, "manage.py", "reconcile", "--skip-stripe"],
            env=child_env(**env),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
        print(
            f"\npostgres outage: {len(succeeded)} served, {len(lost)} lost, "
            f"lowest spendable {min(lowest)} nano-USD, outage {outage:.1f}s, slowest request "
            f"{slowest[0]:.1f}s, usage caught up {caught_up:.1f}s and both replicas ready "
            f"{ready_again:.1f}s after the restart"
        )
    finally:
        for process in processes:
            process.stop()
        database.close()
        own_redis.stop()
