"""An owner turns on the privacy guard and the response cache in the console, the gateway
redacts and caches, and the usage page shows the cache hit, what it saved and the redaction."""

from __future__ import annotations

import httpx
import pytest
from allauth.account.models import EmailAddress
from playwright.sync_api import expect

from billing.money import usd_to_nanos
from billing.services import credit_grant
from marketplace.models import ApiKey, Organization
from marketplace.redis_client import sync_client
from marketplace.services import api_key_create, console_organization_create
from tests import factories
from tests.conftest import ingest_all
from tests.e2e.browser.test_journeys import PASSWORD, log_in
from tests.support.cluster import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_owner_turns_on_redaction_and_the_cache_and_sees_them_on_the_usage_page(
    browsing, shoot, upstream, live_app
):
    owner = factories.user("owner@example.test", password=PASSWORD)
    EmailAddress.objects.create(user=owner, email=owner.email, verified=True, primary=True)
    org = console_organization_create(actor=owner, name="Careful Co")
    credit_grant(organization=org, amount=usd_to_nanos("5"), reason="test credit")
    key = api_key_create(organization=org, name="app").plaintext
    endpoint = factories.endpoint(base_url=upstream.base_url)

    page = browsing.new_page()
    log_in(page, owner.email)
    page.goto(f"/console/{org.slug}/")
    page.get_by_role("link", name="Privacy & cache").click()
    page.get_by_label("Redact personal data before it leaves for a vendor").check()
    page.get_by_label("Reuse cached answers for (seconds)").fill("600")
    page.get_by_label("Semantic cache similarity (0.500 to 1.000)").fill("0.9")
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Privacy and cache settings saved.").wait_for()
    shoot(page, "console-privacy-cache")
    org.refresh_from_db()
    assert (org.privacy_policy, org.cache_ttl, org.cache_similarity) == ("redact", 600, 900)

    def body(text: str) -> dict:
        return {
            "model": endpoint.full_slug,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": 16,
        }

    with httpx.Client(base_url=live_app.url, headers={"Authorization": f"Bearer {key}"}) as c:
        # Personal data: redacted for the vendor, and its answer is never cached.
        personal = c.post("/v1/chat/completions", json=body("email ann.lee@example.com"))
        first = c.post("/v1/chat/completions", json=body("summarise the meeting"), timeout=30)
        # The gateway stores the answer after its last byte went out: wait for it.
        assert wait_until(lambda: bool(sync_client().keys(f"sy:cache:{org.pk}:x:*")))
        second = c.post("/v1/chat/completions", json=body("summarise the meeting"), timeout=30)
    assert personal.status_code == 200 and "x-switchyard-cache" not in personal.headers
    assert first.headers["x-switchyard-cache"] == "miss"
    assert second.headers["x-switchyard-cache"] == "hit"
    assert "ann.lee@example.com" not in str(upstream.requests("/v1/chat/completions"))
    assert ingest_all() == 3

    page.get_by_role("link", name="Usage").click()
    expect(page.get_by_test_id("usage-cache-hits")).to_have_text("1 0 semantic")
    expect(page.get_by_test_id("usage-cache-saved")).not_to_have_text("$0.000000")
    expect(page.get_by_test_id("usage-redacted")).to_contain_text("1 1 item of personal data")
    expect(page.get_by_role("rowheader", name="(response cache, exact)")).to_be_visible()
    shoot(page, "console-usage-cache-privacy")
    assert Organization.objects.get(pk=org.pk).privacy_policy == "redact"

    # One key can follow other rules than its organisation.
    page.get_by_role("link", name="API keys").click()
    page.get_by_role("link", name="Privacy & cache of app").click()
    page.get_by_label("Send prompts with personal data only to trusted endpoints").check()
    shoot(page, "console-key-privacy-cache")
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Privacy and cache settings of “app” saved.").wait_for()
    assert ApiKey.objects.get(organization=org).privacy_policy == "trusted_only"
