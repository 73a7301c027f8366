"""Operator commands: each does its job, or fails with a clear message, a non-zero exit and
no change at all."""

from __future__ import annotations

import io
import os

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.ledger import organization_balance
from billing.models import LedgerTransaction
from billing.money import usd_to_nanos
from marketplace.keys import hash_key
from marketplace.models import ApiKey, Organization
from vendors.crypto import decrypt_secret
from vendors.models import Endpoint, Vendor

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().strip()


def test_it_builds_a_marketplace_from_the_command_line():
    assert run("create_org", "--name", "Acme Corp") == "acme-corp"
    assert (
        run("credits", "grant", "--org", "acme-corp", "--usd", "12.5", "--reason", "pilot")
        == "acme-corp: $12.500000"
    )
    key = run("create_api_key", "--org", "acme-corp", "--name", "ci")
    assert ApiKey.objects.get(key_hash=hash_key(key)).organization.slug == "acme-corp"
    assert key not in "".join(ApiKey.objects.values_list("prefix", "key_hash").first())

    assert run("create_vendor", "--name", "SQL Experts", "--approve") == "sql-experts (approved)"
    os.environ["TEST_VENDOR_SECRET"] = "s3cret"
    try:
        out = run(
            "create_endpoint",
            "--vendor",
            "sql-experts",
            "--slug",
            "sqlcoder",
            "--url",
            "http://127.0.0.1:9/v1",
            "--upstream-model",
            "sqlcoder-1b",
            "--tags",
            "sql,finance",
            "--capacity",
            "8",
            "--price-input-usd",
            "0.05",
            "--price-output-usd",
            "0.1",
            "--secret-env",
            "TEST_VENDOR_SECRET",
            "--approve",
        )
    finally:
        del os.environ["TEST_VENDOR_SECRET"]
    assert out == "sql-experts/sqlcoder (approved)"
    endpoint = Endpoint.objects.get(slug="sqlcoder")
    assert {t.slug for t in endpoint.tags.all()} == {"sql", "finance"}
    assert endpoint.price_output == usd_to_nanos("0.1") and endpoint.capacity == 8
    assert (
        "s3cret" not in endpoint.secret_encrypted
        and decrypt_secret(endpoint.secret_encrypted) == "s3cret"
    )

    assert (
        run("vendor_status", "suspend", "sql-experts/sqlcoder") == "sql-experts/sqlcoder: suspended"
    )
    assert run("vendor_status", "resume", "sql-experts") == "sql-experts: approved"
    assert (
        run("credits", "deduct", "--org", "acme-corp", "--usd", "2.5", "--reason", "correction")
        == "acme-corp: $10.000000"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("create_org", "--name", "   "),
        ("credits", "grant", "--org", "nobody", "--usd", "1", "--reason", "x"),
        ("credits", "grant", "--org", "known", "--usd", "1.0000000001", "--reason", "x"),
        ("credits", "grant", "--org", "known", "--usd", "-3", "--reason", "x"),
        ("credits", "grant", "--org", "known", "--usd", "3", "--reason", ""),
        ("credits", "deduct", "--org", "known", "--usd", "300", "--reason", "x"),
        ("create_api_key", "--org", "nobody", "--name", "x"),
        ("create_vendor", "--name", "!!!"),
        (
            "create_endpoint",
            "--vendor",
            "nobody",
            "--slug",
            "x",
            "--url",
            "http://127.0.0.1/v1",
            "--upstream-model",
            "m",
            "--price-input-usd",
            "1",
            "--price-output-usd",
            "1",
        ),
        (
            "create_endpoint",
            "--vendor",
            "known-vendor",
            "--slug",
            "x",
            "--url",
            "ftp://127.0.0.1/v1",
            "--upstream-model",
            "m",
            "--price-input-usd",
            "1",
            "--price-output-usd",
            "1",
        ),
        (
            "create_endpoint",
            "--vendor",
            "known-vendor",
            "--slug",
            "x",
            "--url",
            "http://169.254.169.254/latest",
            "--upstream-model",
            "m",
            "--price-input-usd",
            "1",
            "--price-output-usd",
            "1",
        ),
        (
            "create_endpoint",
            "--vendor",
            "known-vendor",
            "--slug",
            "x",
            "--url",
            "http://127.0.0.1/v1",
            "--upstream-model",
            "m",
            "--price-input-usd",
            "1",
            "--price-output-usd",
            "1",
            "--tags",
            "ok,not a tag",
        ),
        (
            "create_endpoint",
            "--vendor",
            "known-vendor",
            "--slug",
            "x",
            "--url",
            "http://127.0.0.1/v1",
            "--upstream-model",
            "m",
            "--price-input-usd",
            "abc",
            "--price-output-usd",
            "1",
        ),
        (
            "create_endpoint",
            "--vendor",
            "known-vendor",
            "--slug",
            "x",
            "--url",
            "http://127.0.0.1/v1",
            "--upstream-model",
            "m",
            "--price-input-usd",
            "1",
            "--price-output-usd",
            "1",
            "--secret-env",
            "SURELY_UNSET_VARIABLE",
        ),
        ("vendor_status", "suspend", "nobody"),
        ("vendor_status", "suspend", "known-vendor/none"),
    ],
)
def test_it_fails_clearly_and_changes_nothing(args):
    run("create_org", "--name", "Known")
    run("credits", "grant", "--org", "known", "--usd", "5", "--reason", "setup")
    run("create_vendor", "--name", "Known Vendor")
    counts = (
        Organization.objects.count(),
        Vendor.objects.count(),
        Endpoint.objects.count(),
        ApiKey.objects.count(),
        LedgerTransaction.objects.count(),
    )

    with pytest.raises(CommandError) as error:
        call_command(*args, stdout=io.StringIO())

    assert str(error.value)
    assert counts == (
        Organization.objects.count(),
        Vendor.objects.count(),
        Endpoint.objects.count(),
        ApiKey.objects.count(),
        LedgerTransaction.objects.count(),
    )
    assert organization_balance(Organization.objects.get(slug="known")) == usd_to_nanos("5")


def test_a_failing_command_exits_non_zero_from_the_shell(settings):
    import subprocess
    import sys
    from urllib.parse import urlencode

    db = settings.DATABASES["default"]
    query = urlencode({k: v for k, v in (("host", db["HOST"]), ("port", db["PORT"])) if v})
    url = f"postgresql://{db['USER']}:{db['PASSWORD']}@/{db['NAME']}?{query}"
    result = subprocess.run(
        [sys.executable, "manage.py", "create_api_key", "--org", "nobody", "--name", "x"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DATABASE_URL": url},
    )
    assert result.returncode != 0
    assert "no organisation with the slug 'nobody'" in result.stderr
