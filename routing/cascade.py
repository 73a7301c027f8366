"""Cascade routing: try the cheapest capable endpoint first, escalate when it is unsure.

Pure logic, no I/O: the gateway calls the upstreams, this module decides.

**Asking for it.** ``provider.sort: "cascade"`` (defaults) or a ``cascade`` object
``{"threshold": 0..1, "max_tiers": 2..4}`` (``cascade: true`` = defaults). Parsed by
``parse_cascade``; every error is a ``BadRequest`` naming the parameter. The router does
not know the ``cascade`` sort: route ``without_cascade(body)``, which asks it for the
price order instead.

**Tiers** (``plan_tiers``): the router's eligible candidates grouped by quoted blended
price (input + output per million tokens), cheapest first; each tier is the next more
expensive price level, up to ``max_tiers``. Within a tier the router's order is kept and
the later endpoints are the fallbacks on failure (connect error, 5xx, 429, ...). Every
tier but the last must be judged, so its endpoints must support ``logprobs``; a cheaper
level with none that do is skipped. The last tier also carries every more expensive
candidate as failure fallbacks, so cascading never leaves a request with fewer fallbacks
than plain routing. Fewer than two tiers is plain routing.

**Confidence** (``confidence_from_logprobs``): the geometric mean of the answer's token
probabilities, ``exp(mean(token logprob))``, in 0..1: a per-token probability that does not
depend on the answer's length (a product of probabilities would punish long answers).
Each logprob is floored at ``LOGPROB_FLOOR`` (-20) so one ``-inf`` token cannot zero it.
Only choice 0 is judged (``n`` > 1 is refused with a cascade).

**Escalation** (``should_escalate``): when a later tier exists and the confidence is below
the threshold, or unknown (no logprobs came back, or an empty answer: nothing to trust).
The last tier's answer is always served.

**Default threshold 0.6**, measured (``tests/e2e/test_cascade_models.py``: 16 short
questions, temperature 0, 12 tokens): Gemma 3 270M base, which echoes the question instead
of answering, scored 0.24-0.79 (median 0.46; 14 of 16 below 0.6); SmolLM2-135M-Instruct
scored 0.34-0.87 (median 0.61; 9 of 16 at or above 0.6, and most of those below were wrong
or off-topic answers). At 0.6 the weak model escalates nearly always and the stronger one
serves about half the time on its own.

**Streaming.** An answer already streamed cannot be withdrawn, so a cascaded streaming
request buffers each non-final tier's chunks (``confidence_from_stream_chunks`` judges
them), replays them when accepted and streams the last tier straight through.

**Logprobs** are requested from every tier (``upstream_body``); when the client did not
ask for them, ``strip_logprobs`` removes them from what it receives. Each tier's call is
a real call: it is metered and charged at its own quote.

The gateway's use::

    cascade = parse_cascade(body)                 # None: no cascade
    decision = plan_route(snapshot, route_policy(without_cascade(body)), ...)
    tiers = plan_tiers(decision.candidates, cascade.max_tiers)
    trace = CascadeTrace(cascade, tiers)
    for tier in tiers:
        answer, endpoint = <call tier.candidates in order until one succeeds>
        if answer is None:
            trace.failed(tier); continue
        if trace.judge(tier, endpoint, confidence_from_response(answer)):
            continue                              # escalate (the trace says why)
        return answer                             # route trace: trace.to_trace()
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, Protocol, TypedDict

from routing.errors import BadRequest

__all__ = [
    "CONFIDENCE_METHOD",
    "DEFAULT_MAX_TIERS",
    "DEFAULT_THRESHOLD",
    "CascadePolicy",
    "CascadeTier",
    "CascadeTrace",
    "CascadeTraceData",
    "TierTraceData",
    "confidence_from_logprobs",
    "confidence_from_response",
    "confidence_from_stream_chunks",
    "parse_cascade",
    "plan_tiers",
    "should_escalate",
    "strip_logprobs",
    "upstream_body",
    "without_cascade",
]

#: Below this confidence (geometric mean token probability) an answer escalates.
DEFAULT_THRESHOLD: Final = 0.6
#: Tiers when the request does not say: the cheapest judged tier and one more.
DEFAULT_MAX_TIERS: Final = 2
MIN_TIERS: Final = 2
MAX_TIERS: Final = 4
#: The lowest logprob a token counts with (e**-20 ~ 2e-9): ``-inf`` must not zero the mean.
LOGPROB_FLOOR: Final = -20.0
CONFIDENCE_METHOD: Final = "geometric_mean_token_probability"
CASCADE_SORT: Final = "cascade"
#: The sort the router is asked for instead of ``cascade``.
ROUTER_SORT: Final = "price"
#: Error codes of the customer's own limits: an escalation they stop is ``refused``.
REFUSAL_CODES: Final = frozenset(
    {"insufficient_credit", "organization_budget", "key_credit_limit", "rate_limited"}
)
_CASCADE_KEYS: Final = ("threshold", "max_tiers")

#: What became of a tier: its answer ``accepted`` (or ``final``: the last tier, served whatever
#: it scored), ``escalated`` (too unsure; the next tier was asked), ``kept`` (escalated, then
#: served after all because no later tier answered), ``failed`` (every candidate failed),
#: ``refused`` (the customer's limits refused the escalation: credit, budget, rate) or
#: ``not_reached``.
Decision = Literal["accepted", "escalated", "kept", "final", "failed", "refused", "not_reached"]


# --- confidence -----------------------------------------------------------------------------


def _token_logprobs(content: Any) -> list[float]:
    """The numeric logprobs of a ``logprobs.content`` list, floored; others skipped."""
    if not isinstance(content, list):
        return []
    values = []
    for token in content:
        if not isinstance(token, Mapping):
            continue
        logprob = token.get("logprob")
        if isinstance(logprob, bool) or not isinstance(logprob, int | float):
            continue
        if math.isnan(logprob):
            continue
        values.append(max(logprob, LOGPROB_FLOOR))
    return values


def _content_of(choice_logprobs: Any) -> Any:
    """Accept ``choices[i].logprobs`` (``{"content": [...]}``) or its ``content`` list."""
    if isinstance(choice_logprobs, Mapping):
        return choice_logprobs.get("content")
    return choice_logprobs


def _geometric_mean_probability(values: Sequence[float]) -> float | None:
    if not values:
        return None
    return min(1.0, math.exp(sum(values) / len(values)))


def confidence_from_logprobs(choice_logprobs: Any) -> float | None:
    """The answer's confidence in 0..1: ``exp(mean token logprob)``; None without logprobs.

    ``choice_logprobs`` is an OpenAI ``choices[0].logprobs`` object or its ``content`` list
    (``[{"token", "logprob", ...}, ...]``). All tokens at -0.01 give 0.99; at -2.0, 0.135.
    """
    return _geometric_mean_probability(_token_logprobs(_content_of(choice_logprobs)))


def _choice_zero(payload: Any) -> Mapping[str, Any] | None:
    if not isinstance(payload, Mapping):
        return None
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if isinstance(choice, Mapping) and choice.get("index", 0) == 0:
            return choice
    return None


def confidence_from_response(body: Any) -> float | None:
    """``confidence_from_logprobs`` of a chat completion body's choice 0."""
    choice = _choice_zero(body)
    return confidence_from_logprobs(choice.get("logprobs")) if choice is not None else None


def confidence_from_stream_chunks(chunks: Iterable[Any]) -> float | None:
    """The confidence of a streamed answer: the tokens of choice 0 across all chunks.

    ``chunks`` are the parsed ``chat.completion.chunk`` objects (``data: [DONE]`` and the
    final usage chunk, whose ``choices`` is empty, contribute nothing). None when no
    chunk carried logprobs.
    """
    values: list[float] = []
    for chunk in chunks:
        choice = _choice_zero(chunk)
        if choice is not None:
            values.extend(_token_logprobs(_content_of(choice.get("logprobs"))))
    return _geometric_mean_probability(values)


# --- the request ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CascadePolicy:
    """What a request asked of the cascade."""

    threshold: float = DEFAULT_THRESHOLD
    max_tiers: int = DEFAULT_MAX_TIERS

    def to_trace(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "max_tiers": self.max_tiers}


def _provider_sort(body: Mapping[str, Any]) -> Any:
    provider = body.get("provider")
    return provider.get("sort") if isinstance(provider, Mapping) else None


def _threshold(value: Any) -> float:
    if value is None:
        return DEFAULT_THRESHOLD
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(
            "`cascade.threshold` must be a number between 0 and 1",
            param="cascade.threshold",
            code="invalid_type",
        )
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise BadRequest(
            "`cascade.threshold` must lie between 0 and 1",
            param="cascade.threshold",
            code="invalid_value",
        )
    return value


def _max_tiers(value: Any) -> int:
    if value is None:
        return DEFAULT_MAX_TIERS
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(
            f"`cascade.max_tiers` must be an integer from {MIN_TIERS} to {MAX_TIERS}",
            param="cascade.max_tiers",
            code="invalid_type",
        )
    if not MIN_TIERS <= value <= MAX_TIERS:
        raise BadRequest(
            f"`cascade.max_tiers` must be from {MIN_TIERS} to {MAX_TIERS}",
            param="cascade.max_tiers",
            code="invalid_value",
        )
    return value


def parse_cascade(body: Mapping[str, Any]) -> CascadePolicy | None:
    """The request's cascade, or None when it asks for none.

    On with ``provider.sort: "cascade"``, ``cascade: true`` or a ``cascade`` object
    ``{"threshold": 0..1 (default 0.6), "max_tiers": 2..4 (default 2)}``. Raises
    ``BadRequest`` (with ``param``) for a malformed object and for what contradicts a
    cascade: another ``provider.sort``, the ``:nitro`` variant, ``cascade: false`` with
    ``provider.sort: "cascade"``, or ``n`` > 1 (only one answer can be judged).
    """
    raw = body.get("cascade")
    sort = _provider_sort(body)
    if raw is None and sort != CASCADE_SORT:
        return None
    if raw is False:
        if sort == CASCADE_SORT:
            raise BadRequest(
                '`cascade: false` contradicts `provider.sort: "cascade"`; keep one',
                param="cascade",
                code="invalid_value",
            )
        return None
    if raw is None or raw is True:
        policy = CascadePolicy()
    elif isinstance(raw, Mapping):
        for key in raw:
            if key not in _CASCADE_KEYS:
                raise BadRequest(
                    f"unknown field `cascade.{key}`; expected one of: {', '.join(_CASCADE_KEYS)}",
                    param=f"cascade.{key}",
                    code="unknown_parameter",
                )
        policy = CascadePolicy(
            threshold=_threshold(raw.get("threshold")), max_tiers=_max_tiers(raw.get("max_tiers"))
        )
    else:
        raise BadRequest(
            '`cascade` must be an object such as {"threshold": 0.6, "max_tiers": 2} or true',
            param="cascade",
            code="invalid_type",
        )
    if sort is not None and sort != CASCADE_SORT:
        raise BadRequest(
            f"a cascade orders endpoints by price itself; `provider.sort: {sort!r}` "
            'contradicts it: drop it or set it to "cascade"',
            param="provider.sort",
            code="invalid_value",
        )
    model = body.get("model")
    if isinstance(model, str):
        base, colon, suffix = model.strip().rpartition(":")
        if colon and suffix == "nitro" and base and base != "tag":
            raise BadRequest(
                "the `:nitro` variant sorts by throughput, which contradicts a cascade",
                param="model",
                code="invalid_value",
            )
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise BadRequest(
            "a cascade judges one answer; `n` must be 1", param="n", code="invalid_value"
        )
    return policy


def without_cascade(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` the router's policy parser accepts: no ``cascade`` field, and
    ``provider.sort: "cascade"`` replaced by the price order the tiers start from."""
    routed = {key: value for key, value in body.items() if key != "cascade"}
    provider = body.get("provider")
    if isinstance(provider, Mapping) and provider.get("sort") == CASCADE_SORT:
        routed["provider"] = {**provider, "sort": ROUTER_SORT}
    return routed


def upstream_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body to send every tier: the client's, with ``logprobs`` on and no ``cascade``."""
    sent = without_cascade(body)
    sent["logprobs"] = True
    return sent


def strip_logprobs(payload: dict[str, Any]) -> dict[str, Any]:
    """Remove the logprobs the cascade asked for from a response or a stream chunk
    (``choices[*].logprobs`` becomes null, as when they are not requested). In place."""
    choices = payload.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and "logprobs" in choice:
                choice["logprobs"] = None
    return payload


# --- tiers --------------------------------------------------------------------------------


class _Endpoint(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def full_slug(self) -> str: ...
    @property
    def supported_parameters(self) -> frozenset[str]: ...


class _Candidate(Protocol):
    """What ``plan_tiers`` reads of ``routing.router.Candidate``."""

    @property
    def endpoint(self) -> _Endpoint: ...
    @property
    def price_input(self) -> int: ...
    @property
    def price_output(self) -> int: ...


def _blended(candidate: _Candidate) -> int:
    return candidate.price_input + candidate.price_output


def _judgeable(candidate: _Candidate) -> bool:
    return "logprobs" in candidate.endpoint.supported_parameters


@dataclass(frozen=True, slots=True)
class CascadeTier:
    """One step of the cascade: ``candidates[0]`` first, the others on its failure."""

    index: int
    candidates: tuple[Any, ...]  # routing.router.Candidate, in the order to try
    final: bool

    @property
    def primary(self) -> Any:
        return self.candidates[0]

    @property
    def price(self) -> int:
        """The primary's quoted blended price (input + output, nano-USD per million)."""
        return _blended(self.primary)


def plan_tiers(candidates: Sequence[Any], max_tiers: int) -> tuple[CascadeTier, ...]:
    """The cascade's tiers over the router's eligible candidates, cheapest first.

    ``candidates`` are ``routing.router.Candidate`` in the router's order (ties in price
    keep it). See the module docstring for the rules. Empty candidates: no tiers.
    """
    if max_tiers < 1:
        raise ValueError(f"max_tiers must be at least 1, got {max_tiers}")
    ordered = sorted(candidates, key=_blended)  # stable: the router's order within a price
    levels: list[list[Any]] = []
    for candidate in ordered:
        if levels and _blended(levels[-1][0]) == _blended(candidate):
            levels[-1].append(candidate)
        else:
            levels.append([candidate])

    tiers: list[CascadeTier] = []
    for position, level in enumerate(levels):
        last_level = position == len(levels) - 1
        if len(tiers) == max_tiers - 1 or last_level:
            rest = [c for later in levels[position + 1 :] for c in later]
            tiers.append(CascadeTier(index=len(tiers), candidates=(*level, *rest), final=True))
            break
        judged = [c for c in level if _judgeable(c)]
        if judged:
            tiers.append(CascadeTier(index=len(tiers), candidates=tuple(judged), final=False))
    return tuple(tiers)


def should_escalate(
    confidence: float | None, threshold: float, *, has_next_tier: bool = True
) -> bool:
    """Whether to discard this answer and ask the next tier.

    Never without a next tier (the last tier's answer is served whatever it scores).
    With one: when ``confidence`` is below ``threshold``, or None (no logprobs, or an
    empty answer: an answer that cannot be judged is not trusted).
    """
    if not has_next_tier:
        return False
    if confidence is None:
        return True
    return confidence < threshold


# --- the trace ------------------------------------------------------------------------------


class TierTraceData(TypedDict):
    tier: int
    endpoint: str | None  # the endpoint that answered (or was due to), ``vendor/endpoint``
    endpoint_id: int | None
    price: int  # the tier's quoted blended price, nano-USD per million tokens
    confidence: float | None
    decision: Decision


class CascadeTraceData(TypedDict):
    threshold: float
    max_tiers: int
    confidence_method: str
    served_tier: int | None
    tiers: list[TierTraceData]
    #: Set when a ``kept`` answer was served: the error code that ended the escalation.
    kept_because: NotRequired[str]


class CascadeTrace:
    """Records what each tier did, for the route trace (``to_trace``)."""

    def __init__(self, policy: CascadePolicy, tiers: Sequence[CascadeTier]) -> None:
        self.policy = policy
        self.tiers = tuple(tiers)
        self.served_tier: int | None = None
        self.kept_because: str | None = None
        self._rows: dict[int, TierTraceData] = {}

    def judge(self, tier: CascadeTier, endpoint: Any, confidence: float | None) -> bool:
        """Record the answer of ``endpoint`` (an ``EndpointView``) on ``tier``; True means
        escalate to the next tier, False serve this answer."""
        has_next = not tier.final and tier.index + 1 < len(self.tiers)
        escalate = should_escalate(confidence, self.policy.threshold, has_next_tier=has_next)
        decision: Decision = "escalated" if escalate else ("accepted" if has_next else "final")
        self._record(tier, endpoint, confidence, decision)
        if not escalate:
            self.served_tier = tier.index
        return escalate

    def failed(self, tier: CascadeTier) -> None:
        """Record that every candidate of ``tier`` failed (the next tier is tried)."""
        self._record(tier, tier.primary.endpoint, None, "failed")

    def fell_back(self, tier: CascadeTier, kept: CascadeTier, endpoint: Any, code: str) -> None:
        """Record that escalating from ``kept`` ended on ``tier`` with the error ``code``, and
        that ``kept``'s answer (from ``endpoint``) is served after all."""
        refused = code in REFUSAL_CODES
        self._record(tier, tier.primary.endpoint, None, "refused" if refused else "failed")
        confidence = self._rows[kept.index]["confidence"] if kept.index in self._rows else None
        self._record(kept, endpoint, confidence, "kept")
        self.served_tier = kept.index
        self.kept_because = code

    def _record(
        self, tier: CascadeTier, endpoint: Any, confidence: float | None, decision: Decision
    ) -> None:
        self._rows[tier.index] = TierTraceData(
            tier=tier.index,
            endpoint=endpoint.full_slug,
            endpoint_id=endpoint.id,
            price=tier.price,
            confidence=None if confidence is None else round(confidence, 4),
            decision=decision,
        )

    def to_trace(self) -> CascadeTraceData:
        rows = [
            self._rows.get(tier.index)
            or TierTraceData(
                tier=tier.index,
                endpoint=tier.primary.endpoint.full_slug,
                endpoint_id=tier.primary.endpoint.id,
                price=tier.price,
                confidence=None,
                decision="not_reached",
            )
            for tier in self.tiers
        ]
        data = CascadeTraceData(
            threshold=self.policy.threshold,
            max_tiers=self.policy.max_tiers,
            confidence_method=CONFIDENCE_METHOD,
            served_tier=self.served_tier,
            tiers=rows,
        )
        if self.kept_because is not None:
            data["kept_because"] = self.kept_because
        return data
