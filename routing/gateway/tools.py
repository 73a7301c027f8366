"""Running a tool: one capability tag's specialist, called like a function.

``run_tool`` is the one way a tool call runs, whoever calls it (``POST /v1/tools/<name>``,
the MCP server, an orchestrator): look the tool up in the caller's catalog, check the
arguments (a 400 before any vendor is called), turn them into a chat request for
``tag:<tag>`` and run that through the gateway's usual path (routing policy, holds,
fallback, metering, trace). It returns the tool result and the request's route trace.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from django.conf import settings

from routing.errors import BadRequest, NotFound
from routing.gateway.auth import KeyInfo
from routing.gateway.proxy import Capture, Job
from routing.gateway.validate import chat_request
from routing.tools import Tool, tool_result

if TYPE_CHECKING:
    from routing.gateway.app import GatewayApp

TOOLS_PREFIX = "/v1/tools/"
CALL_FIELDS = frozenset({"arguments", "provider"})


@dataclass
class ToolRun:
    """A served tool call: the answer, its route trace and the route headers."""

    tool: Tool
    result: dict[str, Any]
    trace: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return str(self.result["id"])


async def find_tool(gateway: GatewayApp, key: KeyInfo, name: str) -> Tool:
    catalog = await gateway.tool_catalog()
    tool = catalog.for_organization(key.organization_id).get(name)
    if tool is None:
        raise NotFound(
            f"no tool named {name[:80]!r} for this key; GET /v1/tools lists them",
            code="tool_not_found",
        )
    return tool


async def run_tool(
    gateway: GatewayApp,
    key: KeyInfo,
    name: str,
    arguments: Any,
    *,
    provider: Any = None,
    request_id: str | None = None,
    budget_lease: str = "",
) -> ToolRun:
    """Run tool ``name`` for ``key`` (billed to the key's organisation, under its limits).

    Raises the gateway's errors (``NotFound`` ``tool_not_found``, ``BadRequest``
    ``invalid_tool_arguments``, 402, 429, 502, 503...) before or instead of a result;
    nothing is charged for an error.
    """
    tool = await find_tool(gateway, key, name)
    body = tool.chat_body(tool.parse_arguments(arguments), provider)
    request = chat_request(body, max_messages=settings.GATEWAY_MAX_MESSAGES)
    job = Job(
        kind="chat",
        request_id=request_id or f"gen-{uuid.uuid4().hex}",
        budget_lease=budget_lease,
        key=key,
        body=body,
        model=request.model,
        upstream_path="/chat/completions",
        prompt_bound=gateway.prompt_bound(request),
        max_tokens=request.max_tokens,
        tool=tool.name,
    )
    capture = Capture()
    await gateway.run_job(job, capture)
    answer = orjson.loads(capture.body)
    result = tool_result(tool, answer)
    trace = job.trace
    if trace is None or trace.get("id") != result["id"]:
        # A cascade answered from one of its legs: that leg's trace is the one kept.
        assert gateway.live is not None
        trace = await gateway.live.trace(str(result["id"]))
    return ToolRun(tool, result, trace, capture.route_headers())


def tool_call_fields(body: dict[str, Any]) -> tuple[Any, Any]:
    """``arguments`` and ``provider`` of a ``POST /v1/tools/<name>`` body."""
    unknown = sorted(set(body) - CALL_FIELDS)
    if unknown:
        raise BadRequest(
            f'unknown field `{unknown[0]}`: send {{"arguments": {{...}}, "provider": {{...}}}}',
            param=unknown[0],
            code="unknown_field",
        )
    return body.get("arguments"), body.get("provider")
