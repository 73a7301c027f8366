"""An orchestrated completion end to end: the customer's own generalist (a scripted
tool-calling LLM registered as their private endpoint) hands three sub-tasks to a real
small language model (SmolLM2-135M-Instruct on llama.cpp), through the openai SDK."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
from django.core.management import call_command

from billing.ledger import organization_balance
from billing.models import UsageRecord
from tests import factories
from tests.conftest import ingest_all
from tests.support.generalist import ScriptedGeneralist

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slm]

PLAN = [
    [
        {
            "name": "sql",
            "arguments": {"input": "Count the rows of the table users.", "max_tokens": 16},
        },
        {
            "name": "legal",
            "arguments": {"input": "Is a verbal contract binding?", "max_tokens": 16},
        },
        {"name": "translate", "arguments": {"input": "Bonjour le monde", "max_tokens": 16}},
    ]
]


def test_a_private_generalist_orchestrates_three_real_specialists(gateway_server, smollm2):
    customer = factories.customer(credit_usd="1")
    before = organization_balance(customer.organization)
    with ScriptedGeneralist() as generalist:
        generalist.plan(PLAN)
        mine = factories.endpoint(
            base_url=generalist.base_url,
            tags=("general",),
            slug="frontier",
            private_to=customer.organization,
        )
        specialist = factories.endpoint(
            base_url=smollm2.base_url,
            upstream_model=smollm2.model,
            tags=("sql", "legal", "translate"),
            capacity=8,  # the three calls run at once
            price_input_usd="0.1",
            price_output_usd="0.2",
        )
        client = openai.OpenAI(api_key=customer.key, base_url=f"{gateway_server.url}/v1")
        stream = client.chat.completions.create(
            model="orchestrate",
            messages=[{"role": "user", "content": "Help me with three small tasks."}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"orchestrator": {"model": mine.full_slug}},
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        request_id = stream.response.headers["x-request-id"]
        trace = httpx.get(
            f"{gateway_server.url}/v1/generation",
            params={"id": request_id},
            headers={"Authorization": f"Bearer {customer.key}"},
        ).json()["data"]

    # The real model's three answers went back to the generalist, which composed the answer.
    assert text.startswith("FINAL: [call_0_0] ")
    assert text.count("[call_0_") == 3
    plan = trace["orchestration"]
    calls = plan["steps"][0]["tools"]
    assert [c["tool"] for c in calls] == ["sql", "legal", "translate"]
    assert {c["served_by"] for c in calls} == {specialist.full_slug}, calls
    assert all(c["outcome"] == "success" and c["output_bytes"] > 0 for c in calls)
    assert plan["steps"][0]["generalist"]["served_by"] == mine.full_slug

    assert ingest_all() == 5  # two generalist turns and three specialist calls
    legs = UsageRecord.objects.filter(organization=customer.organization)
    assert sorted(r.endpoint_id for r in legs) == sorted([mine.pk] * 2 + [specialist.pk] * 3)
    assert all(r.cost > 0 for r in legs)
    assert organization_balance(customer.organization) == before - sum(r.cost for r in legs)
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    assert "reconciled: no mismatch" in out.getvalue()
