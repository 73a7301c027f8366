"""Credits and usage in the console: the balance and ledger of the organisation, usage
aggregates (spend, requests, tokens, errors, p50/p95) per day and by key, endpoint and
vendor, a CSV export, and nothing of any other organisation."""

from __future__ import annotations

import csv
import io
import itertools
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import UsageRecord
from billing.money import usd_to_nanos
from billing.services import credit_deduct, credit_grant
from marketplace.models import Membership
from marketplace.selectors import usage_report
from marketplace.services import api_key_create, console_organization_create
from tests import factories

pytestmark = pytest.mark.django_db

_ids = itertools.count(1)


def record(org, *, key=None, endpoint=None, cost=1000, latency=100, outcome="success", ago=0, **kw):  # type: ignore[no-untyped-def]
    return UsageRecord.objects.create(
        request_id=f"req-{next(_ids)}",
        organization=org,
        api_key=key,
        endpoint=endpoint,
        vendor=endpoint.vendor if endpoint else None,
        model_requested="tag:chat",
        prompt_tokens=kw.get("prompt", 10),
        completion_tokens=kw.get("completion", 5),
        price_input=1,
        price_output=1,
        cost=cost,
        latency_ms=latency,
        outcome=outcome,
        occurred_at=timezone.now() - timedelta(days=ago),
    )


@pytest.fixture
def owner(client):  # type: ignore[no-untyped-def]
    user = factories.user()
    org = console_organization_create(actor=user, name="Usage Co")
    client.force_login(user)
    client.user, client.org = user, org
    return client


def test_it_shows_the_balance_and_the_ledger_newest_first(owner):
    credit_grant(organization=owner.org, amount=usd_to_nanos("10"), reason="first grant")
    credit_deduct(organization=owner.org, amount=usd_to_nanos("2.5"), reason="correction")
    other = factories.organization(credit_usd="99")

    response = owner.get(reverse("console:credits", args=[owner.org.slug]))

    page = response.content.decode()
    assert response.status_code == 200
    assert "$7.500000" in page  # the balance
    assert page.index("correction") < page.index("first grant")
    assert "-$2.500000" in page and "+$10.000000" in page
    assert "$99" not in page and other.name not in page
    assert 'data-slot="billing-topup"' in page


def test_it_pages_the_ledger(owner):
    for n in range(30):
        credit_grant(organization=owner.org, amount=usd_to_nanos("1"), reason=f"grant {n}")
    url = reverse("console:credits", args=[owner.org.slug])
    first, second = owner.get(url).content.decode(), owner.get(url + "?page=2").content.decode()
    assert "grant 29" in first and "grant 0" not in first
    assert "grant 0" in second and "Page 2 of 2" in second


def test_a_developer_cannot_open_the_credits_page(owner, client):
    dev = factories.user()
    Membership.objects.create(organization=owner.org, user=dev, role=Membership.Role.DEVELOPER)
    client.force_login(dev)
    assert client.get(reverse("console:credits", args=[owner.org.slug])).status_code == 403
    page = client.get(reverse("console:usage", args=[owner.org.slug])).content.decode()
    assert reverse("console:credits", args=[owner.org.slug]) not in page


def test_it_aggregates_usage_by_day_key_endpoint_and_vendor(owner, upstream):
    key = api_key_create(organization=owner.org, name="prod").api_key
    endpoint = factories.endpoint(base_url=upstream.base_url)
    for latency in (100, 200, 300, 400):
        record(owner.org, key=key, endpoint=endpoint, cost=1_000_000, latency=latency)
    record(owner.org, key=key, endpoint=endpoint, cost=0, latency=1000, outcome="failed", ago=2)
    record(owner.org, cost=5, ago=30)  # outside the default range
    record(factories.organization(), key=None, cost=999_999_999)  # someone else

    today = timezone.now().date()
    report = usage_report(organization=owner.org, start=today - timedelta(days=6), end=today)

    assert report.total.requests == 5 and report.total.errors == 1
    assert report.total.spend == 4_000_000
    assert report.total.tokens == 75
    assert report.total.p50 == pytest.approx(300)
    assert report.total.p95 == pytest.approx(880)
    assert len(report.days) == 7 and report.days[-1][1].requests == 4
    assert report.days[-3][1].errors == 1
    assert [row.label for row in report.by_key] == ["prod"]
    assert report.by_endpoint[0].label == endpoint.full_slug
    assert report.by_vendor[0].label == endpoint.vendor.name

    page = owner.get(reverse("console:usage", args=[owner.org.slug])).content.decode()
    assert "$0.004000" in page and "usage-chart-data" in page
    assert "$0.999999" not in page


def test_it_explains_a_bad_date_range(owner):
    url = reverse("console:usage", args=[owner.org.slug])
    page = owner.get(url + "?start=2026-03-10&end=2026-03-01").content.decode()
    assert "The end date must not be before the start date." in page
    page = owner.get(url + "?start=2025-01-01&end=2026-01-01").content.decode()
    assert "Choose at most 93 days." in page
    page = owner.get(url + "?start=yesterday").content.decode()
    assert "Enter a valid date." in page


def test_it_exports_the_usage_as_csv(owner):
    key = api_key_create(organization=owner.org, name="ci").api_key
    record(owner.org, key=key, cost=123_456_789)
    record(factories.organization(), cost=1)

    response = owner.get(reverse("console:usage-csv", args=[owner.org.slug]))

    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert len(rows) == 1
    assert rows[0]["api_key_name"] == "ci" and rows[0]["cost_usd"] == "0.123456789"


def test_the_csv_of_another_organisation_is_not_found(owner):
    other = factories.organization()
    assert owner.get(reverse("console:usage-csv", args=[other.slug])).status_code == 404
