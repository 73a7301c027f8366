"""The vendor portal's team and payouts pages in a real browser:

* the owner of a vendor sets up payouts: Stripe's hosted onboarding (the fake's stand-in
  page), leaving it unfinished, resuming it (a used link goes through our refresh URL),
  finishing it; Stripe's signed ``account.updated`` reaches our Connect webhook and the
  browser comes back to "Payouts enabled";
* the owner invites a developer by email; the invitee, in a browser of their own, opens
  the emailed link, signs in, accepts and lands on the vendor's dashboard.

Screenshots at desktop and phone width are in ``var/screenshots/``.
"""

from __future__ import annotations

import re

import pytest
from django.core import mail
from playwright.sync_api import expect

from billing.models import StripeEvent, VendorPayoutAccount
from billing.webhooks import stripe_event_process
from tests.e2e.browser.test_journeys import PASSWORD, log_in
from tests.e2e.browser.test_money_pages import person
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe
from vendors.models import VendorMembership
from vendors.services import portal_vendor_register

pytestmark = pytest.mark.django_db(transaction=True)
stripe_fake = fake_stripe.stripe_fake  # the fixture


def test_a_vendor_owner_sets_up_payouts_on_stripe_and_comes_back_enabled(
    browsing, shoot, live_app, stripe_fake: FakeStripe
):
    owner = person("owner@payouts.test")
    vendor = portal_vendor_register(actor=owner, name="Payout Models")
    stripe_fake.set_connect_webhook_url(f"{live_app.url}/billing/webhooks/stripe-connect")
    page = browsing.new_page()
    log_in(page, "owner@payouts.test")

    page.goto(f"/vendor/{vendor.slug}/")
    expect(page.get_by_text("Payouts are not enabled yet")).to_be_visible()
    page.get_by_role("navigation", name="Vendor portal").get_by_role("link", name="Payouts").click()
    status = page.get_by_test_id("payout-status")
    expect(status).to_contain_text("No payout account yet")
    shoot(page, "portal-payouts-none")

    # Off to Stripe; leave without finishing: back on our page, Stripe still needs details.
    page.get_by_role("button", name="Set up payouts").click()
    expect(page.get_by_role("heading", name="Set up payouts for Payout Models")).to_be_visible()
    account = VendorPayoutAccount.objects.get(vendor=vendor)
    assert page.url.startswith(f"{stripe_fake.url}/connect/setup/e/{account.stripe_account_id}/")
    shoot(page, "stripe-onboarding")
    page.get_by_role("link", name="Return without finishing").click()
    expect(page.get_by_text("Onboarding is not finished: Stripe still needs")).to_be_visible()
    assert page.url == f"{live_app.url}/vendor/{vendor.slug}/payouts/"
    expect(status).to_contain_text("Onboarding incomplete")
    expect(page.get_by_test_id("requirements-due")).to_contain_text(
        "A bank account to receive payouts"
    )
    shoot(page, "portal-payouts-incomplete")

    # Resume; reloading Stripe's page (a used link) goes through our refresh URL to a new one.
    page.get_by_role("button", name="Resume onboarding").click()
    expect(page.get_by_role("heading", name="Set up payouts for Payout Models")).to_be_visible()
    used = page.url
    page.reload()
    expect(page.get_by_role("heading", name="Set up payouts for Payout Models")).to_be_visible()
    assert page.url != used and page.url.startswith(f"{stripe_fake.url}/connect/setup/e/")

    # Finish: Stripe posts the signed account.updated to our Connect webhook, then the
    # browser comes back to the return URL, which reads the account from Stripe.
    page.get_by_role("button", name="Agree and submit").click()
    expect(page.get_by_text("Payouts are enabled: your earnings are transferred")).to_be_visible()
    assert page.url == f"{live_app.url}/vendor/{vendor.slug}/payouts/"
    expect(status).to_contain_text("Payouts enabled")
    expect(status).to_contain_text(account.stripe_account_id)
    expect(page.get_by_role("button", name="Resume onboarding")).to_have_count(0)
    shoot(page, "portal-payouts-enabled")

    ((event_id, delivered),) = stripe_fake.webhook_deliveries
    assert delivered == 200
    event = StripeEvent.objects.get(event_id=event_id)
    assert (event.source, event.type, event.account) == (
        "connect",
        "account.updated",
        account.stripe_account_id,
    )
    assert stripe_event_process(event_id=event_id) == "processed"  # what the worker does
    account.refresh_from_db()
    assert account.payouts_enabled is True and account.requirements_due == []

    page.goto(f"/vendor/{vendor.slug}/")
    expect(page.get_by_text("Payouts are not enabled yet")).to_have_count(0)
    page.get_by_role("link", name="Revenue", exact=True).click()
    transfers = page.locator("p", has_text="Transfers go to your Stripe account")
    expect(transfers).to_contain_text(account.stripe_account_id)


def test_an_owner_invites_a_developer_who_accepts_in_another_browser(browsing, shoot, live_app):
    owner = person("owner@team.test")
    vendor = portal_vendor_register(actor=owner, name="Team Models")
    person("dev@team.test")

    page = browsing.new_page()
    log_in(page, "owner@team.test")
    page.goto(f"/vendor/{vendor.slug}/")
    page.get_by_role("navigation", name="Vendor portal").get_by_role("link", name="Members").click()
    page.get_by_label("Email address").fill("not an address")
    page.get_by_role("button", name="Send invitation").click()
    expect(page.locator("#id_email_error")).to_contain_text("Enter a valid email address.")
    assert page.get_by_label("Email address").get_attribute("aria-invalid") == "true"
    shoot(page, "portal-members-errors")

    page.get_by_label("Email address").fill("dev@team.test")
    page.get_by_label("Role", exact=True).select_option("developer")
    page.get_by_role("button", name="Send invitation").click()
    expect(page.get_by_text("Invitation sent to dev@team.test.")).to_be_visible()
    expect(page.get_by_test_id("open-invitations")).to_contain_text("dev@team.test")
    shoot(page, "portal-members")

    message = next(m for m in reversed(mail.outbox) if "dev@team.test" in m.to)
    assert "Team Models" in message.subject
    link = re.search(r"https?://\S+/vendor/invitations/\S+/", message.body).group(0)
    assert link.startswith(live_app.url)

    # The invitee, in a browser of their own, opens the link, signs in and accepts.
    invitee = browsing.new_page()
    invitee.goto(link)
    assert "/accounts/login/?next=/vendor/invitations/" in invitee.url
    invitee.get_by_label("Email").fill("dev@team.test")
    invitee.get_by_label("Password", exact=True).fill(PASSWORD)
    invitee.get_by_role("button", name="Sign In").click()
    expect(invitee.get_by_role("heading", name="Join Team Models")).to_be_visible()
    expect(invitee.get_by_text("as developer")).to_be_visible()
    shoot(invitee, "vendor-invitation")
    invitee.get_by_role("button", name="Accept and join").click()
    expect(invitee.get_by_text("Welcome to Team Models.")).to_be_visible()
    expect(invitee.get_by_role("heading", name="Team Models", exact=True)).to_be_visible()
    assert invitee.url == f"{live_app.url}/vendor/{vendor.slug}/"
    shoot(invitee, "vendor-invitation-accepted")
    membership = VendorMembership.objects.get(vendor=vendor, user__email="dev@team.test")
    assert membership.role == VendorMembership.Role.DEVELOPER

    # The link worked once; the developer sees the team but cannot invite.
    invitee.goto(link)
    expect(invitee.get_by_text("You are a member of Team Models.")).to_be_visible()
    invitee.goto(f"/vendor/{vendor.slug}/members/")
    expect(invitee.get_by_test_id("members")).to_contain_text("owner@team.test")
    expect(invitee.get_by_role("heading", name="Invite someone")).to_have_count(0)
    shoot(invitee, "portal-members-developer")

    page.reload()
    expect(page.get_by_test_id("members")).to_contain_text("dev@team.test")
    expect(page.get_by_text("No open invitations.")).to_be_visible()
