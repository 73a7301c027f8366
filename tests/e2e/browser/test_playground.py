"""The console playground in a real browser: a developer sends a prompt, sees the answer
stream in with the endpoint and cost, and reads the route trace; bad input is explained."""

from __future__ import annotations

import pytest
from allauth.account.models import EmailAddress
from playwright.sync_api import expect

from billing.money import usd_to_nanos
from billing.services import credit_grant
from marketplace.services import console_organization_create
from tests import factories
from tests.e2e.browser.test_journeys import PASSWORD, log_in

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_member_tries_a_prompt_and_reads_its_route_trace(browsing, shoot, upstream):
    user = factories.user("dev@playground.test", password=PASSWORD)
    EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
    org = console_organization_create(actor=user, name="Playground Co")
    credit_grant(organization=org, amount=usd_to_nanos("5"), reason="test credit")
    cheap = factories.endpoint(base_url=upstream.base_url, tags=("chat",), price_input_usd="1")
    factories.endpoint(base_url=upstream.base_url, tags=("chat",), price_input_usd="3")

    page = browsing.new_page()
    log_in(page, "dev@playground.test")
    page.goto(f"/console/{org.slug}/playground/")
    expect(page.get_by_role("heading", name="Playground")).to_be_visible()
    shoot(page, "playground-empty")

    # Nothing typed: the prompt's error is shown beside it.
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_text("Type a prompt to send.")).to_be_visible()
    expect(page.get_by_label("Prompt", exact=True)).to_have_attribute("aria-invalid", "true")
    shoot(page, "playground-errors")

    page.get_by_label("Prompt", exact=True).fill("what is the cheapest way to travel")
    page.get_by_label("Cheapest with the tag").check()
    expect(page.get_by_label("Endpoint", exact=True)).to_be_hidden()
    page.get_by_label("Capability tag", exact=True).select_option("chat")
    page.get_by_role("button", name="Send").click()

    expect(page.get_by_role("status")).to_have_text("Done.")
    answer = page.locator("[data-playground-answer]")
    expect(answer).to_contain_text("cheapest way to travel")
    expect(page.locator("[data-fact='endpoint']")).to_have_text(cheap.full_slug)
    expect(page.locator("[data-fact='cost']")).to_contain_text("$0.0000")
    served = page.get_by_test_id("trace-served-by")
    expect(served).to_have_text(cheap.full_slug)
    expect(page.get_by_test_id("trace-candidates")).to_contain_text("rank 1")
    expect(page.get_by_test_id("trace-attempts")).to_contain_text("success")
    shoot(page, "playground-answer")


def test_an_orchestrated_prompt_shows_its_plan_as_a_timeline(browsing, shoot, upstream):
    from tests.support.generalist import ScriptedGeneralist

    user = factories.user("orchestrator@playground.test", password=PASSWORD)
    EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
    org = console_organization_create(actor=user, name="Orchestra Co")
    credit_grant(organization=org, amount=usd_to_nanos("5"), reason="test credit")
    for tag in ("sql", "legal", "translate"):
        factories.endpoint(base_url=upstream.base_url, tags=(tag,))
    with ScriptedGeneralist() as generalist:
        planner = factories.endpoint(base_url=generalist.base_url, tags=("general",))
        generalist.plan(
            [
                [
                    {"name": "sql", "arguments": {"input": "count the orders"}},
                    {"name": "legal", "arguments": {"input": "is the clause binding"}},
                ],
                [{"name": "translate", "arguments": {"input": "bonjour"}}],
            ]
        )
        page = browsing.new_page()
        log_in(page, "orchestrator@playground.test")
        page.goto(f"/console/{org.slug}/playground/")
        page.get_by_label("Prompt", exact=True).fill("help me with three small tasks")
        page.get_by_label("Orchestrate: a generalist calls specialists as tools").check()
        expect(page.get_by_label("Capability tag", exact=True)).to_be_hidden()
        page.get_by_label("Generalist", exact=True).select_option(planner.full_slug)
        page.get_by_role("button", name="Send").click()

        expect(page.get_by_role("status")).to_have_text("Done.")
        expect(page.locator("[data-playground-answer]")).to_contain_text("FINAL: [call_0_0]")
        timeline = page.get_by_test_id("plan-timeline")
        expect(timeline.locator("li")).to_have_count(6)  # three generalist turns, three calls
        expect(timeline).to_contain_text("step 1 · translate")
        expect(page.get_by_test_id("plan-summary")).to_contain_text("answered")
        shoot(page, "playground-orchestration")
