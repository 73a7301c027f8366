"""``/mcp``: the tool catalog as a Model Context Protocol server (streamable HTTP).

Built on the official ``mcp`` SDK's low-level ``Server`` and its
``StreamableHTTPSessionManager`` in stateless mode with JSON responses: every HTTP request
stands alone, so any gateway replica can answer any request and nothing is kept per client.
The gateway authenticates the bearer API key (its key cache) before the SDK sees the
request and passes the key along in the ASGI scope; ``tools/list`` answers the key's
catalog and ``tools/call`` runs ``routing.gateway.tools.run_tool`` (billed to the key,
under the same limits and policy as ``POST /v1/tools/<name>``).

The session manager needs a running task group for its whole life: it runs in a task of
its own, started on the first MCP request and stopped with the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, cast

import mcp_types as types
from django.conf import settings
from mcp.server import Server, ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError

from routing.errors import GatewayError, Unauthorized
from routing.gateway.auth import KeyInfo
from routing.gateway.http import Receive, Scope, Send
from routing.gateway.tools import find_tool, run_tool

if TYPE_CHECKING:
    from routing.gateway.app import GatewayApp

logger = logging.getLogger("switchyard.gateway")

KEY_SCOPE = "switchyard.key"
INSTRUCTIONS = (
    "Each tool is a capability of Switchyard's marketplace of specialist small language "
    "models (SQL, translation, classification...). A call is routed to one specialist by "
    "price, quality and load, falls back to another on failure, and is billed to your API "
    "key's organisation."
)


class McpToolServer:
    def __init__(self, gateway: GatewayApp) -> None:
        self.gateway = gateway
        self.server: Server[Any] = Server(
            "switchyard",
            version="1",
            instructions=INSTRUCTIONS,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        self._manager: StreamableHTTPSessionManager | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()

    async def handle(self, scope: Scope, receive: Receive, send: Send, key: KeyInfo) -> None:
        manager = await self._running()
        # Starlette types ``send`` over MutableMapping messages; ours are plain dicts.
        await manager.handle_request({**scope, KEY_SCOPE: key}, receive, cast(Any, send))

    async def _running(self) -> StreamableHTTPSessionManager:
        if self._manager is not None and self._ready.is_set():
            return self._manager
        async with self._lock:
            if self._task is None:
                # A manager runs once: a new one per server (and per event loop).
                self._manager = StreamableHTTPSessionManager(
                    app=self.server,
                    json_response=True,
                    stateless=True,
                    max_request_body_size=settings.GATEWAY_MAX_BODY_BYTES,
                )
                self._task = asyncio.get_running_loop().create_task(self._serve(self._manager))
            await self._ready.wait()
        assert self._manager is not None
        return self._manager

    async def _serve(self, manager: StreamableHTTPSessionManager) -> None:
        try:
            async with manager.run():
                self._ready.set()
                await self._stopping.wait()
        except Exception:
            logger.exception("the MCP session manager stopped")
            raise

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    # --- MCP handlers ---------------------------------------------------------------------

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        key = _key(ctx)
        tools = (await self.gateway.tool_catalog()).for_organization(key.organization_id)
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=tool.name,
                    title=tool.title,
                    description=tool.description,
                    input_schema=dict(tool.parameters),
                )
                for tool in tools.tools
            ]
        )

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        key = _key(ctx)
        try:
            await find_tool(self.gateway, key, params.name)
        except GatewayError as exc:
            # Not finding the tool is a protocol error; what the tool does is a result.
            raise MCPError(types.INVALID_PARAMS, exc.message) from None
        try:
            run = await run_tool(self.gateway, key, params.name, params.arguments or {})
        except GatewayError as exc:
            return types.CallToolResult(
                content=[types.TextContent(text=f"{exc.code}: {exc.message}")],
                structured_content=exc.body(),
                is_error=True,
            )
        return types.CallToolResult(
            content=[types.TextContent(text=run.result["output"])],
            structured_content=run.result,
        )


def _key(ctx: ServerRequestContext[Any]) -> KeyInfo:
    request = ctx.request
    key = request.scope.get(KEY_SCOPE) if request is not None else None
    if not isinstance(key, KeyInfo):  # the gateway authenticates before the SDK runs
        raise Unauthorized("missing API key", code="missing_api_key")
    return key
