"""The people who use Switchyard, end to end in a real browser:

* a vendor signs up (verifying the email), registers an endpoint pointing at a test
  upstream (with example prompts for auto-routing), runs the conformance check and edits
  the pricing with a live preview;
* an administrator approves the vendor and the endpoint in the operations pages;
* a customer signs up, creates an organisation and an API key, calls the gateway with the
  official openai SDK, sees the call on the usage page, and revokes the key.
"""

from __future__ import annotations

import re
import time

import openai
import pytest
from allauth.account.models import EmailAddress
from django.core import mail
from playwright.sync_api import expect

from billing.models import TopUp
from billing.money import usd_to_nanos
from billing.selectors import organization_balance_by_id
from billing.services import credit_grant
from marketplace.models import ApiKey, Organization
from routing.auto import tag_examples_from_db
from tests import factories
from tests.conftest import ingest_all
from tests.support import fake_stripe
from vendors.models import Endpoint, Vendor

pytestmark = pytest.mark.django_db(transaction=True)

stripe_fake = fake_stripe.stripe_fake  # the fixture

PASSWORD = "correct horse battery staple 42"


def sign_up(page, email: str) -> None:  # type: ignore[no-untyped-def]
    page.goto("/accounts/signup/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password (again)").fill(PASSWORD)
    page.get_by_role("button", name="Sign Up").click()


def log_in(page, email: str) -> None:  # type: ignore[no-untyped-def]
    page.goto("/accounts/login/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url(re.compile(r"^(?!.*/accounts/login/).*$"))


def confirmation_link(email: str) -> str:
    message = next(m for m in reversed(mail.outbox) if email in m.to)
    return re.search(r"https?://\S+/accounts/confirm-email/\S+/", message.body).group(0)


def test_a_vendor_registers_a_priced_endpoint_that_an_admin_approves(
    browsing, shoot, upstream, settings
):
    settings.ACCOUNT_EMAIL_VERIFICATION = "mandatory"
    page = browsing.new_page()

    # Sign up; a wrong second password is explained first.
    page.goto("/accounts/signup/")
    shoot(page, "signup")
    page.get_by_label("Email").fill("vendor@example.test")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password (again)").fill(PASSWORD + "x")
    page.get_by_role("button", name="Sign Up").click()
    expect(page.get_by_text("You must type the same password each time.")).to_be_visible()
    shoot(page, "signup-errors")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password (again)").fill(PASSWORD)
    page.get_by_role("button", name="Sign Up").click()
    page.get_by_role("heading", name="Verify Your Email Address").wait_for()
    shoot(page, "verification-sent")

    page.goto(confirmation_link("vendor@example.test"))
    shoot(page, "confirm-email")
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_load_state()
    if "/accounts/login/" in page.url:
        log_in(page, "vendor@example.test")

    # Register as a vendor.
    page.goto("/vendor/")
    shoot(page, "vendor-register")
    page.get_by_label("Vendor name").fill("Tiny Models")
    page.get_by_role("button", name="Register").click()
    page.get_by_text("awaits approval by an administrator").wait_for()
    vendor = Vendor.objects.get(slug="tiny-models")
    assert vendor.status == Vendor.Status.PENDING

    # Register an endpoint with two example prompts; mistakes are explained on their field.
    page.get_by_role("link", name="Register an endpoint").first.click()
    page.get_by_label("Endpoint name").fill("sql-small")
    page.get_by_label("Base URL").fill("http://10.20.30.40/v1")
    page.get_by_label("Upstream model").fill("fake-small")
    page.get_by_label("Secret (bearer token)").fill("vendor-secret")
    page.get_by_label("Capability tags").fill("sql, chat")
    examples = page.get_by_label("Example prompts")
    examples.press_sequentially("sql: Which customers spent most last month?")
    examples.press("Enter")
    examples.press_sequentially("legal: Is this clause enforceable?")  # not one of its tags
    page.get_by_label("Languages").fill("en")
    page.get_by_label("Input price").fill("0.2")
    page.get_by_label("Output price").fill("0.4")
    shoot(page, "endpoint-form")
    page.get_by_role("button", name="Register endpoint").click()
    # The form's own checks come first: the example on line 2 names a tag it lacks.
    examples_error = page.locator("#id_tag_examples_error")
    assert "Line 2: 'legal' is not one of this endpoint's capability tags" in (
        examples_error.inner_text()
    )
    assert examples.get_attribute("aria-invalid") == "true"
    shoot(page, "endpoint-form-example-error")
    examples.fill(
        "sql: Which customers spent most last month?\nchat: Summarise this thread in two sentences."
    )
    page.get_by_label("Secret (bearer token)").fill("vendor-secret")
    page.get_by_role("button", name="Register endpoint").click()
    # Then the service's: the private address is refused on the URL field.
    url_error = page.locator("#id_base_url_error")
    assert "The URL is refused" in url_error.inner_text()
    assert page.get_by_label("Base URL").get_attribute("aria-invalid") == "true"
    expect(examples).to_have_value(
        "sql: Which customers spent most last month?\nchat: Summarise this thread in two sentences."
    )
    shoot(page, "endpoint-form-errors")
    page.get_by_label("Base URL").fill(upstream.base_url)
    page.get_by_label("Secret (bearer token)").fill("vendor-secret")
    page.get_by_role("button", name="Register endpoint").click()
    page.get_by_role("heading", name="tiny-models/sql-small").wait_for()
    expect(page.get_by_text("Summarise this thread in two sentences.")).to_be_visible()
    assert Endpoint.objects.get(vendor=vendor, slug="sql-small").tag_examples == {
        "sql": ["Which customers spent most last month?"],
        "chat": ["Summarise this thread in two sentences."],
    }

    # Run the conformance check (htmx swaps the report in).
    page.get_by_role("button", name="Run the conformance check").click()
    report = page.locator("#conformance-report")
    report.get_by_text("Passed").wait_for()
    assert report.locator(".result-pass").count() >= 4
    assert "stream.usage" in report.inner_text()
    shoot(page, "vendor-endpoint")

    # Edit the pricing: the preview follows the inputs; the server agrees and saves.
    page.get_by_role("link", name="Edit pricing").click()
    full_price = page.get_by_test_id("input-100")
    expect(full_price).to_have_text("$0.4000")  # 0.2 x 2 (the default curve) at 100 %
    chart_last = (
        "() => Chart.getChart(document.querySelector(\"canvas[data-chart='pricing']\"))"
        ".data.datasets[0].data.at(-1).y"
    )
    assert page.evaluate(chart_last) == pytest.approx(0.4)
    page.get_by_label("Surge cap (multiplier)").fill("4")
    page.get_by_label("Point 4: multiplier").fill("3.5")
    expect(full_price).to_have_text("$0.7000")
    assert page.evaluate(chart_last) == pytest.approx(0.7)
    page.locator("#pricing-check").get_by_text("The server accepts these prices.").wait_for()
    expect(page.get_by_test_id("server-input-100")).to_have_text("$0.7000")
    shoot(page, "vendor-pricing")
    page.get_by_label("Point 3: multiplier").fill("5")  # above the next point: refused
    page.locator("[data-curve-status]").get_by_text("never decrease").wait_for()
    page.locator("#pricing-check").get_by_text("The server refuses these values").wait_for()
    shoot(page, "vendor-pricing-invalid")
    page.get_by_label("Point 3: multiplier").fill("1.5")
    page.get_by_role("button", name="Save prices").click()
    page.get_by_text("Prices saved.").wait_for()
    endpoint = Endpoint.objects.get(vendor=vendor, slug="sql-small")
    assert endpoint.surge_curve[-1] == [1.0, 3.5] and endpoint.surge_cap == 4.0

    # An administrator approves the vendor and the endpoint.
    admin = factories.user(email="admin@example.test", password=PASSWORD)
    admin.is_staff = True
    admin.save()
    EmailAddress.objects.create(user=admin, email=admin.email, verified=True, primary=True)
    ops = browsing.new_page()
    log_in(ops, "admin@example.test")
    ops.goto("/ops/")
    ops.get_by_text("tiny-models/sql-small").first.wait_for()
    shoot(ops, "ops-queue")
    ops.get_by_role("button", name="Approve vendor Tiny Models").click()
    ops.get_by_text("Tiny Models: approved.").wait_for()
    ops.get_by_role("button", name="Approve tiny-models/sql-small").click()
    ops.get_by_text("tiny-models/sql-small: approved.").wait_for()
    endpoint.refresh_from_db()
    vendor.refresh_from_db()
    assert endpoint.status == Endpoint.Status.APPROVED
    assert vendor.status == Vendor.Status.APPROVED
    # Approved, its example prompts now shape auto-routing's centroids.
    assert "Summarise this thread in two sentences." in tag_examples_from_db()["chat"]
    ops.goto("/ops/audit/")
    expect(ops.get_by_text("endpoint.approve")).to_be_visible()
    shoot(ops, "ops-audit")
    ops.goto("/ops/endpoints/")
    shoot(ops, "ops-endpoints")

    # The catalog lists it.
    page.goto("/catalog/")
    page.get_by_text("tiny-models/sql-small").wait_for()
    shoot(page, "catalog")

    # Two-factor authentication (allauth.mfa) renders inside the layout.
    page.goto("/accounts/2fa/")
    page.get_by_role("link", name="Activate").click()
    page.get_by_role("heading", name="Confirm Access").wait_for()  # recent login needed
    shoot(page, "account-reauthenticate")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Confirm").click()
    page.get_by_role("img", name="QR code for your authenticator app").wait_for()
    expect(page.get_by_label("Authenticator code")).to_be_visible()
    shoot(page, "account-2fa-totp")


def top_up_through_stripe_checkout(page, shoot, stripe_fake, live_app, org) -> None:  # type: ignore[no-untyped-def]
    """The customer buys $25 of credit on the Credits page: the console starts a Checkout
    session and sends the browser to it; the customer pays; Stripe sends the signed
    ``checkout.session.completed`` webhook to our endpoint and the browser back to us."""
    from billing.tasks import stripe_event_process

    page.get_by_role("link", name="Credits").click()
    expect(page.get_by_test_id("balance")).to_have_text("$0.000000")
    page.get_by_label("Amount (USD)").fill("4")  # below the minimum: explained
    page.get_by_role("button", name="Continue to payment").click()
    expect(page.locator("#id_amount_usd_error")).to_contain_text(
        "Enter an amount from $5.00 to $10,000.00."
    )
    assert page.get_by_label("Amount (USD)").get_attribute("aria-invalid") == "true"
    assert not TopUp.objects.exists() and stripe_fake.requests == []
    shoot(page, "credits-topup-errors")

    page.get_by_label("Amount (USD)").fill("25")
    page.get_by_role("button", name="Continue to payment").click()
    page.get_by_role("heading", name="Pay $25.00").wait_for()  # the fake's Checkout page
    topup = TopUp.objects.get(organization=org)
    assert (
        page.url
        == topup.checkout_url
        == f"{stripe_fake.url}/checkout/pay/{topup.stripe_session_id}"
    )
    assert topup.status == TopUp.Status.PENDING and topup.amount_cents == 2500
    shoot(page, "stripe-checkout")

    # The customer pays: Stripe signs the event and posts it to our real webhook endpoint,
    # then the worker processes it (the Celery task, run here as the worker would).
    stripe_fake.complete_checkout(topup.stripe_session_id)
    event = stripe_fake.event("checkout.session.completed", topup.stripe_session_id)
    status, answer = stripe_fake.send(event, f"{live_app.url}/billing/webhooks/stripe")
    assert status == 200 and answer["received"] is True
    assert stripe_event_process(event["id"]) == "processed"

    # Stripe sends the browser back: the success page credits nothing twice.
    page.get_by_role("link", name="Return to the merchant").click()
    page.get_by_text("Thank you: your credit has been added.").wait_for()
    assert page.url == f"{live_app.url}/console/{org.slug}/credits/"
    expect(page.get_by_test_id("balance")).to_have_text("$25.000000")
    expect(page.get_by_test_id("topups").get_by_role("cell", name="Paid")).to_be_visible()
    button = page.get_by_role("button", name="Continue to payment").bounding_box()
    heading = page.get_by_role("heading", name="Recent top-ups").bounding_box()
    assert heading["y"] - (button["y"] + button["height"]) >= 16  # not glued to the button
    ledger = page.get_by_role("table", name="Transactions")
    expect(
        ledger.get_by_role("cell", name=f"top-up {topup.pk} via Stripe Checkout")
    ).to_be_visible()
    expect(ledger.get_by_role("cell", name="+$25.000000")).to_be_visible()
    topup.refresh_from_db()
    assert topup.status == TopUp.Status.PAID
    assert organization_balance_by_id(org.pk) == usd_to_nanos("25")
    shoot(page, "credits-topped-up")


def test_a_customer_creates_a_key_calls_the_gateway_and_sees_the_usage(
    browsing, shoot, upstream, settings, live_app, stripe_fake
):
    settings.ACCOUNT_EMAIL_VERIFICATION = "none"
    settings.SITE_URL = live_app.url  # where Stripe sends the browser back to
    endpoint = factories.endpoint(
        base_url=upstream.base_url, upstream_model="fake-small", tags=("chat",)
    )
    page = browsing.new_page()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])

    page.goto("/")
    shoot(page, "home")
    sign_up(page, "customer@example.test")
    page.get_by_role("link", name="Create an organisation").wait_for()
    shoot(page, "home-without-organisation")

    page.get_by_role("link", name="Create an organisation").click()
    page.get_by_role("button", name="Create organisation").click()  # empty: explained
    assert page.locator("#id_name_error").inner_text().strip() == "This field is required."
    page.get_by_label("Organisation name").fill("Acme Analytics")
    page.get_by_role("button", name="Create organisation").click()
    page.get_by_text("Acme Analytics is ready.").wait_for()
    org = Organization.objects.get(slug="acme-analytics")
    shoot(page, "console-overview-empty")

    top_up_through_stripe_checkout(page, shoot, stripe_fake, live_app, org)
    page.get_by_role("link", name="Overview").click()
    shoot(page, "console-overview")

    # Create a key; an expiry in the past is explained, then the key is shown once.
    page.get_by_role("link", name="Create an API key").first.click()
    page.get_by_label("Name").fill("notebook")
    page.get_by_label("Chat completions").check()
    page.get_by_label("Credit limit (USD)").fill("2")
    page.get_by_label("Limit resets").select_option("monthly")
    page.get_by_label("Requests per minute").fill("60")
    page.get_by_label("Expires on (UTC)").fill("2001-01-01")
    page.get_by_role("button", name="Create key").click()
    assert "Choose a day after today." in page.locator("#id_expires_on_error").inner_text()
    shoot(page, "key-form-errors")
    page.get_by_label("Expires on (UTC)").fill("")
    page.get_by_role("button", name="Create key").click()
    key_field = page.get_by_label("API key")
    key = key_field.input_value()
    assert key.startswith("sy-")
    page.get_by_role("button", name="Copy").click()
    page.locator("#copy-status").get_by_text("Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == key
    shoot(page, "key-created")
    page.goto(page.url.replace("/keys/new/", "/keys/"))
    assert key not in page.content()

    # Call the gateway with the official SDK; the call shows up once ingested.
    client = openai.OpenAI(base_url=f"{live_app.url}/v1", api_key=key, max_retries=0)
    completion = client.chat.completions.create(
        model="tag:chat", messages=[{"role": "user", "content": "hello there switchyard"}]
    )
    assert completion.choices[0].message.content
    assert ingest_all() == 1

    page.get_by_role("link", name="Usage").click()
    expect(page.get_by_test_id("usage-requests")).to_have_text(re.compile(r"^1\b"))
    expect(page.get_by_test_id("usage-spend")).not_to_have_text("$0.000000")
    expect(page.get_by_role("rowheader", name=endpoint.full_slug)).to_be_visible()
    assert page.evaluate(
        "() => !!Chart.getChart(document.querySelector(\"canvas[data-chart='usage']\"))"
    )
    shoot(page, "console-usage")
    # The date range form swaps the results in place (htmx) and keeps the chart.
    # (htmx pushes the URL on the swap, and draws the chart again once the swap settled.)
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"/usage/\?start="))
    page.wait_for_function(
        "() => !!Chart.getChart(document.querySelector(\"canvas[data-chart='usage']\"))"
    )

    page.get_by_role("link", name="Credits").click()
    page.get_by_text("Usage charge").first.wait_for()
    shoot(page, "console-credits")
    page.get_by_role("link", name="API keys").click()
    shoot(page, "console-keys")

    page.get_by_role("link", name="Members").click()
    page.get_by_label("Email address").fill("colleague@example.test")
    page.get_by_label("Role", exact=True).select_option("billing")
    page.get_by_role("button", name="Send invitation").click()
    page.get_by_text("Invitation sent to colleague@example.test.").wait_for()
    shoot(page, "console-members")

    # Revoke the key: the gateway refuses it at once.
    page.get_by_role("link", name="API keys").click()
    page.get_by_role("link", name="Revoke notebook").click()
    shoot(page, "key-revoke")
    page.get_by_role("button", name="Revoke the key").click()
    page.get_by_text("is revoked").wait_for()
    assert ApiKey.objects.get(organization=org).revoked_at is not None
    deadline = time.monotonic() + 10  # the revocation travels through Redis pub/sub
    with pytest.raises(openai.AuthenticationError):
        while time.monotonic() < deadline:
            client.chat.completions.create(
                model="tag:chat", messages=[{"role": "user", "content": "still there?"}]
            )
            time.sleep(0.1)

    # Account pages and two-factor authentication render in the layout.
    page.goto("/accounts/email/")
    shoot(page, "account-email")
    page.goto("/accounts/2fa/")
    shoot(page, "account-2fa")


def test_the_public_pages_work_signed_out(browsing, shoot):
    page = browsing.new_page()
    page.goto("/accounts/login/")
    page.get_by_label("Email").fill("nobody@example.test")
    page.get_by_label("Password", exact=True).fill("wrong password")
    page.get_by_role("button", name="Sign In").click()
    page.get_by_text("not correct").wait_for()
    shoot(page, "login-errors")
    page.goto("/catalog/")
    shoot(page, "catalog-empty")
    page.goto("/console/")
    assert "/accounts/login/" in page.url


CURVES = [
    ([[0.0, 1.0], [0.5, 1.0], [0.8, 1.5], [1.0, 2.0]], 3.0),
    ([[0.0, 1.0], [0.5, 1.0], [0.9, 2.0], [1.0, 3.5]], 2.5),  # capped
    ([[0.2, 1.2]], 5.0),  # one point: flat
    ([[0.0, 1.0], [0.3, 4.0], [0.31, 9.0]], 100.0),
]


@pytest.mark.parametrize(("curve", "cap"), CURVES)
def test_the_browser_preview_uses_the_gateways_surge_formula(browsing, curve, cap):
    from vendors.pricing import surge_multiplier

    page = browsing.new_page()
    page.goto("/catalog/")
    points = [i / 40 for i in range(-2, 43)]  # a little outside 0..1 too
    in_browser = page.evaluate(
        "([curve, cap, points]) => points.map(u => Switchyard.surgeMultiplier(curve, u, cap))",
        [curve, cap, points],
    )
    assert in_browser == pytest.approx([surge_multiplier(curve, u, cap) for u in points])


def test_a_request_made_with_the_sdk_appears_live_on_the_customers_and_the_vendors_dashboards(
    browsing, shoot, upstream, settings, live_app, ingest_worker
):
    from marketplace.services import api_key_create, organization_create
    from marketplace.tasks import live_numbers_push
    from vendors.services import vendor_approve, vendor_create

    settings.ACCOUNT_EMAIL_VERIFICATION = "none"
    customer = factories.user(email="customer@example.test", password=PASSWORD)
    org = organization_create(name="Acme Analytics", slug="acme-analytics", owner=customer)
    credit_grant(organization=org, amount=usd_to_nanos("5"), reason="welcome credit")
    key = api_key_create(organization=org, name="notebook").plaintext
    seller = factories.user(email="seller@example.test", password=PASSWORD)
    vendor = vendor_approve(vendor=vendor_create(name="Tiny Models", slug="tiny", owner=seller))
    endpoint = factories.endpoint(
        base_url=upstream.base_url, upstream_model="fake-small", vendor_obj=vendor, slug="chat-s"
    )
    staff = factories.user(email="admin@example.test", password=PASSWORD)
    staff.is_staff = True
    staff.save()

    # Three people keep their dashboards open: the customer, the vendor and an operator.
    usage = browsing.new_page()
    log_in(usage, "customer@example.test")
    usage.goto("/console/acme-analytics/usage/")
    portal = browsing.new_page()
    log_in(portal, "seller@example.test")
    portal.goto("/vendor/tiny/endpoints/chat-s/")
    ops = browsing.new_page()
    log_in(ops, "admin@example.test")
    ops.goto("/ops/live/")
    for page in (usage, portal, ops):
        expect(page.locator("[data-live-status]")).to_have_text("Live")
    expect(usage.get_by_test_id("live-requests")).to_have_text("0")
    expect(portal.get_by_test_id("live-requests")).to_have_text("0")
    expect(portal.get_by_test_id("live-earnings")).to_have_text("$0.000000")
    expect(ops.get_by_test_id("live-requests")).to_have_text("0")
    before = usage.get_by_test_id("live-spend").inner_text()

    # A request through the gateway with the official SDK...
    client = openai.OpenAI(base_url=f"{live_app.url}/v1", api_key=key, max_retries=0)
    completion = client.chat.completions.create(
        model="tag:chat", messages=[{"role": "user", "content": "hello there switchyard"}]
    )
    assert completion.choices[0].message.content

    # ...appears on every dashboard without a reload, once the ingest worker recorded it.
    expect(usage.get_by_test_id("live-requests")).to_have_text("1")
    expect(usage.get_by_test_id("live-spend")).not_to_have_text(before)
    expect(usage.get_by_test_id("live-errors")).to_have_text("0")
    tokens = completion.usage.prompt_tokens + completion.usage.completion_tokens
    expect(usage.get_by_test_id("live-tokens")).to_have_text(f"{tokens:,}")
    expect(portal.get_by_test_id("live-requests")).to_have_text("1")
    expect(portal.get_by_test_id("live-earnings")).not_to_have_text("$0.000000")
    expect(ops.get_by_test_id("live-requests")).to_have_text("1")
    expect(ops.get_by_test_id("live-revenue")).not_to_have_text("$0.000000")
    # The figures agree with what the server renders on a reload.
    live_spend = usage.get_by_test_id("live-spend").inner_text()
    shoot(usage, "live-console-usage")

    # The beat task pushes the gateway's live numbers (utilisation, price, circuit).
    assert live_numbers_push() >= 2  # the vendor's group and the operations group
    expect(portal.get_by_test_id("live-circuit")).to_have_text("closed")
    expect(portal.get_by_test_id("live-price-input")).to_have_text(endpoint.price_input_usd)
    shoot(portal, "live-vendor-endpoint")
    shoot(ops, "live-ops")
    usage.reload()
    expect(usage.get_by_test_id("live-spend")).to_have_text(live_spend)


def test_the_browser_formats_money_like_the_server(browsing):
    from billing.money import format_usd

    page = browsing.new_page()
    page.goto("/catalog/")
    amounts = [0, 1, 499, 500, 1_500, 999_999_999, 1_000_000_000, 123_456_789_012, -2_500_000]
    for places in (4, 6):
        in_browser = page.evaluate(
            "([amounts, places]) => amounts.map(n => Switchyard.usd(n, places))",
            [amounts, places],
        )
        assert in_browser == [format_usd(n, places=places) for n in amounts]
