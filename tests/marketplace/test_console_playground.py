"""The console playground, through the whole application behind a real HTTP server and a
real (fault-injecting) vendor: a signed-in member streams an answer without ever holding an
API key, then reads the route trace; the platform-managed key is listed and revocable."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from marketplace.models import ApiKey, AuditLogEntry, Membership
from marketplace.services import console_api_key_revoke, console_organization_create
from tests import factories
from tests.conftest import ingest_all

pytestmark = pytest.mark.django_db(transaction=True)


class Browser:
    """A signed-in session over real HTTP (session cookie + CSRF token, like a browser)."""

    def __init__(self, server, user) -> None:  # type: ignore[no-untyped-def]
        django_client = Client()
        django_client.force_login(user)
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.http.cookies.set("sessionid", django_client.cookies["sessionid"].value)

    def page(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post(self, path: str, data: dict[str, str]) -> httpx.Response:
        page = self.http.get(path.rsplit("/run/", 1)[0] + "/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token, page.text[:500]
        return self.http.post(path, data=data, headers={"X-CSRFToken": token.group(1)})


def sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture
def owner():  # type: ignore[no-untyped-def]
    user = factories.user()
    org = console_organization_create(actor=user, name="Playground Owners")
    from billing.money import usd_to_nanos
    from billing.services import credit_grant

    credit_grant(organization=org, amount=usd_to_nanos("5"), reason="test credit")
    return user, org


def run_form(**overrides: str) -> dict[str, str]:
    return {
        "prompt": "tell me about the weather today",
        "route": "endpoint",
        "tag": "chat",
        "endpoint": "",
        "max_tokens": "16",
        "cascade_threshold": "0.6",
        **overrides,
    }


def test_it_streams_an_answer_and_shows_the_route_trace(gateway_server, upstream, owner):
    user, org = owner
    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("chat",))
    browser = Browser(gateway_server, user)

    page = browser.page(f"/console/{org.slug}/playground/")
    assert page.status_code == 200
    assert 'for="id_prompt"' in page.text and "sy-" not in page.text

    response = browser.post(
        f"/console/{org.slug}/playground/run/", run_form(endpoint=endpoint.full_slug)
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "weather" in text
    usage = chunks[-1]
    assert usage["switchyard"]["endpoint"] == endpoint.full_slug
    assert usage["usage"]["cost_nanos"] > 0
    request_id = response.headers["x-switchyard-request-id"]
    assert request_id == usage["id"]

    # The vendor saw the platform's key only as the gateway's, never the browser.
    key = ApiKey.objects.get(organization=org, kind=ApiKey.Kind.PLAYGROUND)
    assert key.scopes == ["chat", "generation", "tools"] and key.revoked_at is None
    assert AuditLogEntry.objects.filter(action="api_key.create", target_id=str(key.pk)).exists()

    trace = browser.page(f"/console/{org.slug}/playground/trace/?id={request_id}")
    assert trace.status_code == 200, trace.text
    assert endpoint.full_slug in trace.text
    assert 'data-testid="trace-served-by"' in trace.text
    assert "success" in trace.text
    unknown = browser.page(f"/console/{org.slug}/playground/trace/?id=gen-{'0' * 32}")
    assert 'data-testid="trace-missing"' in unknown.text
    assert "traces are kept 30 days" in unknown.text  # TRACE_RETENTION_DAYS, in PostgreSQL

    assert ingest_all() == 1
    keys_page = browser.page(f"/console/{org.slug}/keys/")
    assert "Managed: playground" in keys_page.text


def test_it_reuses_the_playground_key_and_replaces_a_revoked_one(gateway_server, upstream, owner):
    user, org = owner
    endpoint = factories.endpoint(base_url=upstream.base_url)
    browser = Browser(gateway_server, user)
    url = f"/console/{org.slug}/playground/run/"

    assert browser.post(url, run_form(endpoint=endpoint.full_slug)).status_code == 200
    assert browser.post(url, run_form(endpoint=endpoint.full_slug)).status_code == 200
    first = ApiKey.objects.get(organization=org, kind=ApiKey.Kind.PLAYGROUND)

    console_api_key_revoke(actor=user, api_key=first)
    again = browser.post(url, run_form(endpoint=endpoint.full_slug))

    assert again.status_code == 200, again.text
    keys = ApiKey.objects.filter(organization=org, kind=ApiKey.Kind.PLAYGROUND)
    assert keys.count() == 2
    assert keys.filter(revoked_at__isnull=True).exclude(pk=first.pk).count() == 1


def test_it_explains_invalid_input_and_gateway_refusals(gateway_server, upstream, owner):
    user, org = owner
    browser = Browser(gateway_server, user)
    url = f"/console/{org.slug}/playground/run/"

    invalid = browser.post(url, run_form(prompt="", endpoint=""))
    assert invalid.status_code == 200 and invalid.json()["status"] == 400
    errors = invalid.json()["errors"]
    assert errors["prompt"] == ["Type a prompt to send."]
    assert errors["endpoint"] == ["Choose the endpoint to send the prompt to."]

    factories.endpoint(base_url=upstream.base_url, tags=("chat",), price_input_usd="1")
    broke = factories.organization(credit_usd=None)
    Membership.objects.create(organization=broke, user=user, role=Membership.Role.OWNER)
    refused = browser.post(f"/console/{broke.slug}/playground/run/", run_form(route="tag"))
    assert refused.status_code == 200 and refused.json()["status"] == 402
    assert refused.json()["code"] == "insufficient_credit"
    assert upstream.stats()["total"] == 0


def test_a_billing_member_cannot_spend_through_the_playground(gateway_server, owner):
    _, org = owner
    clerk = get_user_model().objects.create_user(username="clerk@x.test", email="clerk@x.test")
    Membership.objects.create(organization=org, user=clerk, role=Membership.Role.BILLING)
    browser = Browser(gateway_server, clerk)

    assert browser.page(f"/console/{org.slug}/playground/").status_code == 403
    response = browser.http.post(f"/console/{org.slug}/playground/run/", data=run_form())
    assert response.status_code == 403
    assert not ApiKey.objects.filter(organization=org).exists()


def test_a_cascade_run_shows_the_tiers_and_the_confidence_that_decided(
    gateway_server, upstream, owner
):
    user, org = owner
    from tests.support.upstream import FaultUpstream

    with FaultUpstream() as strong:
        weak = factories.endpoint(
            base_url=upstream.base_url, tags=("qa",), price_input_usd="0.1", price_output_usd="0.1"
        )
        good = factories.endpoint(
            base_url=strong.base_url, tags=("qa",), price_input_usd="2", price_output_usd="2"
        )
        upstream.configure(logprob_mean=-2.0)  # exp(-2) = 0.135: below the threshold
        browser = Browser(gateway_server, user)
        response = browser.post(
            f"/console/{org.slug}/playground/run/",
            run_form(route="cascade", tag="qa", cascade_threshold="0.6"),
        )
        assert response.status_code == 200, response.text
        request_id = response.headers["x-switchyard-request-id"]
        trace = browser.page(f"/console/{org.slug}/playground/trace/?id={request_id}")

        upstream.configure(logprob_mean=-0.05)  # exp(-0.05) = 0.951: the cheap answer stands
        confident = browser.post(
            f"/console/{org.slug}/playground/run/",
            run_form(route="cascade", tag="qa", cascade_threshold="0.6"),
        )
        cheap_id = confident.headers["x-switchyard-request-id"]
        cheap_trace = browser.page(f"/console/{org.slug}/playground/trace/?id={cheap_id}")

    assert cheap_id.endswith("-t0")
    assert 'data-testid="trace-confidence">0.951<' in cheap_trace.text
    assert request_id.endswith("-t1")  # the second tier's leg answered
    html = trace.text
    assert 'data-testid="trace-served-by"><code>' + good.full_slug in html
    assert weak.full_slug in html and "escalated" in html and "final" in html
    assert "0.135" in html  # the cheap tier's confidence, the reason it escalated


def test_an_orchestrated_run_streams_and_lays_out_its_plan_as_a_timeline(
    gateway_server, upstream, owner
):
    from tests.support.generalist import ScriptedGeneralist

    user, org = owner
    for tag in ("sql", "legal"):
        factories.endpoint(base_url=upstream.base_url, tags=(tag,))
    browser = Browser(gateway_server, user)
    with ScriptedGeneralist() as generalist:
        planner = factories.endpoint(base_url=generalist.base_url, tags=("general",))
        generalist.plan(
            [
                [
                    {"name": "sql", "arguments": {"input": "count the orders"}},
                    {"name": "legal", "arguments": {"input": "is it binding"}},
                ]
            ]
        )
        response = browser.post(
            f"/console/{org.slug}/playground/run/",
            run_form(route="orchestrate", generalist=planner.full_slug, tag="sql"),
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream"), response.text
        request_id = response.headers["x-switchyard-request-id"]
        assert response.headers["x-switchyard-orchestration"] == request_id
        text = "".join(
            (json.loads(e)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
            for e in sse_events(response.text)
            if e != "[DONE]"
        )
        trace = browser.page(f"/console/{org.slug}/playground/trace/?id={request_id}")

    assert text == "FINAL: [call_0_0] count the orders | [call_0_1] is it binding"
    assert trace.status_code == 200
    assert 'data-testid="plan-timeline"' in trace.text
    # The generalist's two turns and the two specialist calls, each with its bar.
    assert trace.text.count('class="timeline-row') == 4
    assert trace.text.count("step 0 · sql") == 1 and trace.text.count("step 0 · legal") == 1
    assert "answered" in trace.text


def test_an_orchestrated_run_needs_a_generalist(gateway_server, owner):
    user, org = owner
    browser = Browser(gateway_server, user)
    response = browser.post(f"/console/{org.slug}/playground/run/", run_form(route="orchestrate"))
    assert response.json()["errors"]["generalist"] == [
        "Choose the generalist that calls the specialists."
    ]
