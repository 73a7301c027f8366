"""Routing policies: what a request (and its organisation) asks of the router.

A request names what it wants in ``model`` (an endpoint slug ``vendor/endpoint`` optionally
pinned ``@version``, capability tags ``tag:sql+legal`` meaning ALL of them, or ``auto``)
with an optional variant suffix (``:floor`` cheapest first, ``:nitro`` fastest first), or a
list in ``models`` tried in order. The ``provider`` object narrows and orders the endpoints
(OpenRouter's provider-routing vocabulary): ``order``, ``only``, ``ignore``,
``allow_fallbacks``, ``sort``, ``max_price``, ``data_collection``, ``zdr``, ``region``,
``require_parameters`` and ``min_quality``.

Parsing is strict (types checked, unknown keys refused) and every error is a
``BadRequest`` naming the offending parameter. An organisation's default ``provider``
object is parsed by the same function and merged *under* the request's (``merge_provider``):
the request wins field by field; deny-lists (``ignore``) add up; allow-lists (``only``,
``region``) intersect; privacy demands (``data_collection: deny``, ``zdr``) hold if either
side makes them, because they protect the organisation rather than express a preference.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from billing.money import MoneyError, usd_to_nanos
from routing.errors import BadRequest

TAG_PREFIX = "tag:"
AUTO = "auto"
VARIANTS: Mapping[str, str] = {"floor": "price", "nitro": "throughput"}
SORTS = frozenset({"price", "latency", "throughput", "quality"})
BALANCED = "balanced"
MAX_MODELS = 8
MAX_TAGS = 8
MAX_LIST_ENTRIES = 64
MAX_NAME_LENGTH = 200

# The body parameters whose support differs between OpenAI-compatible servers; with
# ``require_parameters`` the router keeps only endpoints that support every one sent.
ROUTING_PARAMETERS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "max_tokens",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "stream",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "structured_outputs",
        "reasoning",
    }
)

_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")

ModelKind = Literal["slug", "tags", "auto"]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One entry of what the request asks for: an endpoint slug, capability tags or auto."""

    kind: ModelKind
    text: str  # as the client wrote it, without a variant suffix (for messages and traces)
    slug: str | None = None  # "vendor/endpoint" for kind == "slug"
    version: int | None = None  # the pinned ``@version`` of a slug
    tags: tuple[str, ...] = ()  # for kind == "tags": an endpoint must carry all of them


@dataclass(frozen=True, slots=True)
class MaxPrice:
    """Ceilings on the quoted price, nano-USD per million tokens (None = no ceiling)."""

    prompt: int | None = None
    completion: int | None = None


@dataclass(frozen=True, slots=True)
class ProviderPolicy:
    """A parsed ``provider`` object; None means "not said" (so a default may fill it)."""

    order: tuple[str, ...] | None = None
    only: frozenset[str] | None = None
    ignore: frozenset[str] | None = None
    allow_fallbacks: bool | None = None
    sort: str | None = None
    max_price: MaxPrice | None = None
    data_collection: Literal["allow", "deny"] | None = None
    zdr: bool | None = None
    regions: frozenset[str] | None = None
    require_parameters: bool | None = None
    min_quality: float | None = None


def provider_trace(provider: ProviderPolicy) -> dict[str, Any]:
    """What a ``provider`` object said, for a route trace (the fields it set)."""
    out: dict[str, Any] = {}
    for name in (f.name for f in dataclasses.fields(provider)):
        value = getattr(provider, name)
        if value is None:
            continue
        if isinstance(value, frozenset):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, MaxPrice):
            value = {"prompt": value.prompt, "completion": value.completion}
        out[name] = value
    return out


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Everything the router needs to know about one request's wishes, fully resolved."""

    models: tuple[ModelSpec, ...]
    variant: str | None = None
    sort: str = BALANCED  # "balanced" or one of SORTS
    order: tuple[str, ...] = ()
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    allow_fallbacks: bool = True
    max_price_prompt: int | None = None
    max_price_completion: int | None = None
    zero_retention: bool = False  # data_collection "deny" or zdr: retention days must be 0
    regions: frozenset[str] | None = None
    require_parameters: bool = False
    min_quality: float | None = None
    # Privacy guard: only the organisation's private endpoints and zero-retention ones.
    trusted_only: bool = False

    @property
    def auto(self) -> bool:
        """True while ``model: auto`` waits for the classifier to choose tags."""
        return any(spec.kind == "auto" for spec in self.models)

    def with_auto_tags(self, *tags: str) -> RoutePolicy:
        """The policy with ``auto`` replaced by the capability tags a classifier chose."""
        if not tags:
            raise ValueError("auto routing needs at least one tag")
        chosen = ModelSpec(kind="tags", text=TAG_PREFIX + "+".join(tags), tags=tuple(tags))
        models = tuple(chosen if spec.kind == "auto" else spec for spec in self.models)
        return dataclasses.replace(self, models=models)

    @classmethod
    def for_model(cls, model: str) -> RoutePolicy:
        """The policy of a request that says nothing but ``model``."""
        return route_policy({"model": model})

    def to_trace(self) -> dict[str, Any]:
        return {
            "models": [spec.text for spec in self.models],
            "sort": self.sort,
            "variant": self.variant,
            "order": list(self.order),
            "only": sorted(self.only) if self.only is not None else None,
            "ignore": sorted(self.ignore),
            "allow_fallbacks": self.allow_fallbacks,
            "max_price": {"prompt": self.max_price_prompt, "completion": self.max_price_completion},
            "zero_retention": self.zero_retention,
            "regions": sorted(self.regions) if self.regions is not None else None,
            "require_parameters": self.require_parameters,
            "min_quality": self.min_quality,
            "trusted_only": self.trusted_only,
        }


# --- model -----------------------------------------------------------------------------


def parse_model(
    text: Any, *, param: str = "model", allow_variant: bool = True
) -> tuple[ModelSpec, str | None]:
    """Parse one model entry into its spec and its variant (``floor``/``nitro`` or None)."""
    if not isinstance(text, str) or not text.strip():
        raise BadRequest(f"`{param}` must be a non-empty string", param=param, code="invalid_type")
    text = text.strip()
    if len(text) > MAX_NAME_LENGTH * 2:
        raise BadRequest(f"`{param}` is too long", param=param, code="invalid_value")
    variant = None
    base, colon, suffix = text.rpartition(":")
    if colon and suffix in VARIANTS and base and base != TAG_PREFIX[:-1]:
        if not allow_variant:
            raise BadRequest(
                f"`{param}` cannot carry the `:{suffix}` variant; put it on `model` "
                "or use `provider.sort`",
                param=param,
                code="invalid_value",
            )
        text, variant = base, suffix
    if text == AUTO:
        return ModelSpec(kind="auto", text=text), variant
    if text.startswith(TAG_PREFIX):
        tags = text[len(TAG_PREFIX) :].split("+")
        if not tags or any(not tag for tag in tags):
            raise BadRequest(
                f"`{param}`: `tag:` needs capability tags joined by `+`, e.g. `tag:sql+legal`",
                param=param,
                code="invalid_value",
            )
        if len(tags) > MAX_TAGS:
            raise BadRequest(
                f"`{param}` names more than {MAX_TAGS} tags", param=param, code="invalid_value"
            )
        for tag in tags:
            if not _TAG_RE.fullmatch(tag):
                raise BadRequest(
                    f"`{param}`: `{tag}` is not a capability tag (letters, digits, - and _)",
                    param=param,
                    code="invalid_value",
                )
        unique = tuple(dict.fromkeys(tags))
        return ModelSpec(kind="tags", text=text, tags=unique), variant
    slug, at, version_text = text.partition("@")
    version = None
    if at:
        if not _VERSION_RE.fullmatch(version_text):
            raise BadRequest(
                f"`{param}`: the version after `@` must be a positive integer, "
                f"got `{version_text}`",
                param=param,
                code="invalid_value",
            )
        version = int(version_text)
    # A malformed slug is answered like an unknown one (404), as OpenAI does.
    return ModelSpec(kind="slug", text=text, slug=slug, version=version), variant


# --- provider ----------------------------------------------------------------------------

_PROVIDER_KEYS = (
    "order",
    "only",
    "ignore",
    "allow_fallbacks",
    "sort",
    "max_price",
    "data_collection",
    "zdr",
    "region",
    "require_parameters",
    "min_quality",
)


def parse_provider(value: Any, *, param: str = "provider") -> ProviderPolicy:
    """Parse a ``provider`` object (a request's or an organisation's default)."""
    if value is None:
        return ProviderPolicy()
    if not isinstance(value, dict):
        raise BadRequest(f"`{param}` must be an object", param=param, code="invalid_type")
    for key in value:
        if key not in _PROVIDER_KEYS:
            raise BadRequest(
                f"unknown field `{param}.{key}`; expected one of: {', '.join(_PROVIDER_KEYS)}",
                param=f"{param}.{key}",
                code="unknown_parameter",
            )
    sort = value.get("sort")
    # Checked as strings first: a list or an object is unhashable and must be a 400 too.
    if sort is not None and (not isinstance(sort, str) or sort not in SORTS):
        raise BadRequest(
            f"`{param}.sort` must be one of: {', '.join(sorted(SORTS))}",
            param=f"{param}.sort",
            code="invalid_value",
        )
    data_collection = value.get("data_collection")
    if data_collection is not None and data_collection not in ("allow", "deny"):
        raise BadRequest(
            f'`{param}.data_collection` must be "allow" or "deny"',
            param=f"{param}.data_collection",
            code="invalid_value",
        )
    order = _names(value, "order", param)
    only = _names(value, "only", param)
    ignore = _names(value, "ignore", param)
    region = value.get("region")
    regions = None
    if region is not None:
        if isinstance(region, str):
            region = [region]
        regions = frozenset(r.lower() for r in _names({"region": region}, "region", param) or ())
    return ProviderPolicy(
        order=tuple(dict.fromkeys(order)) if order is not None else None,
        only=frozenset(only) if only is not None else None,
        ignore=frozenset(ignore) if ignore is not None else None,
        allow_fallbacks=_bool(value, "allow_fallbacks", param),
        sort=sort,
        max_price=_max_price(value.get("max_price"), f"{param}.max_price"),
        data_collection=data_collection,
        zdr=_bool(value, "zdr", param),
        regions=regions,
        require_parameters=_bool(value, "require_parameters", param),
        min_quality=_fraction(value, "min_quality", param),
    )


def _names(value: Mapping[str, Any], key: str, param: str) -> list[str] | None:
    names = value.get(key)
    if names is None:
        return None
    where = f"{param}.{key}"
    if not isinstance(names, list):
        raise BadRequest(f"`{where}` must be a list of strings", param=where, code="invalid_type")
    if len(names) > MAX_LIST_ENTRIES:
        raise BadRequest(
            f"`{where}` has more than {MAX_LIST_ENTRIES} entries", param=where, code="invalid_value"
        )
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise BadRequest(
                f"`{where}[{index}]` must be a non-empty string", param=where, code="invalid_type"
            )
        if len(name) > MAX_NAME_LENGTH:
            raise BadRequest(f"`{where}[{index}]` is too long", param=where, code="invalid_value")
        if not name.isprintable():  # control characters, NUL, lone surrogates
            raise BadRequest(
                f"`{where}[{index}]` holds a character no name has",
                param=where,
                code="invalid_value",
            )
    # Slugs are lowercase (slugify): "Acme" names the vendor "acme", not nothing.
    return [name.strip().lower() for name in names]


def _bool(value: Mapping[str, Any], key: str, param: str) -> bool | None:
    flag = value.get(key)
    if flag is not None and not isinstance(flag, bool):
        where = f"{param}.{key}"
        raise BadRequest(f"`{where}` must be true or false", param=where, code="invalid_type")
    return flag


def _fraction(value: Mapping[str, Any], key: str, param: str) -> float | None:
    number = value.get(key)
    if number is None:
        return None
    where = f"{param}.{key}"
    if not isinstance(number, int | float) or isinstance(number, bool):
        raise BadRequest(f"`{where}` must be a number", param=where, code="invalid_type")
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise BadRequest(f"`{where}` must lie between 0 and 1", param=where, code="invalid_value")
    return number


def _max_price(value: Any, param: str) -> MaxPrice | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(
            f'`{param}` must be an object such as {{"prompt": 1, "completion": 2}} '
            "(USD per million tokens)",
            param=param,
            code="invalid_type",
        )
    for key in value:
        if key not in ("prompt", "completion"):
            raise BadRequest(
                f"unknown field `{param}.{key}`; expected `prompt` or `completion`",
                param=f"{param}.{key}",
                code="unknown_parameter",
            )
    return MaxPrice(
        prompt=_usd_per_million(value.get("prompt"), f"{param}.prompt"),
        completion=_usd_per_million(value.get("completion"), f"{param}.completion"),
    )


def _usd_per_million(amount: Any, param: str) -> int | None:
    """US dollars per million tokens (a number or a decimal string) as nano-USD."""
    if amount is None:
        return None
    if isinstance(amount, bool) or not isinstance(amount, int | float | str):
        raise BadRequest(
            f"`{param}` must be a number or a decimal string (USD per million tokens)",
            param=param,
            code="invalid_type",
        )
    try:
        finite = Decimal(str(amount).strip()).is_finite()
    except ArithmeticError:
        finite = False
    if not finite:
        raise BadRequest(
            f"`{param}` is not a finite amount: {amount!r}", param=param, code="invalid_value"
        )
    try:
        nanos = usd_to_nanos(str(amount).strip())
    except MoneyError as exc:
        raise BadRequest(f"`{param}`: {exc}", param=param, code="invalid_value") from None
    if nanos < 0:
        raise BadRequest(f"`{param}` cannot be negative", param=param, code="invalid_value")
    return nanos


def merge_provider(default: ProviderPolicy | None, request: ProviderPolicy) -> ProviderPolicy:
    """The request's provider policy with the organisation's defaults underneath.

    The request wins field by field (``max_price`` per component); ``ignore`` lists add
    up; ``only`` and ``region`` allow-lists intersect; ``data_collection: deny`` and
    ``zdr`` hold if either side asks for them.
    """
    if default is None:
        return request

    def pick(name: str) -> Any:
        mine = getattr(request, name)
        return mine if mine is not None else getattr(default, name)

    def intersect(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
        if a is None or b is None:
            return a if b is None else b
        return a & b

    ignore = None
    if request.ignore is not None or default.ignore is not None:
        ignore = (request.ignore or frozenset()) | (default.ignore or frozenset())
    max_price = request.max_price
    if default.max_price is not None:
        mine = request.max_price or MaxPrice()
        max_price = MaxPrice(
            prompt=mine.prompt if mine.prompt is not None else default.max_price.prompt,
            completion=(
                mine.completion if mine.completion is not None else default.max_price.completion
            ),
        )
    data_collection = pick("data_collection")
    if "deny" in (request.data_collection, default.data_collection):
        data_collection = "deny"
    return ProviderPolicy(
        order=pick("order"),
        only=intersect(request.only, default.only),
        ignore=ignore,
        allow_fallbacks=pick("allow_fallbacks"),
        sort=pick("sort"),
        max_price=max_price,
        data_collection=data_collection,
        zdr=True if True in (request.zdr, default.zdr) else pick("zdr"),
        regions=intersect(request.regions, default.regions),
        require_parameters=pick("require_parameters"),
        min_quality=pick("min_quality"),
    )


# --- the whole policy --------------------------------------------------------------------


def route_policy(
    body: Mapping[str, Any], *, organization_default: ProviderPolicy | None = None
) -> RoutePolicy:
    """Parse ``model``/``models``/``provider`` of a request body into its ``RoutePolicy``.

    ``organization_default`` is the organisation's parsed default ``provider`` object
    (``parse_provider(org.routing_defaults, param="organization.provider")``), merged under
    the request's. Raises ``BadRequest`` (with ``param``) on anything malformed.
    """
    specs: list[ModelSpec] = []
    variant = None
    model = body.get("model")
    if model is not None:
        spec, variant = parse_model(model, param="model")
        specs.append(spec)
    listed = body.get("models")
    if listed is not None:
        if not isinstance(listed, list) or not listed:
            raise BadRequest(
                "`models` must be a non-empty list of model names",
                param="models",
                code="invalid_type",
            )
        if len(listed) > MAX_MODELS:
            raise BadRequest(
                f"`models` lists more than {MAX_MODELS} entries",
                param="models",
                code="invalid_value",
            )
        for index, entry in enumerate(listed):
            spec, _ = parse_model(entry, param=f"models[{index}]", allow_variant=False)
            if spec.kind == "auto":
                raise BadRequest(
                    "`auto` can only be the `model` itself, not an entry of `models`",
                    param=f"models[{index}]",
                    code="invalid_value",
                )
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise BadRequest(
            "`model` is required and must be a string", param="model", code="missing_model"
        )
    if specs[0].kind == "auto" and len(specs) > 1:
        raise BadRequest(
            "`model: auto` chooses the model itself; drop `models` or name a model",
            param="models",
            code="invalid_value",
        )
    requested = parse_provider(body.get("provider"), param="provider")
    if variant is not None and requested.sort is not None and (requested.sort != VARIANTS[variant]):
        raise BadRequest(
            f"`:{variant}` sorts by {VARIANTS[variant]} but `provider.sort` asks for "
            f"{requested.sort}; keep one",
            param="provider.sort",
            code="invalid_value",
        )
    provider = merge_provider(organization_default, requested)
    sort = VARIANTS[variant] if variant is not None else (provider.sort or BALANCED)
    max_price = provider.max_price or MaxPrice()
    return RoutePolicy(
        models=tuple(specs),
        variant=variant,
        sort=sort,
        order=provider.order or (),
        only=provider.only,
        ignore=provider.ignore or frozenset(),
        allow_fallbacks=provider.allow_fallbacks if provider.allow_fallbacks is not None else True,
        max_price_prompt=max_price.prompt,
        max_price_completion=max_price.completion,
        zero_retention=provider.data_collection == "deny" or bool(provider.zdr),
        regions=provider.regions,
        require_parameters=bool(provider.require_parameters),
        min_quality=provider.min_quality,
    )


def request_parameters(body: Mapping[str, Any]) -> frozenset[str]:
    """The parameters of ``body`` whose support differs between endpoints (for
    ``require_parameters``); parameters sent as null count as not sent."""
    sent = {name for name in ROUTING_PARAMETERS if body.get(name) is not None}
    if body.get("max_completion_tokens") is not None:
        sent.add("max_tokens")  # the gateway forwards it to vendors as max_tokens
    return frozenset(sent)
