"""The MCP server at /mcp, driven by the official SDK's own client (streamable HTTP +
ClientSession) against the running application and real fault-injecting vendors."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import httpx2
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from billing.ledger import organization_balance
from billing.models import UsageRecord
from tests import factories
from tests.conftest import ingest_all

pytestmark = pytest.mark.django_db(transaction=True)


async def _session_do(url: str, key: str | None, action: Any, era: str) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        if era == "modern":
            await session.discover()  # 2026-07-28: no handshake, every request stands alone
        else:
            await session.initialize()
        return await action(session)


def _run(url: str, key: str | None, action: Any, era: str = "handshake") -> Any:
    return asyncio.run(_session_do(url, key, action, era))


def test_the_sdk_client_lists_the_keys_tools(gateway_server, upstream):
    factories.endpoint(base_url=upstream.base_url, tags=("sql", "translation"))
    owner = factories.customer()
    factories.endpoint(
        base_url=upstream.base_url, tags=("contracts",), private_to=owner.organization
    )
    customer = factories.customer()

    async def list_tools(session: ClientSession) -> list[types.Tool]:
        return (await session.list_tools()).tools

    tools = {t.name: t for t in _run(gateway_server.url, customer.key, list_tools)}
    owner_tools = {t.name for t in _run(gateway_server.url, owner.key, list_tools)}

    assert set(tools) == {"sql", "translation"}
    assert owner_tools == {"sql", "translation", "contracts"}
    with gateway_server.client(customer.key) as client:
        listed = client.get("/v1/tools").json()["data"]
    http_tools = {t["function"]["name"]: t["function"] for t in listed}
    assert tools["sql"].input_schema == http_tools["sql"]["parameters"]
    assert tools["sql"].description == http_tools["sql"]["description"]


@pytest.mark.parametrize("era", ["handshake", "modern"])
def test_the_sdk_client_calls_a_tool_billed_to_the_key(gateway_server, upstream, era):
    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    customer = factories.customer()
    before = organization_balance(customer.organization)

    async def call(session: ClientSession) -> Any:
        return await session.call_tool("sql", {"input": "find duplicate emails"})

    result = _run(gateway_server.url, customer.key, call, era)

    assert not result.is_error
    assert result.content[0].text == "find duplicate emails"
    structured = result.structured_content
    assert structured["tool"] == "sql" and structured["model"] == endpoint.full_slug
    assert ingest_all() == 1
    record = UsageRecord.objects.get(request_id=structured["id"])
    assert record.cost == structured["cost_nanos"] > 0
    assert organization_balance(customer.organization) == before - record.cost
    with gateway_server.client(customer.key) as client:
        trace = client.get("/v1/generation", params={"id": structured["id"]}).json()["data"]
    assert trace["tool"] == "sql"


def test_the_sdk_client_sees_errors_as_tool_errors_and_unknown_tools_as_protocol_errors(
    gateway_server, upstream
):
    factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    broke = factories.customer(credit_usd=None)

    async def calls(session: ClientSession) -> Any:
        bad = await session.call_tool("sql", {"colour": "red"})
        unpaid = await session.call_tool("sql", {"input": "select 1"})
        try:
            await session.call_tool("no_such_tool", {"input": "x"})
        except MCPError as exc:
            unknown: Any = exc
        else:
            unknown = None
        return bad, unpaid, unknown

    bad, unpaid, unknown = _run(gateway_server.url, broke.key, calls)

    assert bad.is_error and bad.structured_content["error"]["code"] == "invalid_tool_arguments"
    assert unpaid.is_error
    assert unpaid.structured_content["error"]["code"] == "insufficient_credit"
    assert unknown is not None and "no tool named" in unknown.message
    assert upstream.stats()["total"] == 0


def test_the_mcp_endpoint_refuses_requests_without_a_valid_key(gateway_server, upstream):
    factories.endpoint(base_url=upstream.base_url, tags=("sql",))

    async def list_tools(session: ClientSession) -> Any:
        return await session.list_tools()

    # The SDK's client gets no session: its initialize request is answered 401.
    with pytest.raises(ExceptionGroup) as refused:
        _run(gateway_server.url, None, list_tools)
    assert refused.group_contains(MCPError)

    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "curl", "version": "1"},
        },
    }
    accept = {"Accept": "application/json, text/event-stream"}
    with httpx.Client(base_url=gateway_server.url, timeout=10) as client:
        anonymous = client.post("/mcp", json=initialize, headers=accept)
        wrong = client.post(
            "/mcp",
            json=initialize,
            headers={**accept, "Authorization": "Bearer sy-live-notarealkey00000000"},
        )
    for response in (anonymous, wrong):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"]["type"] == "authentication_error"
    assert upstream.stats()["total"] == 0
