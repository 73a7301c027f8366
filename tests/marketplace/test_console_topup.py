"""Buying credit from the console: a top-up form on the credits page (owners and billing
members), Stripe Checkout through the real fake Stripe server, and the return page that
credits the organisation exactly once."""

from __future__ import annotations

import html

import pytest
from django.urls import reverse

from billing.models import TopUp
from billing.money import usd_to_nanos
from billing.selectors import organization_balance_by_id
from marketplace.models import Membership
from tests import factories
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture


def member(client, org, role):  # type: ignore[no-untyped-def]
    user = factories.user()
    Membership.objects.create(organization=org, user=user, role=role)
    client.force_login(user)
    return user


def credits_url(org) -> str:  # type: ignore[no-untyped-def]
    return reverse("console:credits", args=[org.slug])


def test_it_starts_a_checkout_for_a_billing_member_and_credits_once_on_return(
    stripe_fake: FakeStripe, client, settings
):
    settings.SITE_URL = "https://switchyard.example.test"
    org = factories.organization(credit_usd=None)
    user = member(client, org, Membership.Role.BILLING)
    page = client.get(credits_url(org))
    assert page.status_code == 200
    assert b'data-testid="topup-form"' in page.content

    response = client.post(credits_url(org), {"amount_usd": "25"})

    assert response.status_code == 303
    topup = TopUp.objects.get()
    assert topup.organization == org and topup.created_by == user
    assert topup.status == TopUp.Status.PENDING and topup.amount_cents == 2500
    assert response["Location"] == topup.checkout_url
    assert response["Location"].startswith(stripe_fake.url)
    create = stripe_fake.calls("POST", "/v1/checkout/sessions")[0]
    assert create.params["success_url"] == (
        "https://switchyard.example.test/billing/topups/return"
        f"?session_id={{CHECKOUT_SESSION_ID}}&next=/console/{org.slug}/credits/"
    )
    assert (
        create.params["cancel_url"]
        == f"https://switchyard.example.test/console/{org.slug}/credits/"
    )
    assert create.params["line_items"][0]["price_data"]["unit_amount"] == "2500"

    # The page lists the pending top-up.
    listed = client.get(credits_url(org)).content.decode()
    assert 'data-testid="topups"' in listed and "$25.00" in listed and "Pending" in listed

    # The customer pays; Stripe sends the browser back, twice.
    before = organization_balance_by_id(org.pk)
    stripe_fake.complete_checkout(topup.stripe_session_id)
    return_url = (
        create.params["success_url"]
        .replace("{CHECKOUT_SESSION_ID}", topup.stripe_session_id)
        .removeprefix("https://switchyard.example.test")
    )
    for _ in range(2):
        back = client.get(return_url)
        assert back.status_code == 302 and back["Location"] == credits_url(org)
    assert organization_balance_by_id(org.pk) == before + usd_to_nanos("25")
    topup.refresh_from_db()
    assert topup.status == TopUp.Status.PAID
    shown = client.get(credits_url(org)).content.decode()
    assert "Paid" in shown


def test_it_uses_the_request_host_without_a_site_url(stripe_fake: FakeStripe, client, settings):
    settings.SITE_URL = ""
    org = factories.organization(credit_usd=None)
    member(client, org, Membership.Role.OWNER)
    response = client.post(credits_url(org), {"amount_usd": "10.50"})
    assert response.status_code == 303
    assert TopUp.objects.get().amount_cents == 1050
    create = stripe_fake.calls("POST", "/v1/checkout/sessions")[0]
    assert create.params["success_url"].startswith("http://testserver/billing/topups/return?")
    assert create.params["cancel_url"] == f"http://testserver/console/{org.slug}/credits/"


def test_a_developer_cannot_top_up(stripe_fake: FakeStripe, client):
    org = factories.organization(credit_usd=None)
    member(client, org, Membership.Role.DEVELOPER)
    assert client.post(credits_url(org), {"amount_usd": "25"}).status_code == 403
    assert not TopUp.objects.exists() and stripe_fake.requests == []


def test_an_admin_sees_credits_but_cannot_top_up(stripe_fake: FakeStripe, client):
    org = factories.organization(credit_usd=None)
    member(client, org, Membership.Role.ADMIN)
    page = client.get(credits_url(org))
    assert page.status_code == 200 and b'data-testid="topup-form"' not in page.content
    assert client.post(credits_url(org), {"amount_usd": "25"}).status_code == 403
    assert not TopUp.objects.exists() and stripe_fake.requests == []


def test_a_stranger_gets_404(stripe_fake: FakeStripe, client):
    org = factories.organization(credit_usd=None)
    client.force_login(factories.user())
    assert client.post(credits_url(org), {"amount_usd": "25"}).status_code == 404
    assert not TopUp.objects.exists()


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("0", "Enter an amount from $5.00 to $10,000.00."),
        ("4.99", "Enter an amount from $5.00 to $10,000.00."),
        ("10000.01", "Enter an amount from $5.00 to $10,000.00."),
        ("-25", "Enter an amount from $5.00 to $10,000.00."),
        ("twenty", "Enter an amount in US dollars, such as 25 or 25.50."),
        ("NaN", "Enter an amount in US dollars, such as 25 or 25.50."),
        ("25.505", "Enter whole dollars or dollars and cents (at most two decimal places)."),
        ("", "This field is required."),
    ],
)
def test_it_refuses_invalid_amounts_and_creates_nothing(
    stripe_fake: FakeStripe, client, settings, amount, message
):
    settings.TOPUP_MIN_CENTS, settings.TOPUP_MAX_CENTS = 500, 1_000_000
    org = factories.organization(credit_usd=None)
    member(client, org, Membership.Role.BILLING)
    response = client.post(credits_url(org), {"amount_usd": amount})
    assert response.status_code == 200
    assert message in html.unescape(response.content.decode())
    assert not TopUp.objects.exists() and stripe_fake.requests == []


def test_it_accepts_the_limits_and_a_dollar_sign(stripe_fake: FakeStripe, client, settings):
    settings.TOPUP_MIN_CENTS, settings.TOPUP_MAX_CENTS = 500, 1_000_000
    org = factories.organization(credit_usd=None)
    member(client, org, Membership.Role.BILLING)
    for amount in ("5", "$10000.00"):
        assert client.post(credits_url(org), {"amount_usd": amount}).status_code == 303
    assert sorted(TopUp.objects.values_list("amount_cents", flat=True)) == [500, 1_000_000]


def test_a_payment_provider_error_is_shown_and_nothing_is_charged(
    stripe_fake: FakeStripe, client, settings
):
    settings.STRIPE_SECRET_KEY = "sk_test_not_the_fakes_key"
    org = factories.organization(credit_usd=None)
    member(client, org, Membership.Role.BILLING)
    response = client.post(credits_url(org), {"amount_usd": "25"})
    assert response.status_code == 200
    assert "could not start the checkout, so nothing was charged" in html.unescape(
        response.content.decode()
    )
    # billing records the attempt as failed (never pending, never credited).
    assert not TopUp.objects.exclude(status=TopUp.Status.FAILED).exists()
    assert organization_balance_by_id(org.pk) == 0
