"""The vendor portal's payouts page: the Stripe Connect status (no account yet, onboarding
incomplete with what Stripe still needs, payouts enabled); owners and admins start or
resume onboarding on Stripe and come back; developers see the status; Stripe's failures
are a message on the page, never an error page."""

from __future__ import annotations

import pytest
from django.urls import reverse

from billing.connect import connect_account_create, connect_account_sync
from billing.models import VendorPayoutAccount
from marketplace.models import AuditLogEntry
from tests import factories
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe
from vendors.models import VendorMembership
from vendors.services import portal_vendor_register

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture


@pytest.fixture
def owner(client, stripe_fake: FakeStripe):  # type: ignore[no-untyped-def]
    """The signed-in owner of a vendor without a payout account."""
    user = factories.user("owner@vendor.test")
    client.vendor = portal_vendor_register(actor=user, name="Paid Models")
    client.user = user
    client.force_login(user)
    return client


def url(name: str, vendor) -> str:  # type: ignore[no-untyped-def]
    return reverse(f"portal:{name}", args=[vendor.slug])


def page(client, vendor) -> str:  # type: ignore[no-untyped-def]
    response = client.get(url("payouts", vendor))
    assert response.status_code == 200
    return response.content.decode()


def as_member(client, vendor, role):  # type: ignore[no-untyped-def]
    user = factories.user()
    VendorMembership.objects.create(vendor=vendor, user=user, role=role)
    client.force_login(user)
    return user


def test_without_an_account_it_offers_to_set_up_payouts(owner, stripe_fake: FakeStripe):
    html = page(owner, owner.vendor)
    assert "No payout account yet" in html
    assert "Set up payouts</button>" in html
    assert f'action="{url("payouts-start", owner.vendor)}"' in html
    assert stripe_fake.requests == []  # showing the page asks Stripe nothing


def test_the_dashboard_the_navigation_and_the_revenue_page_link_to_it(owner):
    payouts = f'href="{url("payouts", owner.vendor)}"'
    dashboard = owner.get(url("dashboard", owner.vendor)).content.decode()
    assert payouts in dashboard and "Payouts are not enabled yet" in dashboard
    revenue = owner.get(url("revenue", owner.vendor)).content.decode()
    assert payouts in revenue and "Payouts are not enabled yet" in revenue


def test_set_up_payouts_creates_the_account_and_sends_the_browser_to_stripe(
    owner, stripe_fake: FakeStripe
):
    response = owner.post(url("payouts-start", owner.vendor))

    account = VendorPayoutAccount.objects.get(vendor=owner.vendor)
    assert account.stripe_account_id and account.payouts_enabled is False
    assert response.status_code == 302
    assert response["Location"].startswith(
        f"{stripe_fake.url}/connect/setup/e/{account.stripe_account_id}/"
    )
    (link,) = stripe_fake.calls("POST", "/v1/account_links")
    assert link.params["refresh_url"] == "http://testserver" + url("payouts-refresh", owner.vendor)
    assert link.params["return_url"] == "http://testserver" + url("payouts-return", owner.vendor)
    entry = AuditLogEntry.objects.get(action="payouts.onboarding")
    assert entry.actor == owner.user
    assert entry.target_type == "billing.vendorpayoutaccount"
    assert entry.details == {
        "vendor": owner.vendor.slug,
        "account": account.stripe_account_id,
        "account_created": True,
        "refreshed": False,
    }


def test_an_unfinished_onboarding_shows_what_stripe_needs_and_resumes(
    owner, stripe_fake: FakeStripe
):
    account = connect_account_create(vendor=owner.vendor)

    html = page(owner, owner.vendor)
    assert "Onboarding incomplete" in html
    assert "A bank account to receive payouts" in html
    assert "Acceptance of Stripe&#x27;s services agreement" in html
    assert "Resume onboarding</button>" in html

    response = owner.post(url("payouts-start", owner.vendor))
    assert response.status_code == 302 and account.stripe_account_id in response["Location"]
    assert len(stripe_fake.calls("POST", "/v1/accounts")) == 1  # the same account resumed
    assert AuditLogEntry.objects.get(action="payouts.onboarding").details["account_created"] is (
        False
    )


def test_enabled_payouts_are_shown_without_an_onboarding_button(owner, stripe_fake: FakeStripe):
    account = connect_account_create(vendor=owner.vendor)
    stripe_fake.update_account(account.stripe_account_id, payouts_enabled=True)
    connect_account_sync(stripe_account_id=account.stripe_account_id)

    html = page(owner, owner.vendor)
    assert "Payouts enabled" in html and account.stripe_account_id in html
    assert "Resume onboarding" not in html and "Set up payouts</button>" not in html
    dashboard = owner.get(url("dashboard", owner.vendor)).content.decode()
    assert "Payouts are not enabled yet" not in dashboard


def test_the_return_url_reads_the_account_from_stripe_and_says_so(owner, stripe_fake: FakeStripe):
    account = connect_account_create(vendor=owner.vendor)
    stripe_fake.update_account(account.stripe_account_id, payouts_enabled=True)
    # No webhook has arrived yet: we still think onboarding is unfinished.
    assert "Onboarding incomplete" in page(owner, owner.vendor)

    response = owner.get(url("payouts-return", owner.vendor), follow=True)

    html = response.content.decode()
    assert response.redirect_chain == [(url("payouts", owner.vendor), 302)]
    assert "Payouts are enabled: your earnings are transferred" in html
    assert "Payouts enabled" in html
    account.refresh_from_db()
    assert account.payouts_enabled is True


def test_the_return_url_after_leaving_onboarding_unfinished(owner, stripe_fake: FakeStripe):
    connect_account_create(vendor=owner.vendor)
    html = owner.get(url("payouts-return", owner.vendor), follow=True).content.decode()
    assert "Onboarding is not finished: Stripe still needs the details listed below." in html
    assert "A bank account to receive payouts" in html
    assert len(stripe_fake.calls("GET", r"/v1/accounts/acct_\w+")) == 1


def test_the_refresh_url_makes_a_new_link_every_time(owner, stripe_fake: FakeStripe):
    """Stripe sends the browser to refresh_url when a link was used or expired: a replay of
    the same (used) link would send it straight back, in a loop."""
    first = owner.post(url("payouts-start", owner.vendor))["Location"]
    again = owner.get(url("payouts-refresh", owner.vendor))
    third = owner.get(url("payouts-refresh", owner.vendor))

    assert again.status_code == third.status_code == 302
    assert len({first, again["Location"], third["Location"]}) == 3
    assert len(stripe_fake.calls("POST", "/v1/accounts")) == 1
    refreshed = AuditLogEntry.objects.filter(action="payouts.onboarding", details__refreshed=True)
    assert refreshed.count() == 2


def test_the_refresh_url_never_creates_the_account(owner, stripe_fake: FakeStripe):
    """Stripe redirects the browser there with a GET: only the button's POST creates."""
    response = owner.get(url("payouts-refresh", owner.vendor))
    assert response.status_code == 302 and response["Location"] == url("payouts", owner.vendor)
    assert stripe_fake.requests == []
    assert not VendorPayoutAccount.objects.exists()


def test_a_developer_sees_the_status_but_cannot_onboard(owner, client, stripe_fake):
    as_member(client, owner.vendor, VendorMembership.Role.DEVELOPER)
    html = page(client, owner.vendor)
    assert "No payout account yet" in html
    assert "Only owners and admins of Paid Models can set up payouts." in html
    assert "Set up payouts</button>" not in html

    assert client.post(url("payouts-start", owner.vendor)).status_code == 403
    assert client.get(url("payouts-refresh", owner.vendor)).status_code == 403
    assert stripe_fake.requests == []
    assert not VendorPayoutAccount.objects.exists()
    assert not AuditLogEntry.objects.filter(action="payouts.onboarding").exists()


def test_an_admin_may_onboard(owner, client, stripe_fake):
    as_member(client, owner.vendor, VendorMembership.Role.ADMIN)
    assert "Set up payouts</button>" in page(client, owner.vendor)
    response = client.post(url("payouts-start", owner.vendor))
    assert response["Location"].startswith(f"{stripe_fake.url}/connect/setup/")


def test_a_stranger_gets_not_found(owner, client, stripe_fake):
    client.force_login(factories.user())
    for name in ("payouts", "payouts-refresh", "payouts-return"):
        assert client.get(url(name, owner.vendor)).status_code == 404
    assert client.post(url("payouts-start", owner.vendor)).status_code == 404
    assert stripe_fake.requests == []


def test_the_button_only_posts(owner, stripe_fake):
    assert owner.get(url("payouts-start", owner.vendor)).status_code == 405
    assert stripe_fake.requests == []


@pytest.fixture
def stripe_down(settings):  # type: ignore[no-untyped-def]
    """Stripe refuses every call (a revoked API key answers 401)."""
    settings.STRIPE_SECRET_KEY = "sk_test_revoked"


def test_stripe_refusing_to_start_is_a_message_not_an_error(owner, stripe_down, stripe_fake):
    response = owner.post(url("payouts-start", owner.vendor), follow=True)

    assert response.status_code == 200
    assert response.redirect_chain == [(url("payouts", owner.vendor), 302)]
    html = response.content.decode()
    assert "Stripe could not start the onboarding just now, so nothing changed." in html
    assert "sk_test" not in html
    assert not AuditLogEntry.objects.filter(action="payouts.onboarding").exists()
    assert not VendorPayoutAccount.objects.exclude(stripe_account_id=None).exists()
    assert "No payout account yet" in html


def test_stripe_refusing_a_new_link_on_refresh_is_a_message(owner, settings, stripe_fake):
    connect_account_create(vendor=owner.vendor)
    settings.STRIPE_SECRET_KEY = "sk_test_revoked"
    response = owner.get(url("payouts-refresh", owner.vendor), follow=True)
    assert response.redirect_chain == [(url("payouts", owner.vendor), 302)]
    html = response.content.decode()
    assert "Stripe could not start the onboarding just now" in html
    assert "Onboarding incomplete" in html


def test_stripe_unreachable_on_return_keeps_the_last_known_status(owner, settings, stripe_fake):
    account = connect_account_create(vendor=owner.vendor)
    settings.STRIPE_API_BASE = "http://127.0.0.1:9"  # nothing listens on the discard port

    response = owner.get(url("payouts-return", owner.vendor), follow=True)

    assert response.status_code == 200
    html = response.content.decode()
    assert "Stripe could not be reached to check your account" in html
    assert "Onboarding incomplete" in html
    account.refresh_from_db()
    assert account.payouts_enabled is False


def test_the_return_url_without_an_account(owner, stripe_fake):
    html = owner.get(url("payouts-return", owner.vendor), follow=True).content.decode()
    assert "There is no payout account yet" in html
    assert stripe_fake.requests == []
