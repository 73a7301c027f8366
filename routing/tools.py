"""Specialists as tools: one function-tool definition per capability tag a key may use.

A pure projection of the routing snapshot, built once per snapshot (``ToolCatalog.build``)
and read without I/O by ``GET /v1/tools``, ``POST /v1/tools/<name>`` and the MCP server
(``routing.gateway.tools``). A tool is a capability tag: its name is the tag's slug with
dashes as underscores (``intent-classification`` -> ``intent_classification``), its
description the tag's plus what the endpoints serving it declare, its parameters a JSON
schema (``input``, optional ``instructions``, ``domain``, ``max_tokens``). Calling it is a
chat request for ``tag:<tag>`` (``tag:<tag>+<domain>`` with a domain) with a system prompt
per tag: routed, billed and traced like any other request.

Private endpoints count only for their organisation: an organisation that owns some has a
catalog of its own, built at the same time.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from billing.money import format_usd
from routing.errors import BadRequest
from routing.snapshot import EndpointView, Snapshot, TagView

TOOL_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
MAX_INSTRUCTIONS_CHARS = 4000
ARGUMENT_FIELDS = frozenset({"input", "instructions", "domain", "max_tokens"})
TOOL_ERROR_CODE = "invalid_tool_arguments"


def tool_names(slugs: Iterable[str], assigned: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{tag slug: tool name}``, stable: a slug's name depends on that slug alone, except
    when two slugs collide (``a-b`` and ``a_b``): the one equal to the name keeps it, the
    other gets a suffix derived from its own slug. Names in ``assigned`` are kept as they
    are (public tags are named first, so a private tag never renames a public tool)."""
    names: dict[str, str] = dict(assigned or {})
    taken: set[str] = set(names.values())
    # Slugs that are already valid names claim them first, in a fixed order.
    for slug in sorted(set(slugs) - set(names), key=lambda s: (s.replace("-", "_") != s, s)):
        name = slug.replace("-", "_").lower()[:64]
        if name in taken or not TOOL_NAME.match(name):
            digest = hashlib.sha256(slug.encode()).hexdigest()[:6]
            name = f"{re.sub(r'[^a-z0-9_]', '_', name)[:57]}_{digest}"
        taken.add(name)
        names[slug] = name
    return names


@dataclass(frozen=True, slots=True)
class ToolArguments:
    input: str
    instructions: str = ""
    domain: str | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    tag: str
    kind: str
    title: str
    description: str
    parameters: Mapping[str, Any]
    system_prompt: str
    domains: tuple[str, ...] = ()
    max_tokens_limit: int = 2048
    endpoints: int = 0

    def definition(self) -> dict[str, Any]:
        """The OpenAI function-tool definition (``tools=[...]`` of a chat request)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def parse_arguments(self, raw: Any) -> ToolArguments:
        """The call's arguments, checked against the schema; a 400 names the field.

        ``raw`` may be the JSON string an OpenAI ``tool_calls`` entry carries.
        """
        if isinstance(raw, str):
            try:
                raw = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise _argument_error("`arguments` is a string but not valid JSON", None) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _argument_error("`arguments` must be an object", None)
        unknown = sorted(set(raw) - ARGUMENT_FIELDS)
        if unknown:
            raise _argument_error(
                f"unknown argument(s) {', '.join(unknown)}; {self.name} takes "
                + ", ".join(sorted(self.parameters["properties"])),
                unknown[0],
            )
        text = raw.get("input")
        if not isinstance(text, str) or not text.strip():
            raise _argument_error("`input` is required: a non-empty string", "input")
        instructions = raw.get("instructions", "")
        if instructions is None:
            instructions = ""
        if not isinstance(instructions, str):
            raise _argument_error("`instructions` must be a string", "instructions")
        if len(instructions) > MAX_INSTRUCTIONS_CHARS:
            raise _argument_error(
                f"`instructions` must be at most {MAX_INSTRUCTIONS_CHARS} characters",
                "instructions",
            )
        domain = raw.get("domain")
        if domain is not None and domain not in self.domains:
            choices = ", ".join(self.domains) if self.domains else "none for this tool"
            raise _argument_error(f"`domain` must be one of: {choices}", "domain")
        max_tokens = raw.get("max_tokens")
        if max_tokens is not None and (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int)
            or not 1 <= max_tokens <= self.max_tokens_limit
        ):
            raise _argument_error(
                f"`max_tokens` must be an integer from 1 to {self.max_tokens_limit}", "max_tokens"
            )
        return ToolArguments(text, instructions.strip(), domain, max_tokens)

    def model(self, arguments: ToolArguments) -> str:
        tags = [self.tag, arguments.domain] if arguments.domain else [self.tag]
        return "tag:" + "+".join(tags)

    def chat_body(self, arguments: ToolArguments, provider: Any = None) -> dict[str, Any]:
        """The chat request a call becomes (validated by the gateway like any other)."""
        system = self.system_prompt
        if arguments.instructions:
            system = f"{system}\n\nInstructions from the caller: {arguments.instructions}"
        body: dict[str, Any] = {
            "model": self.model(arguments),
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": arguments.input},
            ],
        }
        if arguments.max_tokens is not None:
            body["max_tokens"] = arguments.max_tokens
        if provider is not None:
            body["provider"] = provider
        return body


def _argument_error(message: str, field_name: str | None) -> BadRequest:
    param = f"arguments.{field_name}" if field_name else "arguments"
    return BadRequest(message, param=param, code=TOOL_ERROR_CODE)


@dataclass(frozen=True)
class ToolSet:
    """The tools one organisation may call, sorted by name."""

    tools: tuple[Tool, ...]
    by_name: dict[str, Tool] = field(default_factory=dict)

    @classmethod
    def of(cls, tools: Iterable[Tool]) -> ToolSet:
        ordered = tuple(sorted(tools, key=lambda t: t.name))
        return cls(ordered, {t.name: t for t in ordered})

    def get(self, name: str) -> Tool | None:
        return self.by_name.get(name)

    def definitions(self) -> list[dict[str, Any]]:
        return [t.definition() for t in self.tools]


@dataclass(frozen=True)
class ToolCatalog:
    """Every organisation's tools for one snapshot; ``public`` for those without private
    endpoints. ``tags`` maps each tool name to its capability tag."""

    public: ToolSet
    private: dict[int, ToolSet] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, snapshot: Snapshot) -> ToolCatalog:
        chat = [e for e in snapshot.endpoints if e.kind == "chat" and e.tags]
        tags = snapshot.tags
        public = _serving(e for e in chat if e.private_to is None)
        names = tool_names({tag for e in chat for tag in e.tags}, tool_names(public))
        public_tools = {slug: _tool(names[slug], tags, slug, eps) for slug, eps in public.items()}
        owners: dict[int, list[EndpointView]] = defaultdict(list)
        for endpoint in chat:
            if endpoint.private_to is not None:
                owners[endpoint.private_to].append(endpoint)
        private = {}
        for org, own in owners.items():
            # Only the tags of the organisation's own endpoints differ from the public tools.
            tools = dict(public_tools)
            for slug, items in _serving(own).items():
                tools[slug] = _tool(names[slug], tags, slug, [*public.get(slug, ()), *items])
            private[org] = ToolSet.of(tools.values())
        return cls(
            public=ToolSet.of(public_tools.values()),
            private=private,
            tags={name: slug for slug, name in names.items()},
        )

    def for_organization(self, organization_id: int) -> ToolSet:
        return self.private.get(organization_id, self.public)


def _serving(endpoints: Iterable[EndpointView]) -> dict[str, list[EndpointView]]:
    serving: dict[str, list[EndpointView]] = defaultdict(list)
    for endpoint in endpoints:
        for tag in endpoint.tags:
            serving[tag].append(endpoint)
    return serving


def _tool(name: str, tags: Mapping[str, TagView], slug: str, endpoints: list[EndpointView]) -> Tool:
    tag = tags.get(slug) or TagView(slug, slug, "task")
    domains: tuple[str, ...] = ()
    if tag.kind != "domain":
        carried = frozenset().union(*(e.tags for e in endpoints)) - {slug}
        domains = tuple(sorted(t for t in carried if (v := tags.get(t)) and v.kind == "domain"))
    limit = max(e.context_length for e in endpoints)
    languages = sorted({language for e in endpoints for language in e.languages})
    cheapest_in = min(e.price_input for e in endpoints)
    cheapest_out = min(e.price_output for e in endpoints)
    what = tag.description.strip() or f"Requests for the {tag.name} capability."
    count = len(endpoints)
    served = (
        f"Served by {count} specialist model{'s' if count != 1 else ''}"
        + (f" (languages: {', '.join(languages)})" if languages else "")
        + f", up to {limit} tokens of context, from {format_usd(cheapest_in, 4)} / "
        f"{format_usd(cheapest_out, 4)} per million input / output tokens before surge; "
        "Switchyard picks one by price, quality and load and falls back if it fails."
    )
    properties: dict[str, Any] = {
        "input": {
            "type": "string",
            "minLength": 1,
            "description": "The text for the specialist to work on.",
        },
        "instructions": {
            "type": "string",
            "maxLength": MAX_INSTRUCTIONS_CHARS,
            "description": "Optional extra instructions (output format, style, target "
            "language...).",
        },
        "max_tokens": {
            "type": "integer",
            "minimum": 1,
            "maximum": limit,
            "description": "Optional upper bound of the answer's length in tokens.",
        },
    }
    if domains:
        properties["domain"] = {
            "type": "string",
            "enum": list(domains),
            "description": "Optional: only specialists that also know this domain.",
        }
    return Tool(
        name=name,
        tag=tag.slug,
        kind=tag.kind,
        title=tag.name,
        description=f"{tag.name}: {what} {served}",
        parameters={
            "type": "object",
            "properties": properties,
            "required": ["input"],
            "additionalProperties": False,
        },
        system_prompt=_system_prompt(tag),
        domains=domains,
        max_tokens_limit=limit,
        endpoints=count,
    )


def _system_prompt(tag: TagView) -> str:
    about = f" ({tag.description.strip().rstrip('.')})" if tag.description.strip() else ""
    if tag.kind == "domain":
        return (
            f"You are a specialist in {tag.name}{about}. Answer the user's request "
            "accurately and concisely; say so when you are not sure."
        )
    return (
        f"You are a specialist model for {tag.name}{about}. Carry out this task on the "
        "user's input and reply with the result only, without preamble."
    )


def tool_result(tool: Tool, answer: Mapping[str, Any]) -> dict[str, Any]:
    """The answer of a tool call, from the chat completion that served it."""
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    usage = dict(answer.get("usage") or {})
    return {
        "id": answer.get("id"),
        "object": "tool.result",
        "tool": tool.name,
        "tag": tool.tag,
        "output": message.get("content") or "",
        "finish_reason": choice.get("finish_reason"),
        "model": answer.get("model"),
        "usage": usage,
        "cost": usage.get("cost", 0),
        "cost_nanos": usage.get("cost_nanos", 0),
        "switchyard": answer.get("switchyard"),
    }
