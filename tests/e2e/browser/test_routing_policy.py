"""An owner sets the organisation's routing policy in the console; the gateway follows it."""

from __future__ import annotations

import httpx
import pytest
from allauth.account.models import EmailAddress
from playwright.sync_api import expect

from billing.money import usd_to_nanos
from billing.services import credit_grant
from marketplace.models import Organization
from marketplace.services import api_key_create, console_organization_create
from tests import factories
from tests.e2e.browser.test_journeys import PASSWORD, log_in
from tests.support.cluster import wait_until
from tests.support.upstream import FaultUpstream

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_owner_keeps_a_vendor_out_of_every_request(browsing, shoot, upstream, live_app):
    owner = factories.user("router@example.test", password=PASSWORD)
    EmailAddress.objects.create(user=owner, email=owner.email, verified=True, primary=True)
    org = console_organization_create(actor=owner, name="Picky Co")
    credit_grant(organization=org, amount=usd_to_nanos("5"), reason="test credit")
    key = api_key_create(organization=org, name="app").plaintext
    with FaultUpstream() as other:
        cheap = factories.endpoint(base_url=upstream.base_url, tags=("sql",), price_output_usd="1")
        dear = factories.endpoint(base_url=other.base_url, tags=("sql",), price_output_usd="3")

        page = browsing.new_page()
        log_in(page, owner.email)
        page.goto(f"/console/{org.slug}/")
        page.get_by_role("link", name="Routing policy").click()
        field = page.get_by_label("Default provider policy (JSON)")
        field.fill(f'{{"ignore": ["{cheap.vendor.slug}"')  # a bracket short
        page.get_by_role("button", name="Save").click()
        expect(page.get_by_text("This is not valid JSON")).to_be_visible()
        assert Organization.objects.get(pk=org.pk).routing_defaults == {}

        field.fill(f'{{"ignore": ["{cheap.vendor.slug}"]}}')
        page.get_by_role("button", name="Save").click()
        page.get_by_text("Routing policy saved.").wait_for()
        expect(page.get_by_label("Default provider policy (JSON)")).to_contain_text(
            cheap.vendor.slug
        )
        shoot(page, "console-routing-policy")

        body = {"model": "tag:sql", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=live_app.url, headers={"Authorization": f"Bearer {key}"}) as c:
            assert wait_until(
                lambda: (
                    c.post("/v1/chat/completions", json=body, timeout=30).headers.get(
                        "x-switchyard-endpoint"
                    )
                    == dear.full_slug
                ),
                timeout=10,
            )
        assert other.stats()["total"] >= 1
