"""Orchestrated completions through the running gateway.

The generalist is a scripted tool-calling LLM (a real HTTP server, tests/support/
generalist.py); the specialists are fault-injecting upstreams that echo their input."""

from __future__ import annotations

import json

import httpx
import pytest
from django.core.management import call_command

from billing.ledger import organization_balance
from billing.models import UsageRecord
from billing.money import usd_to_nanos
from tests import factories
from tests.conftest import ingest_all
from tests.support.generalist import ScriptedGeneralist
from tests.support.upstream import FaultUpstream

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION = [{"role": "user", "content": "which clauses matter and what is the sql"}]


@pytest.fixture
def market(upstream):  # type: ignore[no-untyped-def]
    """A generalist and three specialists (sql, legal, translate) on real servers."""
    with ScriptedGeneralist() as generalist, FaultUpstream() as second:
        general = factories.endpoint(
            base_url=generalist.base_url, tags=("general",), slug="generalist"
        )
        specialists = {
            tag: factories.endpoint(
                base_url=upstream.base_url,
                tags=(tag,),
                price_input_usd="0.5",
                price_output_usd="0.5",
            )
            for tag in ("sql", "legal", "translate")
        }
        yield generalist, general, specialists, upstream, second


def _three_calls() -> list[list[dict[str, object]]]:
    return [
        [
            {"name": "sql", "arguments": {"input": "count orders per customer"}},
            {"name": "legal", "arguments": {"input": "classify the indemnity clause"}},
            {"name": "translate", "arguments": {"input": "bonjour tout le monde"}},
        ]
    ]


def _orchestrate(**orchestrator: object) -> dict[str, object]:
    return {
        "model": "orchestrate",
        "orchestrator": {"model": "tag:general", **orchestrator},
        "messages": QUESTION,
    }


def test_three_specialist_calls_are_routed_billed_and_traced(gateway_server, market):
    generalist, general, specialists, _server, _ = market
    generalist.plan(_three_calls())
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        tools = {t["function"]["name"] for t in client.get("/v1/tools").json()["data"]}
        response = client.post("/v1/chat/completions", json=_orchestrate())
        body = response.json()
        trace = client.get("/v1/generation", params={"id": body["id"]}).json()["data"]

    assert response.status_code == 200, body
    assert {"sql", "legal", "translate"} <= tools
    content = body["choices"][0]["message"]["content"]
    # Each specialist's answer went back to the generalist, in the order it asked.
    assert content == (
        "FINAL: [call_0_0] count orders per customer | [call_0_1] classify the "
        "indemnity clause | [call_0_2] bonjour tout le monde"
    )
    # The generalist was offered the tools, then got the three results.
    first, second = generalist.requests()
    assert {t["function"]["name"] for t in first["tools"]} >= {"sql", "legal", "translate"}
    assert [m["role"] for m in second["messages"]][-4:] == ["assistant", "tool", "tool", "tool"]
    plan = trace["orchestration"]
    assert plan["stopped"] == "answered"
    assert [len(s["tools"]) for s in plan["steps"]] == [3, 0]
    step_tools = plan["steps"][0]["tools"]
    assert [t["tool"] for t in step_tools] == ["sql", "legal", "translate"]
    assert [t["served_by"] for t in step_tools] == [
        specialists[t].full_slug for t in ("sql", "legal", "translate")
    ]
    assert all(t["why"].startswith("balanced: rank 1") for t in step_tools)
    assert all(t["input_bytes"] > 0 and t["output_bytes"] > 0 for t in step_tools)
    assert plan["steps"][0]["generalist"]["served_by"] == general.full_slug

    ingest_all()
    legs = UsageRecord.objects.filter(organization=customer.organization)
    by_endpoint = sorted((r.endpoint_id, r.cost > 0) for r in legs)
    assert by_endpoint == sorted(
        [(general.pk, True), (general.pk, True)]
        + [(specialists[t].pk, True) for t in ("sql", "legal", "translate")]
    )
    assert sum(r.cost for r in legs) == plan["cost_nanos"] == body["switchyard"]["cost_nanos"]
    assert body["usage"]["total_tokens"] == sum(r.prompt_tokens + r.completion_tokens for r in legs)
    out = _reconcile()
    assert "0 mismatch" in out or "no mismatch" in out.lower(), out


def _reconcile() -> str:
    import io

    buffer = io.StringIO()
    call_command("reconcile", stdout=buffer)
    return buffer.getvalue()


def test_a_failing_specialist_falls_back_and_a_failed_tool_is_reported(gateway_server, market):
    generalist, _general, specialists, specialist_server, second = market
    backup = factories.endpoint(
        base_url=second.base_url, tags=("sql",), price_input_usd="3", price_output_usd="3"
    )
    # The cheap sql vendor fails: the call falls back to the dear one. Legal has no
    # other vendor: its failure is told to the generalist.
    specialist_server.script(["status:503", "status:500", "status:500", "status:500"])
    generalist.plan(
        [
            [
                {"name": "sql", "arguments": {"input": "select one"}},
            ],
            [
                {"name": "legal", "arguments": {"input": "is this binding"}},
            ],
        ]
    )
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=_orchestrate())
        body = response.json()
        trace = client.get("/v1/generation", params={"id": body["id"]}).json()["data"]

    assert response.status_code == 200, body
    sql, legal = (s["tools"][0] for s in trace["orchestration"]["steps"][:2])
    assert sql["served_by"] == backup.full_slug
    assert "failed attempt" in sql["why"]
    assert legal["outcome"] == "failed"
    told = json.loads(generalist.requests()[-1]["messages"][-1]["content"])
    assert "the tool failed" in told["error"]
    assert specialists["legal"].full_slug  # the legal vendor exists, it just failed


def test_the_step_limit_ends_with_an_answer_without_tools(gateway_server, market):
    generalist, *_ = market
    generalist.plan([[{"name": "sql", "arguments": {"input": f"query {i}"}}] for i in range(5)])
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=_orchestrate(max_steps=2))
        body = response.json()
        trace = client.get("/v1/generation", params={"id": body["id"]}).json()["data"]

    assert response.status_code == 200, body
    plan = trace["orchestration"]
    assert plan["stopped"] == "step_limit"
    assert [len(s["tools"]) for s in plan["steps"]] == [1, 1, 0]
    assert generalist.requests()[-1]["tool_choice"] == "none"
    assert body["choices"][0]["message"]["content"].startswith("FINAL: [call_0_0] query 0")


def test_the_deadline_stops_the_loop_and_says_so(gateway_server, market):
    generalist, *_ = market
    generalist.plan(_three_calls(), delay_ms=2500)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=_orchestrate(timeout=1))

    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"


def test_a_budget_the_balance_cannot_cover_is_refused_before_any_call(gateway_server, market):
    generalist, *_ = market
    generalist.plan(_three_calls())
    customer = factories.customer(credit_usd="0.01")
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=_orchestrate(max_cost_usd="0.02"))

    assert response.status_code == 402, response.text
    assert generalist.requests() == []


def _dear(specialists) -> list[list[dict[str, object]]]:  # type: ignore[no-untyped-def]
    for endpoint in specialists.values():
        endpoint.price_input = endpoint.price_output = usd_to_nanos("2000")  # per M tokens
        endpoint.save()
    return [
        [
            {"name": tag, "arguments": {"input": f"{tag} question", "max_tokens": 8}}
            for tag in ("sql", "legal", "translate")
        ]
    ] * 3


def test_reaching_max_cost_stops_the_tool_calls_and_asks_for_an_answer(gateway_server, market):
    generalist, _general, specialists, *_ = market
    generalist.plan(_dear(specialists))
    customer = factories.customer(credit_usd="5")
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=_orchestrate(max_cost_usd="0.05"))
        body = response.json()
        trace = client.get("/v1/generation", params={"id": body["id"]}).json()["data"]

    assert response.status_code == 200, body
    plan = trace["orchestration"]
    assert plan["stopped"] == "budget_exhausted"
    assert [len(s["tools"]) for s in plan["steps"]] == [3, 0]
    assert generalist.requests()[-1]["tool_choice"] == "none"
    assert plan["cost_nanos"] > usd_to_nanos("0.05")  # the step that crossed it was held


def test_a_leg_the_credit_cannot_hold_stops_the_request_and_nothing_is_overspent(
    gateway_server, market
):
    generalist, general, specialists, specialist_server, _ = market
    generalist.plan(_dear(specialists))
    specialist_server.configure(delay_ms=300)  # the three calls hold their credit together
    customer = factories.customer(credit_usd="1")
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=_orchestrate(max_cost_usd="0.05"))
        body = response.json()

    assert response.status_code == 402, body
    assert body["error"]["code"] == "orchestration_budget_exhausted"
    ingest_all()
    legs = UsageRecord.objects.filter(organization=customer.organization, cost__gt=0)
    served = {r.endpoint_id for r in legs}
    assert general.pk in served and served & {e.pk for e in specialists.values()}
    assert organization_balance(customer.organization) >= 0
    assert organization_balance(customer.organization) == usd_to_nanos("1") - sum(
        r.cost for r in legs
    )


def test_bad_orchestrator_objects_are_clear_400s(gateway_server, market):
    customer = factories.customer()
    bad = [
        ({"model": "orchestrate", "messages": QUESTION}, "missing_orchestrator"),
        ({**_orchestrate(max_steps=0)}, "invalid_value"),
        ({**_orchestrate(max_cost_usd="-1")}, "invalid_value"),
        ({**_orchestrate(colour="red")}, "unknown_parameter"),
        ({**_orchestrate(tools=["no_such_tool"])}, "tool_not_found"),
    ]
    with gateway_server.client(customer.key) as client:
        for body, code in bad:
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code in (400, 404), (body, response.text)
            assert response.json()["error"]["code"] == code, (body, response.text)


def test_the_final_answer_streams_to_the_client(gateway_server, market):
    generalist, *_ = market
    generalist.plan(_three_calls())
    customer = factories.customer()
    chunks: list[dict[str, object]] = []
    with (
        gateway_server.client(customer.key) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                **_orchestrate(),
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["x-request-id"] == response.headers["x-switchyard-orchestration"]
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.startswith("FINAL: [call_0_0] count orders per customer")
    # Passed through as the generalist sent it, a chunk per word, not one block at the end.
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == len(text.split(" "))
    assert chunks[-1]["usage"]["total_tokens"] > 0


def test_another_customer_cannot_read_the_plan(gateway_server, market):
    generalist, *_ = market
    generalist.plan(_three_calls())
    owner, other = factories.customer(), factories.customer()
    with gateway_server.client(owner.key) as client:
        rid = client.post("/v1/chat/completions", json=_orchestrate()).json()["id"]
    with httpx.Client(
        base_url=gateway_server.url, headers={"Authorization": f"Bearer {other.key}"}
    ) as client:
        assert client.get("/v1/generation", params={"id": rid}).status_code == 404
