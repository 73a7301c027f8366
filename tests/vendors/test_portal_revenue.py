"""The vendor portal's revenue page: per month, what customers paid, the platform fee, the
net earned, refunds and Stripe transfers, from the ledger; a CSV statement per month."""

from __future__ import annotations

import csv
import io

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.connect import connect_account_create, connect_account_sync
from billing.money import format_usd_plain
from billing.refunds import refund_usage
from billing.settlement import settlement_run
from tests import factories
from tests.billing.test_settlement import BASE_URL, charge, share
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe
from vendors.models import VendorMembership
from vendors.services import portal_vendor_register

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture


@pytest.fixture
def earning_vendor(client, stripe_fake: FakeStripe):  # type: ignore[no-untyped-def]
    """A vendor owner signed in, whose endpoint served three requests, one refunded, and
    who was paid today's earnings."""
    user = factories.user()
    vendor = portal_vendor_register(actor=user, name="Revenue Makers")
    account = connect_account_create(vendor=vendor)
    stripe_fake.update_account(account.stripe_account_id, payouts_enabled=True)
    connect_account_sync(stripe_account_id=account.stripe_account_id)
    endpoint = factories.endpoint(base_url=BASE_URL, vendor_obj=vendor)
    org = factories.organization(credit_usd="100")
    charge(org, endpoint, 2_000_000_000)
    charge(org, endpoint, 1_000_000_000)
    refunded = charge(org, endpoint, 500_000_000)
    refund_usage(request_id=refunded, reason="bad answer")
    today = timezone.now().date()
    settlement_run(period_start=today, period_end=today)
    client.force_login(user)
    client.user, client.vendor = user, vendor
    return client


def test_it_lists_the_month_with_gross_fee_net_refunds_and_transfers(earning_vendor):
    vendor = earning_vendor.vendor
    response = earning_vendor.get(reverse("portal:revenue", args=[vendor.slug]))

    assert response.status_code == 200
    period = response.context["periods"][0]
    assert period.start == timezone.now().date().replace(day=1)
    assert period.requests == 3
    assert period.gross == 3_500_000_000
    assert period.net == share(2_000_000_000) + share(1_000_000_000) + share(500_000_000)
    assert period.fee == period.gross - period.net
    assert period.refunds == -share(500_000_000)
    assert period.transfers == 2_400_000_000  # the net after the refund, in whole cents
    assert period.closing == period.opening + period.net + period.refunds - period.transfers
    html = response.content.decode()
    assert "$3.5000" in html and "$2.40" in html
    assert "Paid" in html
    month = period.start.strftime("%Y-%m")
    assert reverse("portal:revenue-csv", args=[vendor.slug, month]) in html


def test_it_downloads_the_months_statement_as_csv(earning_vendor):
    vendor = earning_vendor.vendor
    month = timezone.now().date().strftime("%Y-%m")
    response = earning_vendor.get(reverse("portal:revenue-csv", args=[vendor.slug, month]))

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert f"{vendor.slug}-statement-{month}.csv" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    types = [row["type"] for row in rows]
    assert types[0] == "opening_balance" and types[-1] == "closing_balance"
    assert {"usage", "refund", "payout"} <= set(types)
    payout = next(row for row in rows if row["type"] == "payout")
    assert payout["net_usd"] == format_usd_plain(-2_400_000_000)


def test_it_refuses_a_malformed_month_and_other_vendors(earning_vendor, client):
    vendor = earning_vendor.vendor
    bad = earning_vendor.get(reverse("portal:revenue-csv", args=[vendor.slug, "2026-13"]))
    assert bad.status_code == 404

    stranger = factories.user()
    client.force_login(stranger)
    assert client.get(reverse("portal:revenue", args=[vendor.slug])).status_code == 404


def test_a_developer_of_the_vendor_does_not_see_its_revenue(earning_vendor, client):
    vendor = earning_vendor.vendor
    developer = factories.user()
    VendorMembership.objects.create(
        vendor=vendor, user=developer, role=VendorMembership.Role.DEVELOPER
    )
    client.force_login(developer)
    assert client.get(reverse("portal:revenue", args=[vendor.slug])).status_code == 403
    month = timezone.now().date().strftime("%Y-%m")
    csv_url = reverse("portal:revenue-csv", args=[vendor.slug, month])
    assert client.get(csv_url).status_code == 403
