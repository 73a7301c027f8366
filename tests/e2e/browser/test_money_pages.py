"""Money pages in a real browser: staff refund a request (after confirming) and queue a
settlement; a vendor reads its revenue per month. Screenshots at desktop and phone width."""

from __future__ import annotations

import pytest
from allauth.account.models import EmailAddress
from django.utils import timezone
from playwright.sync_api import expect

from billing import tasks
from billing.connect import connect_account_create, connect_account_sync
from billing.models import Refund
from tests import factories
from tests.billing.test_settlement import BASE_URL, charge
from tests.e2e.browser.test_journeys import PASSWORD, log_in
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe
from vendors.services import portal_vendor_register

pytestmark = pytest.mark.django_db(transaction=True)
stripe_fake = fake_stripe.stripe_fake  # the fixture


def person(email: str, *, staff: bool = False):  # type: ignore[no-untyped-def]
    user = factories.user(email, password=PASSWORD)
    user.is_staff = staff
    user.save()
    EmailAddress.objects.create(user=user, email=email, verified=True, primary=True)
    return user


def test_staff_refund_a_request_and_settle_and_a_vendor_reads_its_revenue(
    browsing, shoot, stripe_fake: FakeStripe
):
    owner = person("owner@vendor.test")
    vendor = portal_vendor_register(actor=owner, name="Revenue Models")
    account = connect_account_create(vendor=vendor)
    stripe_fake.update_account(account.stripe_account_id, payouts_enabled=True)
    connect_account_sync(stripe_account_id=account.stripe_account_id)
    endpoint = factories.endpoint(base_url=BASE_URL, vendor_obj=vendor)
    org = factories.organization(credit_usd="100", name="Refunded Co")
    request_ids = [charge(org, endpoint, cost) for cost in (2_000_000_000, 500_000_000)]
    person("ops@switchyard.test", staff=True)
    today = timezone.now().date().isoformat()

    ops = browsing.new_page()
    log_in(ops, "ops@switchyard.test")
    ops.goto("/ops/refunds/")
    ops.get_by_role("button", name="Review this refund").click()
    expect(ops.get_by_text("This field is required.").first).to_be_visible()
    shoot(ops, "ops-refunds-errors")

    ops.get_by_label("Request id").fill(request_ids[1])
    ops.get_by_label("Reason").first.fill("the answer was cut off")
    ops.get_by_role("button", name="Review this refund").click()
    expect(ops.get_by_role("heading", name="Confirm the refund")).to_be_visible()
    shoot(ops, "ops-refund-confirm")
    ops.get_by_role("button", name="Refund $0.500000").click()
    expect(
        ops.get_by_text(f"Refunded $0.500000 to Refunded Co for {request_ids[1]}.")
    ).to_be_visible()
    expect(ops.get_by_test_id("refunds")).to_contain_text("the answer was cut off")
    shoot(ops, "ops-refunds")
    assert Refund.objects.count() == 1

    ops.goto("/ops/settlements/")
    ops.get_by_label("First day (UTC)").fill(today)
    ops.get_by_label("Last day (UTC, included)").fill(today)
    ops.get_by_role("button", name="Queue the settlement").click()
    expect(ops.get_by_text(f"Settlement for {today}..{today} is queued")).to_be_visible()
    tasks.settlement_period(today, today)  # what the worker does
    ops.reload()
    expect(ops.get_by_test_id("settlement-run")).to_contain_text("Revenue Models")
    expect(ops.get_by_test_id("settlement-run")).to_contain_text("Paid")
    shoot(ops, "ops-settlements")

    seller = browsing.new_page()
    log_in(seller, "owner@vendor.test")
    seller.goto(f"/vendor/{vendor.slug}/")
    seller.get_by_role("link", name="Revenue", exact=True).click()
    periods = seller.get_by_test_id("revenue-periods")
    expect(periods).to_contain_text("$2.5000")  # gross
    expect(periods).to_contain_text("$1.60")  # transferred: 80 % of 2.5 minus the refund's 0.4
    expect(seller.get_by_test_id("payouts")).to_contain_text("Paid")
    shoot(seller, "portal-revenue")
    with seller.expect_download() as download:
        seller.get_by_role("link", name="CSV").first.click()
    assert download.value.suggested_filename.startswith(f"{vendor.slug}-statement-")
