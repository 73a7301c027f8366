"""Private endpoints in a real browser: an owner registers the organisation's own model
server (the URL refused first, then a real one), the conformance check passes, the endpoint
is listed as live and offered by the playground. Screenshots at desktop and phone width."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from marketplace.services import console_organization_create
from tests.e2e.browser.test_journeys import log_in
from tests.e2e.browser.test_money_pages import person
from vendors.models import Endpoint

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_owner_registers_a_private_endpoint_and_sees_it_live(
    browsing, shoot, upstream, settings
):
    owner = person("owner@house.test")
    org = console_organization_create(actor=owner, name="House Models")
    page = browsing.new_page()
    log_in(page, "owner@house.test")

    page.goto(f"/console/{org.slug}/")
    page.get_by_role("link", name="Private endpoints").click()
    expect(page.get_by_text("No private endpoints yet.")).to_be_visible()
    page.get_by_role("link", name="Register an endpoint").first.click()

    page.get_by_label("Endpoint name").fill("house-sql")
    page.get_by_label("Base URL").fill("http://169.254.169.254/latest")
    page.get_by_label("Upstream model").fill("our-sql-7b")
    page.get_by_label("Secret (bearer token)").fill("house-s3cret")
    page.get_by_label("Capability tags").fill("house-sql, chat")
    page.get_by_role("button", name="Register and check").click()
    expect(page.get_by_text("The URL is refused").first).to_be_visible()
    shoot(page, "console-private-endpoint-refused")
    assert not Endpoint.objects.exists()

    page.get_by_label("Base URL").fill(upstream.base_url)
    page.get_by_label("Secret (bearer token)").fill("house-s3cret")
    page.get_by_role("button", name="Register and check").click()
    expect(page.get_by_text("The conformance check passed")).to_be_visible()
    expect(page.get_by_label("Conformance checks")).to_contain_text("pass")
    shoot(page, "console-private-endpoint")

    page.get_by_role("link", name="All private endpoints").click()
    row = page.get_by_role("row", name="private-house-models/house-sql")
    expect(row).to_contain_text("Live")
    expect(row).to_contain_text("127.0.0.1")
    expect(row).to_contain_text("Passed")
    shoot(page, "console-private-endpoints")

    page.get_by_role("link", name="Playground").click()
    expect(
        page.get_by_label("Endpoint", exact=True).locator(
            "option", has_text="private-house-models/house-sql (private)"
        )
    ).to_have_count(1)
