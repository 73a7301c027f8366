"""A scripted generalist LLM: a real HTTP server that answers with chosen tool calls.

Orchestrated completions hand a generalist model the marketplace's specialist tools and
route its tool calls to specialists. Testing that loop honestly needs a generalist that
really speaks OpenAI's tool-calling protocol over HTTP, and whose choices the test
decides. This server is that generalist:

* A *plan* is a list of steps; each step is a list of tool calls
  ``{"name": "sql_generate", "arguments": {...}}``. The server counts the assistant
  messages with ``tool_calls`` already in the conversation: while that count is below the
  plan's length it answers the next step's tool calls (``finish_reason: "tool_calls"``);
  then it composes a final answer: ``"FINAL:"`` followed by every tool result it was
  given, in order (``role: tool`` messages, ``tool_call_id`` → content), so a test can
  see that results flowed back and that failures were reported.
* A request with ``tool_choice: "none"`` or without ``tools`` always gets the final
  answer (the gateway asks for one when a bound is reached).
* Streaming (``stream: true``) sends the same answer as SSE chunks in OpenAI's shape,
  tool calls as ``delta.tool_calls`` with the arguments split over two chunks.
* ``usage``: prompt tokens = words over all messages (+ 10 per tool offered),
  completion tokens = words of the answer (+ 5 per tool call).

Control API: ``POST /_control/plan`` ``{"steps": [[{"name":..., "arguments": {...}}]],
"delay_ms": 0}``; ``GET /_control/requests`` (every request body received);
``POST /_control/reset``.

Run in-process with ``with ScriptedGeneralist() as g: g.plan([...])``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import httpx
import orjson
from aiohttp import web


def _words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(
            len(str(part.get("text", "")).split()) for part in content if isinstance(part, dict)
        )
    return 0


class _State:
    def __init__(self) -> None:
        self.steps: list[list[dict[str, Any]]] = []
        self.delay_ms = 0
        self.requests: list[dict[str, Any]] = []
        self.seq = itertools.count(1)


def _answer(body: dict[str, Any], state: _State) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The assistant message and the tool calls (empty for a final answer)."""
    messages = body.get("messages") or []
    done_steps = sum(1 for m in messages if m.get("role") == "assistant" and m.get("tool_calls"))
    offers_tools = bool(body.get("tools")) and body.get("tool_choice") != "none"
    if offers_tools and done_steps < len(state.steps):
        calls = [
            {
                "id": f"call_{done_steps}_{i}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": orjson.dumps(call.get("arguments", {})).decode(),
                },
            }
            for i, call in enumerate(state.steps[done_steps])
        ]
        return {"role": "assistant", "content": None, "tool_calls": calls}, calls
    results = [
        f"[{m.get('tool_call_id')}] {m.get('content')}" for m in messages if m.get("role") == "tool"
    ]
    content = "FINAL: " + (" | ".join(results) if results else "no tools used")
    return {"role": "assistant", "content": content}, []


def _usage(body: dict[str, Any], message: dict[str, Any], calls: list[Any]) -> dict[str, int]:
    prompt = sum(_words(m.get("content")) for m in body.get("messages") or []) + 10 * len(
        body.get("tools") or []
    )
    completion = _words(message.get("content")) + 5 * len(calls)
    return {
        "prompt_tokens": max(prompt, 1),
        "completion_tokens": max(completion, 1),
        "total_tokens": max(prompt, 1) + max(completion, 1),
    }


def _chunks(
    cid: str, model: str, message: dict[str, Any], calls: list[dict[str, Any]], usage: Any
) -> list[dict[str, Any]]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    out = [chunk({"role": "assistant", "content": None if calls else ""}, None)]
    if calls:
        for i, call in enumerate(calls):
            args = call["function"]["arguments"]
            half = len(args) // 2
            out.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        ]
                    },
                    None,
                )
            )
            for part in (args[:half], args[half:]):
                out.append(
                    chunk({"tool_calls": [{"index": i, "function": {"arguments": part}}]}, None)
                )
        out.append(chunk({}, "tool_calls"))
    else:
        words = message["content"].split(" ")
        for i, word in enumerate(words):
            out.append(chunk({"content": word if i == 0 else " " + word}, None))
        out.append(chunk({}, "stop"))
    out.append(
        {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
    )
    return out


def build_app(state: _State) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        state.requests.append(body)
        if state.delay_ms:
            await asyncio.sleep(state.delay_ms / 1000)
        message, calls = _answer(body, state)
        usage = _usage(body, message, calls)
        cid = f"chatcmpl-gen-{next(state.seq)}"
        model = str(body.get("model", "generalist"))
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in _chunks(cid, model, message, calls, usage):
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if calls else "stop",
                    }
                ],
                "usage": usage,
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )

    async def plan(request: web.Request) -> web.Response:
        data = orjson.loads(await request.read())
        state.steps = [list(step) for step in data.get("steps", [])]
        state.delay_ms = int(data.get("delay_ms", 0))
        return web.json_response({"steps": len(state.steps)})

    async def requests(request: web.Request) -> web.Response:
        return web.json_response(state.requests, dumps=lambda o: orjson.dumps(o).decode())

    async def reset(request: web.Request) -> web.Response:
        state.steps, state.delay_ms, state.requests = [], 0, []
        return web.json_response({})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_post("/_control/plan", plan)
    app.router.add_get("/_control/requests", requests)
    app.router.add_post("/_control/reset", reset)
    return app


class ScriptedGeneralist:
    """The server in a background thread with its own loop (``with ... as g``)."""

    def __init__(self) -> None:
        self.state = _State()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def plan(self, steps: list[list[dict[str, Any]]], *, delay_ms: int = 0) -> None:
        httpx.post(f"{self.url}/_control/plan", json={"steps": steps, "delay_ms": delay_ms})

    def requests(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/_control/requests").json())

    def start(self) -> ScriptedGeneralist:
        ready = threading.Event()

        async def serve() -> None:
            self._runner = web.AppRunner(build_app(self.state), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=run, name="scripted-generalist", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("scripted generalist did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        loop, runner = self._loop, self._runner

        async def shutdown() -> None:
            if runner is not None:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> ScriptedGeneralist:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
