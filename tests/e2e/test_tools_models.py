"""Specialists as tools with a real local small language model (SmolLM2-135M-Instruct on
llama.cpp) as the vendor: over HTTP and through the MCP SDK's own client."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from billing.ledger import organization_balance
from billing.models import UsageRecord
from tests import factories
from tests.conftest import ingest_all
from vendors.models import CapabilityTag

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slm]


def test_a_real_model_answers_a_tool_call_over_http_and_over_mcp(gateway_server, smollm2):
    CapabilityTag.objects.create(
        slug="sql", name="SQL", description="Writing, explaining and fixing SQL queries."
    )
    endpoint = factories.endpoint(
        base_url=smollm2.base_url,
        upstream_model=smollm2.model,
        tags=("sql",),
        price_input_usd="0.1",
        price_output_usd="0.2",
    )
    customer = factories.customer(credit_usd="1")
    before = organization_balance(customer.organization)
    arguments = {"input": "Count the rows of the table users.", "max_tokens": 24}

    with gateway_server.client(customer.key) as client:
        listed = client.get("/v1/tools").json()["data"]
        response = client.post("/v1/tools/sql", json={"arguments": arguments})
    assert [t["function"]["name"] for t in listed] == ["sql"]
    assert response.status_code == 200, response.text
    over_http = response.json()
    assert over_http["output"].strip() and over_http["model"] == endpoint.full_slug
    assert 0 < over_http["usage"]["completion_tokens"] <= 24

    async def over_mcp() -> Any:
        headers = {"Authorization": f"Bearer {customer.key}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=60) as http,
            streamable_http_client(f"{gateway_server.url}/mcp", http_client=http) as streams,
            ClientSession(*streams) as session,
        ):
            await session.initialize()
            return await session.call_tool("sql", arguments)

    result = asyncio.run(over_mcp())
    assert not result.is_error and result.content[0].text.strip()

    assert ingest_all() == 2
    charged = 0
    for request_id in (over_http["id"], result.structured_content["id"]):
        record = UsageRecord.objects.get(request_id=request_id)
        assert record.endpoint_id == endpoint.pk and record.cost > 0
        charged += record.cost
    assert organization_balance(customer.organization) == before - charged
