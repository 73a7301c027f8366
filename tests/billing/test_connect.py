"""Vendors' Stripe Connect accounts: created once, onboarding links, status from webhooks."""

from __future__ import annotations

import pytest

from billing import stripe_gateway
from billing.connect import (
    connect_account_create,
    connect_onboarding_link,
    connect_onboarding_start,
)
from billing.errors import PayoutPermissionError
from billing.models import StripeEvent, VendorPayoutAccount
from billing.webhooks import stripe_event_process
from marketplace.models import AuditLogEntry
from tests import factories
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe
from vendors.models import VendorMembership
from vendors.services import portal_vendor_register

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture


def test_it_creates_one_express_account_per_vendor(stripe_fake: FakeStripe):
    vendor = factories.vendor()
    first = connect_account_create(vendor=vendor)
    again = connect_account_create(vendor=vendor)
    assert first.stripe_account_id == again.stripe_account_id
    assert first.stripe_account_id.startswith("acct_")
    (call,) = stripe_fake.calls("POST", "/v1/accounts")
    assert call.idempotency_key == f"connect-account:{vendor.pk}"
    assert call.params["type"] == "express"
    assert call.params["capabilities"] == {"transfers": {"requested": "true"}}
    assert (first.payouts_enabled, first.details_submitted) == (False, False)
    assert "external_account" in first.requirements_due


def test_it_finds_the_account_stripe_created_before_a_crash(stripe_fake: FakeStripe):
    vendor = factories.vendor()
    # Stripe created the account but we never stored its id (the worker died).
    remote = stripe_gateway.account_create(
        email=None,
        business_name=vendor.name,
        metadata={"vendor_id": vendor.pk, "vendor_slug": vendor.slug},
        idempotency_key=f"connect-account:{vendor.pk}",
    )
    assert connect_account_create(vendor=vendor).stripe_account_id == remote["id"]
    assert len(stripe_fake.objects("account")) == 1


def test_it_makes_an_onboarding_link(stripe_fake: FakeStripe):
    vendor = factories.vendor()
    url = connect_onboarding_link(
        vendor=vendor,
        refresh_url="https://app.example.test/vendor/payouts/refresh",
        return_url="https://app.example.test/vendor/payouts/done",
    )
    account = VendorPayoutAccount.objects.get(vendor=vendor)
    assert url.startswith(f"{stripe_fake.url}/connect/setup/")
    (call,) = stripe_fake.calls("POST", "/v1/account_links")
    assert call.params["account"] == account.stripe_account_id
    assert call.params["type"] == "account_onboarding"
    assert call.idempotency_key.startswith(f"connect-link:{vendor.pk}:")


def test_the_connect_webhook_copies_the_payout_status_from_stripe(stripe_fake: FakeStripe, client):
    vendor = factories.vendor()
    account = connect_account_create(vendor=vendor)
    stripe_fake.update_account(account.stripe_account_id, payouts_enabled=True)
    event = stripe_fake.event(
        "account.updated", account.stripe_account_id, account=account.stripe_account_id
    )
    # Signed with the platform secret, a Connect event is refused.
    assert (
        stripe_fake.deliver(
            client, event, connect=True, secret=stripe_fake.webhook_secret
        ).status_code
        == 400
    )
    assert stripe_fake.deliver(client, event, connect=True).status_code == 200
    assert stripe_event_process(event_id=event["id"]) == "processed"
    account.refresh_from_db()
    assert (account.payouts_enabled, account.details_submitted) == (True, True)
    assert account.requirements_due == []
    assert StripeEvent.objects.get(event_id=event["id"]).account == account.stripe_account_id

    stripe_fake.update_account(
        account.stripe_account_id, payouts_enabled=False, details_submitted=True
    )
    later = stripe_fake.event(
        "account.updated", account.stripe_account_id, account=account.stripe_account_id
    )
    stripe_fake.deliver(client, later, connect=True)
    stripe_event_process(event_id=later["id"])
    account.refresh_from_db()
    assert account.payouts_enabled is False


def test_a_fresh_link_is_never_the_replay_of_a_used_one(stripe_fake: FakeStripe):
    vendor = factories.vendor()
    urls = dict(refresh_url="https://app.example.test/r", return_url="https://app.example.test/d")
    first = connect_onboarding_link(vendor=vendor, **urls)
    fresh = [connect_onboarding_link(vendor=vendor, fresh=True, **urls) for _ in range(2)]
    assert len({first, *fresh}) == 3
    keys = [call.idempotency_key for call in stripe_fake.calls("POST", "/v1/account_links")]
    assert len(set(keys)) == 3


def test_only_owners_and_admins_start_onboarding_and_it_is_audited(stripe_fake: FakeStripe):
    owner = factories.user()
    vendor = portal_vendor_register(actor=owner, name="Onboarded")
    developer = factories.user()
    VendorMembership.objects.create(
        vendor=vendor, user=developer, role=VendorMembership.Role.DEVELOPER
    )
    urls = dict(refresh_url="https://app.example.test/r", return_url="https://app.example.test/d")
    for outsider in (developer, factories.user()):
        with pytest.raises(PayoutPermissionError):
            connect_onboarding_start(actor=outsider, vendor=vendor, **urls)
    assert stripe_fake.requests == []

    url = connect_onboarding_start(actor=owner, vendor=vendor, **urls)

    account = VendorPayoutAccount.objects.get(vendor=vendor)
    assert url.startswith(f"{stripe_fake.url}/connect/setup/e/{account.stripe_account_id}/")
    entry = AuditLogEntry.objects.get(action="payouts.onboarding")
    assert entry.actor == owner and entry.target_id == str(account.pk)
