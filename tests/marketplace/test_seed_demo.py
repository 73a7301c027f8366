import io
import json

import pytest
from django.core.management import call_command

from billing.ledger import organization_balance
from billing.money import usd_to_nanos
from marketplace.keys import hash_key
from marketplace.models import ApiKey, Organization
from vendors.models import Endpoint, Vendor

pytestmark = pytest.mark.django_db


def test_it_seeds_a_usable_demo_once_and_refreshes_urls_later(tmp_path):
    creds_file = tmp_path / "demo.json"
    out = io.StringIO()
    call_command(
        "seed_demo",
        "--chat-url",
        "http://127.0.0.1:8101/v1",
        "--weak-url",
        "http://127.0.0.1:8102/v1",
        "--credentials-file",
        str(creds_file),
        stdout=out,
    )

    creds = json.loads(creds_file.read_text())
    assert oct(creds_file.stat().st_mode & 0o777) == "0o600"
    assert creds["customer API key"] in out.getvalue()
    assert (
        ApiKey.objects.get(key_hash=hash_key(creds["customer API key"])).organization.slug == "acme"
    )
    assert organization_balance(Organization.objects.get(slug="acme")) == usd_to_nanos("5")
    assert Vendor.objects.filter(status="approved").count() == 2
    assert Endpoint.objects.filter(status="approved").count() == 2

    again = io.StringIO()
    call_command(
        "seed_demo",
        "--chat-url",
        "http://127.0.0.1:9101/v1",
        "--weak-url",
        "http://127.0.0.1:8102/v1",
        "--credentials-file",
        str(creds_file),
        stdout=again,
    )
    assert "exists already" in again.getvalue()
    assert creds["customer API key"] not in again.getvalue()
    assert Organization.objects.count() == 1
    assert Endpoint.objects.get(slug="smollm2-135m").base_url == "http://127.0.0.1:9101/v1"
