"""Orchestrated completions: a generalist model with the marketplace's specialists as tools.

``model: "orchestrate"`` with an ``orchestrator`` object runs a bounded loop inside the
gateway (``routing.gateway.orchestrate``): the generalist gets the specialist tools; its
tool calls are routed to specialists, independent calls in parallel; the results go back
to it; it composes the final answer. This module holds the pure parts: the request's
bounds, the tool calls read from an answer, and the plan recorded in the trace.

Bounds (each has a default and a ceiling, see ``OrchestratorSpec``):

* ``max_steps``: generalist turns that may call tools. When they are used up, the
  generalist is asked once more, with ``tool_choice: "none"``, to answer from what it has.
* ``max_parallel``: tool calls run at once; a step's calls beyond ``max_calls_per_step``
  are not run and the generalist is told so.
* ``timeout``: seconds for the whole request, every leg included.
* ``max_cost_usd``: the most the whole request may cost. That much credit is held before
  the first step; each leg draws on it first and on the spendable credit beyond it (the
  hold grows only if the balance allows); no new step starts once the spend reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from billing.money import NANOS_PER_USD
from routing.errors import BadRequest

ORCHESTRATE = "orchestrate"  # the model name that asks for an orchestrated completion
MAX_STEPS_CEILING = 8
MAX_PARALLEL_CEILING = 8
MAX_CALLS_PER_STEP = 16
TIMEOUT_CEILING_SECONDS = 300
DEFAULT_MAX_COST_NANOS = NANOS_PER_USD // 20  # $0.05
MAX_COST_CEILING_NANOS = 100 * NANOS_PER_USD


@dataclass(frozen=True, slots=True)
class OrchestratorSpec:
    """The ``orchestrator`` object of a request, validated."""

    model: str
    max_steps: int = 4
    max_parallel: int = 4
    timeout: int = 120
    max_cost: int = DEFAULT_MAX_COST_NANOS
    tools: tuple[str, ...] | None = None  # None: every tool the key can see

    def to_trace(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_steps": self.max_steps,
            "max_parallel": self.max_parallel,
            "timeout": self.timeout,
            "max_cost_nanos": self.max_cost,
            "tools": list(self.tools) if self.tools is not None else None,
        }


def _bounded_int(raw: dict[str, Any], name: str, default: int, ceiling: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
        raise BadRequest(
            f"`orchestrator.{name}` must be an integer from 1 to {ceiling}",
            param=f"orchestrator.{name}",
            code="invalid_value",
        )
    return value


def parse_orchestrator(body: dict[str, Any]) -> OrchestratorSpec:
    """Validate ``body["orchestrator"]``; a clear 400 before anything is called."""
    raw = body.get("orchestrator")
    if not isinstance(raw, dict):
        raise BadRequest(
            '`model: "orchestrate"` needs an `orchestrator` object naming the generalist, '
            'e.g. {"model": "acme/frontier"}',
            param="orchestrator",
            code="missing_orchestrator",
        )
    unknown = set(raw) - {"model", "max_steps", "max_parallel", "timeout", "max_cost_usd", "tools"}
    if unknown:
        raise BadRequest(
            f"unknown field(s) in `orchestrator`: {', '.join(sorted(unknown))}",
            param="orchestrator",
            code="unknown_parameter",
        )
    model = raw.get("model")
    if not isinstance(model, str) or not model or len(model) > 256 or model == "orchestrate":
        raise BadRequest(
            "`orchestrator.model` must name the generalist: an endpoint `vendor/endpoint`, "
            "your private endpoint or a `tag:`",
            param="orchestrator.model",
            code="invalid_value",
        )
    max_cost = DEFAULT_MAX_COST_NANOS
    if "max_cost_usd" in raw:
        text = raw["max_cost_usd"]
        try:
            if isinstance(text, bool) or not isinstance(text, str | int):
                raise InvalidOperation
            max_cost = int(Decimal(str(text)) * NANOS_PER_USD)
        except (InvalidOperation, ValueError):
            max_cost = -1
        if not 0 < max_cost <= MAX_COST_CEILING_NANOS:
            raise BadRequest(
                "`orchestrator.max_cost_usd` must be a positive amount in USD as a string, "
                'e.g. "0.05", at most 100',
                param="orchestrator.max_cost_usd",
                code="invalid_value",
            )
    tools: tuple[str, ...] | None = None
    if "tools" in raw:
        names = raw["tools"]
        if (
            not isinstance(names, list)
            or not names
            or len(names) > 128
            or not all(isinstance(n, str) and 0 < len(n) <= 64 for n in names)
        ):
            raise BadRequest(
                "`orchestrator.tools` must be a non-empty list of tool names (see GET /v1/tools)",
                param="orchestrator.tools",
                code="invalid_value",
            )
        tools = tuple(dict.fromkeys(names))
    return OrchestratorSpec(
        model=model,
        max_steps=_bounded_int(raw, "max_steps", 4, MAX_STEPS_CEILING),
        max_parallel=_bounded_int(raw, "max_parallel", 4, MAX_PARALLEL_CEILING),
        timeout=_bounded_int(raw, "timeout", 120, TIMEOUT_CEILING_SECONDS),
        max_cost=max_cost,
        tools=tools,
    )


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any] | None  # None: the generalist sent arguments that are not JSON
    raw_arguments: str


def tool_calls_of(answer: dict[str, Any]) -> tuple[dict[str, Any], list[ToolCall]]:
    """The assistant message of a chat answer and the tool calls in it."""
    choices = answer.get("choices") or [{}]
    message = choices[0].get("message") or {}
    calls: list[ToolCall] = []
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        raw = function.get("arguments") or "{}"
        try:
            arguments = orjson.loads(raw) if isinstance(raw, str) else raw
        except orjson.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            arguments = None
        calls.append(
            ToolCall(
                id=str(call.get("id") or f"call_{index}"),
                name=str(function.get("name") or ""),
                arguments=arguments,
                raw_arguments=raw if isinstance(raw, str) else orjson.dumps(raw).decode(),
            )
        )
    return message, calls


def assistant_turn(message: dict[str, Any]) -> dict[str, Any]:
    """The generalist's tool-calling turn as it goes back into the conversation."""
    return {
        "role": "assistant",
        "content": message.get("content"),
        "tool_calls": message.get("tool_calls") or [],
    }


def tool_turn(call: ToolCall, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.id, "content": content}


def tool_error(message: str) -> str:
    """What the generalist is told when a tool failed (it may try another way)."""
    return orjson.dumps({"error": message}).decode()


@dataclass
class LegRecord:
    """One billed call of an orchestrated request, as the trace shows it."""

    leg: str  # the leg's request id (its own trace: GET /v1/generation?id=<leg>)
    role: str  # "generalist" | "specialist"
    model: str  # what was asked for: the generalist's model or the tool's tag
    tool: str | None = None
    call_id: str | None = None
    outcome: str = "success"
    served_by: str | None = None
    why: str = ""
    input_bytes: int = 0
    output_bytes: int = 0
    cost_nanos: int = 0
    latency_ms: int = 0
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "leg": self.leg,
            "role": self.role,
            "model": self.model,
            "tool": self.tool,
            "call_id": self.call_id,
            "outcome": self.outcome,
            "served_by": self.served_by,
            "why": self.why,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "cost_nanos": self.cost_nanos,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
        }


@dataclass
class Plan:
    """Every step of an orchestrated request: the trace's ``orchestration`` section."""

    spec: OrchestratorSpec
    steps: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "answered"  # answered | step_limit | budget_exhausted | deadline | failed

    @property
    def legs(self) -> list[LegRecord]:
        out: list[LegRecord] = []
        for step in self.steps:
            out.append(step["generalist"])
            out.extend(step["tools"])
        return out

    def cost(self) -> int:
        return sum(leg.cost_nanos for leg in self.legs)

    def tokens(self) -> dict[str, int]:
        legs = self.legs
        return {
            "prompt": sum(leg.prompt_tokens for leg in legs),
            "completion": sum(leg.completion_tokens for leg in legs),
        }

    def to_trace(self) -> dict[str, Any]:
        return {
            "orchestrator": self.spec.to_trace(),
            "stopped": self.stopped,
            "steps": [
                {
                    "step": step["step"],
                    "final": step["final"],
                    "generalist": step["generalist"].as_dict(),
                    "tools": [t.as_dict() for t in step["tools"]],
                }
                for step in self.steps
            ],
            "legs": len(self.legs),
            "billed_legs": sum(1 for leg in self.legs if leg.cost_nanos > 0),
            "cost_nanos": self.cost(),
        }


def why_chosen(leg_trace: dict[str, Any] | None) -> str:
    """One readable line from a leg's route trace: how its endpoint was chosen."""
    if not leg_trace:
        return ""
    routing = leg_trace.get("routing") or {}
    served = leg_trace.get("served_by")
    candidates = routing.get("candidates") or []
    mine = next((c for c in candidates if c.get("endpoint") == served), None)
    attempts = leg_trace.get("attempts") or []
    parts = []
    if mine is not None:
        parts.append(
            f"{routing.get('strategy', 'balanced')}: rank {mine['rank'] + 1} of "
            f"{routing.get('eligible', len(candidates))} eligible, score {mine['score']}"
        )
    if len(attempts) > 1:
        parts.append(f"after {len(attempts) - 1} failed attempt(s)")
    return "; ".join(parts)
