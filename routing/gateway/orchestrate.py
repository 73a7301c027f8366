"""The orchestration loop: a generalist calls the marketplace's specialists as tools.

``model: "orchestrate"`` (see ``routing.orchestrate`` for the request's bounds): before
the first step the request's whole budget is held against the organisation's credit; then,
up to ``max_steps`` times, the generalist (routed like any chat request: a marketplace
endpoint or the organisation's private one) gets the conversation and the specialist
tools. Its tool calls run through ``run_tool`` — routed, with fallback, metered and billed
like any tool call — independent calls in parallel, and their results (or what went
wrong) go back to it. An answer without tool calls is the final answer. When the steps are
used up, the generalist is asked once more with ``tool_choice: "none"``.

Every call is a leg of its own: billed to the customer, credited to its vendor, with its
own route trace (``<request id>-g<step>`` for the generalist, ``-s<step>.<n>`` for the
specialists). The request's own trace (``GET /v1/generation?id=<request id>``) holds the
whole plan. A final answer that the client asked to stream is sent as SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from django.conf import settings

from billing.money import NANOS_PER_USD
from routing.errors import GatewayError, InsufficientCredit, Unavailable, UpstreamFailed
from routing.gateway.auth import KeyInfo, require_scope
from routing.gateway.http import Send, send_json, send_sse, start_sse
from routing.gateway.proxy import Capture, Job
from routing.gateway.tools import run_tool
from routing.gateway.validate import chat_request
from routing.live import Verdict
from routing.orchestrate import (
    MAX_CALLS_PER_STEP,
    LegRecord,
    OrchestratorSpec,
    Plan,
    ToolCall,
    assistant_turn,
    parse_orchestrator,
    tool_calls_of,
    tool_error,
    tool_turn,
    why_chosen,
)

if TYPE_CHECKING:
    from routing.gateway.app import GatewayApp

# Fields of the client's request that the generalist gets as they are.
PASSED_TO_GENERALIST = ("temperature", "top_p", "seed", "stop", "user", "provider")


class Orchestration:
    """One orchestrated request (``run`` once)."""

    def __init__(
        self, gateway: GatewayApp, key: KeyInfo, body: dict[str, Any], request_id: str
    ) -> None:
        self.gateway = gateway
        self.key = key
        self.body = body
        self.request_id = request_id
        self.spec: OrchestratorSpec = parse_orchestrator(body)
        self.plan = Plan(self.spec)
        self.started = time.monotonic()
        self.deadline = self.started + self.spec.timeout
        self.budget_lease = f"{request_id}:budget:{uuid.uuid4().hex[:8]}"
        self.stream = body.get("stream") is True
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.sniffer: FinalAnswerSniffer | None = None

    # --- the loop -----------------------------------------------------------------------

    async def run(self, send: Send) -> None:
        # The generalist's turns are chat, its calls tool calls: the key needs both.
        require_scope(self.key, "tools")
        catalog = await self.gateway.tool_catalog()
        tools = catalog.for_organization(self.key.organization_id)
        if self.spec.tools is not None:
            missing = [n for n in self.spec.tools if tools.get(n) is None]
            if missing:
                from routing.errors import BadRequest

                raise BadRequest(
                    f"no tool named {missing[0]!r} for this key; GET /v1/tools lists them",
                    param="orchestrator.tools",
                    code="tool_not_found",
                )
            definitions = [tools.by_name[n].definition() for n in self.spec.tools]
        else:
            definitions = tools.definitions()
        messages = list(self.body["messages"])
        await self._open_budget()
        answer: dict[str, Any] | None = None
        try:
            step = 0
            while True:
                if time.monotonic() >= self.deadline:
                    self.plan.stopped = "deadline"
                    raise UpstreamFailed(
                        "the orchestrated request ran out of time "
                        f"({self.spec.timeout} s); the legs already answered are billed",
                        code="deadline_exceeded",
                    )
                final = step >= self.spec.max_steps or not definitions
                if not final and self.plan.cost() >= self.spec.max_cost:
                    final = True
                    self.plan.stopped = "budget_exhausted"
                elif final and definitions and self.plan.stopped == "answered":
                    self.plan.stopped = "step_limit"
                answer, message, calls = await self._generalist_turn(
                    step, messages, definitions, send, final=final
                )
                if not calls:
                    break
                messages.append(assistant_turn(message))
                messages.extend(await self._run_tools(step, calls))
                step += 1
        except InsufficientCredit as exc:
            self.plan.stopped = "budget_exhausted"
            await self._store_trace("failed")
            raise InsufficientCredit(
                f"{exc.message} (orchestrated request stopped at step "
                f"{len(self.plan.steps)}; the legs already answered are billed)",
                code="orchestration_budget_exhausted",
            ) from None
        except GatewayError:
            if self.plan.stopped == "answered":
                self.plan.stopped = "failed"
            await self._store_trace("failed")
            raise
        finally:
            with contextlib.suppress(aioredis.RedisError):
                await asyncio.shield(self._live().budget_close(self.budget_lease))
        await self._store_trace("success")
        if self.sniffer is not None and self.sniffer.passing:
            await self.sniffer.finish()
            return
        await self._answer(answer, send)

    async def _open_budget(self) -> None:
        live = self._live()
        ttl = self.spec.timeout + 60
        for _ in range(3):
            try:
                verdict = await live.budget_open(
                    self.key.organization_id, self.spec.max_cost, self.budget_lease, ttl
                )
            except aioredis.RedisError:
                raise Unavailable(
                    "the gateway cannot reach its state store; nothing was charged",
                    code="state_unavailable",
                ) from None
            if verdict is Verdict.OK:
                return
            if verdict is Verdict.NO_CREDIT:
                raise InsufficientCredit(
                    "your organisation's credit does not cover this orchestrated request's "
                    f"budget (${self.spec.max_cost / NANOS_PER_USD:.6f}); top up or lower "
                    "`orchestrator.max_cost_usd`"
                )
            proxy = self.gateway.proxy
            assert proxy is not None
            version = await live.credit_version(self.key.organization_id)
            balance = await proxy._load_balance(self.key.organization_id)
            await live.init_credit(self.key.organization_id, balance, version)
        raise Unavailable("the gateway could not initialise its credit state; nothing was charged")

    async def _generalist_turn(
        self,
        step: int,
        messages: list[dict[str, Any]],
        definitions: list[dict[str, Any]],
        send: Send,
        *,
        final: bool,
    ) -> tuple[dict[str, Any], dict[str, Any], list[ToolCall]]:
        body: dict[str, Any] = {"model": self.spec.model, "messages": messages}
        for name in PASSED_TO_GENERALIST:
            if name in self.body:
                body[name] = self.body[name]
        if "max_tokens" in self.body:
            body["max_tokens"] = self.body["max_tokens"]
        if self.stream:
            body["stream"] = True
        if definitions:
            body["tools"] = definitions
            body["tool_choice"] = "none" if final else "auto"
        request = chat_request(body, max_messages=settings.GATEWAY_MAX_MESSAGES)
        leg_id = f"{self.request_id}-g{step}"
        job = Job(
            kind="chat",
            request_id=leg_id,
            key=self.key,
            body=body,
            model=request.model,
            upstream_path="/chat/completions",
            prompt_bound=self.gateway.prompt_bound(request),
            max_tokens=request.max_tokens,
            budget_lease=self.budget_lease,
            stream=self.stream,
            include_usage=self.include_usage,
        )
        record = LegRecord(
            leg=leg_id,
            role="generalist",
            model=self.spec.model,
            input_bytes=len(orjson.dumps(messages)),
        )
        self.plan.steps.append({"step": step, "final": final, "generalist": record, "tools": []})
        capture: Capture | FinalAnswerSniffer
        if self.stream:
            capture = self.sniffer = FinalAnswerSniffer(send, self.request_id, self._headers())
        else:
            capture = Capture()
        try:
            await self._within_deadline(self.gateway.run_job(job, capture))
        except GatewayError as exc:
            record.outcome, record.error = "failed", exc.message
            await self._fill_from_trace(record, job.request_id)
            raise
        await self._fill_from_trace(record, job.request_id)
        if isinstance(capture, FinalAnswerSniffer):
            if capture.passing:  # the final answer, already streaming to the client
                self.plan.steps[-1]["final"] = True
                record.output_bytes = capture.forwarded
                return {}, {}, []
            raw = capture.kept
            answer = answer_from_stream(raw)
        else:
            raw = capture.body
            answer = orjson.loads(raw)
        message, calls = tool_calls_of(answer)
        record.output_bytes = len(raw)
        self.plan.steps[-1]["final"] = not calls
        return answer, message, calls

    async def _run_tools(self, step: int, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """Run one step's tool calls, at most ``max_parallel`` at once; the generalist gets
        one tool message per call, in the order it made them."""
        semaphore = asyncio.Semaphore(self.spec.max_parallel)
        records = self.plan.steps[-1]["tools"]

        async def one(index: int, call: ToolCall) -> dict[str, Any]:
            leg_id = f"{self.request_id}-s{step}.{index}"
            record = LegRecord(
                leg=leg_id,
                role="specialist",
                model="",
                tool=call.name,
                call_id=call.id,
                input_bytes=len(call.raw_arguments),
            )
            records.append(record)
            if index >= MAX_CALLS_PER_STEP:
                record.outcome = "not_run"
                record.error = f"more than {MAX_CALLS_PER_STEP} tool calls in one step"
                return tool_turn(call, tool_error(record.error))
            if self.spec.tools is not None and call.name not in self.spec.tools:
                record.outcome, record.error = "not_run", "tool not offered"
                return tool_turn(call, tool_error(f"no tool named {call.name!r} was offered"))
            async with semaphore:
                try:
                    run = await self._within_deadline(
                        run_tool(
                            self.gateway,
                            self.key,
                            call.name,
                            call.arguments if call.arguments is not None else call.raw_arguments,
                            provider=self.body.get("provider"),
                            request_id=leg_id,
                            budget_lease=self.budget_lease,
                        )
                    )
                except InsufficientCredit:
                    record.outcome, record.error = "failed", "insufficient credit"
                    raise
                except GatewayError as exc:
                    record.outcome, record.error = "failed", exc.message
                    await self._fill_from_trace(record, leg_id)
                    return tool_turn(call, tool_error(f"the tool failed: {exc.message}"))
            output = str(run.result.get("output", ""))
            record.model = run.tool.tag
            record.output_bytes = len(output.encode())
            await self._fill_from_trace(record, run.request_id, run.trace)
            return tool_turn(call, output)

        # Every call finishes (and is billed or released) before a failure stops the loop.
        outcomes = await asyncio.gather(
            *(one(i, c) for i, c in enumerate(calls)), return_exceptions=True
        )
        turns: list[dict[str, Any]] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            turns.append(outcome)
        return turns

    async def _within_deadline(self, coro: Any) -> Any:
        remaining = self.deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                return await coro
        except TimeoutError:
            self.plan.stopped = "deadline"
            raise UpstreamFailed(
                f"the orchestrated request ran out of time ({self.spec.timeout} s); "
                "the legs already answered are billed",
                code="deadline_exceeded",
            ) from None

    async def _fill_from_trace(
        self, record: LegRecord, leg_id: str, trace: dict[str, Any] | None = None
    ) -> None:
        if trace is None:
            with contextlib.suppress(aioredis.RedisError):
                trace = await self._live().trace(leg_id)
        if not trace:
            return
        record.leg = str(trace.get("id", leg_id))
        record.served_by = trace.get("served_by")
        record.cost_nanos = int(trace.get("cost_nanos") or 0)
        record.latency_ms = int(trace.get("latency_ms") or 0)
        record.why = why_chosen(trace)
        tokens = trace.get("tokens") or {}
        record.prompt_tokens = int(tokens.get("prompt") or 0)
        record.completion_tokens = int(tokens.get("completion") or 0)
        if not record.model:
            record.model = str(trace.get("model", ""))

    # --- answering ----------------------------------------------------------------------

    def _trace(self, outcome: str) -> dict[str, Any]:
        legs = self.plan.legs
        return {
            "id": self.request_id,
            "organization_id": self.key.organization_id,
            "key_prefix": self.key.prefix,
            "kind": "orchestrate",
            "model": "orchestrate",
            "stream": self.stream,
            "outcome": outcome,
            "served_by": self.spec.model if outcome == "success" else None,
            "orchestration": self.plan.to_trace(),
            "tokens": self.plan.tokens(),
            "cost_nanos": self.plan.cost(),
            "legs": [leg.leg for leg in legs],
            "latency_ms": int((time.monotonic() - self.started) * 1000),
        }

    async def _store_trace(self, outcome: str) -> None:
        with contextlib.suppress(aioredis.RedisError):
            await self._live().store_trace(self.request_id, self._trace(outcome))

    async def _answer(self, answer: dict[str, Any] | None, send: Send) -> None:
        assert answer is not None
        summary = {
            "orchestration": {
                "steps": len(self.plan.steps),
                "legs": [leg.leg for leg in self.plan.legs],
                "stopped": self.plan.stopped,
            },
            "cost_nanos": self.plan.cost(),
            "cost_usd": f"{self.plan.cost() / NANOS_PER_USD:.9f}",
        }
        # Every leg's tokens and cost: what the whole orchestrated request used.
        tokens = self.plan.tokens()
        usage = {
            "prompt_tokens": tokens["prompt"],
            "completion_tokens": tokens["completion"],
            "total_tokens": tokens["prompt"] + tokens["completion"],
            "cost_nanos": self.plan.cost(),
        }
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        content = message.get("content") or ""
        headers = {
            "x-switchyard-orchestration-steps": str(len(self.plan.steps)),
            "x-switchyard-legs": str(len(self.plan.legs)),
            "x-switchyard-cost-nanos": str(self.plan.cost()),
        }
        created = int(time.time())
        if not self.stream:
            body = {
                "id": self.request_id,
                "object": "chat.completion",
                "created": created,
                "model": "orchestrate",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": choice.get("finish_reason") or "stop",
                    }
                ],
                "usage": usage,
                "switchyard": summary,
            }
            await send_json(send, 200, body, self.request_id, headers)
            return
        await start_sse(send, self.request_id, headers)

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            event = {
                "id": self.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": "orchestrate",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + orjson.dumps(event) + b"\n\n"

        await send_sse(send, chunk({"role": "assistant", "content": ""}, None))
        await send_sse(send, chunk({"content": content}, None))
        tail = chunk({}, choice.get("finish_reason") or "stop")
        options = self.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            usage_event = {
                "id": self.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": "orchestrate",
                "choices": [],
                "usage": usage,
                "switchyard": summary,
            }
            tail += b"data: " + orjson.dumps(usage_event) + b"\n\n"
        await send_sse(send, tail + b"data: [DONE]\n\n", more=False)

    def _headers(self) -> dict[str, str]:
        return {"x-switchyard-orchestration": self.request_id}

    def _live(self) -> Any:
        live = self.gateway.live
        assert live is not None
        return live


class FinalAnswerSniffer:
    """The ``send`` of a streamed generalist turn: undecided until the first chunk that
    carries content or tool calls. Content: the turn is the final answer, and everything
    passes through to the client as it arrives (its response headers re-labelled with the
    orchestrated request's id; the last message held back until the plan is stored).
    Tool calls: the turn is kept, and its calls read back from the chunks."""

    def __init__(self, send: Send, request_id: str, headers: dict[str, str]) -> None:
        self._send = send
        self._request_id = request_id.encode()
        self._headers = headers
        self._held: list[dict[str, Any]] = []
        self._pending = b""
        self.passing = False
        self.forwarded = 0  # body bytes passed to the client
        self.kept = b""
        self.last: dict[str, Any] | None = None

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
            headers.append((b"x-request-id", self._request_id))
            headers.extend((k.encode(), v.encode()) for k, v in self._headers.items())
            message = {**message, "headers": headers}
        if self.passing:
            await self._forward(message)
            return
        self._held.append(message)
        body = message.get("body", b"")
        self.kept += body
        self._pending += body
        while b"\n\n" in self._pending:
            event, self._pending = self._pending.split(b"\n\n", 1)
            if _carries_content(event):
                self.passing = True
                held, self._held = self._held, []
                for item in held:
                    await self._forward(item)
                return

    async def _forward(self, message: dict[str, Any]) -> None:
        self.forwarded += len(message.get("body", b""))
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.last = message  # sent once the orchestration's trace is stored
            return
        await self._send(message)

    async def finish(self) -> None:
        if self.last is not None:
            await self._send(self.last)
            self.last = None


def _carries_content(event: bytes) -> bool:
    line = event.strip()
    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
        return False
    try:
        chunk = orjson.loads(line[5:])
    except orjson.JSONDecodeError:
        return False
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("tool_calls"):
            return False
        if delta.get("content"):
            return True
    return False


def answer_from_stream(raw: bytes) -> dict[str, Any]:
    """A streamed tool-calling turn, put back together as a chat completion."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    usage: dict[str, Any] = {}
    for line in raw.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        chunk = orjson.loads(line[5:])
        if "error" in chunk:
            raise UpstreamFailed(
                f"the generalist's stream broke off: {chunk['error'].get('message', '')}"
            )
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            finish = choice.get("finish_reason") or finish
            if delta.get("content"):
                content.append(delta["content"])
            for part in delta.get("tool_calls") or ():
                call = calls.setdefault(
                    int(part.get("index", 0)),
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                call["id"] = part.get("id") or call["id"]
                function = part.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"choices": [{"message": message, "finish_reason": finish}], "usage": usage}
