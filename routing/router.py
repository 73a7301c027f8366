"""The router: a pure function from (snapshot, policy, live numbers, a random draw) to a
``RouteDecision``: the ordered candidates (the first is tried, the rest are the fallback
chain) and, for the route trace, why every other endpoint was left out.

It does no I/O, so it is cheap to call on every request and easy to test and time.

1. **Candidates** come from the policy's model entries, in order: an endpoint slug
   (``@version`` must match the endpoint's version), or the endpoints carrying every
   requested capability tag. An endpoint private to another organisation is invisible
   (and never named in a trace); one of another kind (chat/embeddings) is filtered. An
   entry that resolves to nothing visible is unknown; if none resolves: ``NotFound``.
2. **Filters**, first failing one wins, each with a stable reason code (``REASONS``):
   ``kind_mismatch``, ``ignored``, ``not_in_only``, ``data_policy``, ``region``,
   ``missing_parameters``, ``below_min_quality``, ``circuit_open``, ``circuit_half_open``,
   ``at_capacity``, ``over_max_price`` (judged at the *quoted*, surged price).
3. **Quote**: ``vendors.pricing.quote(base, surge_multiplier(curve, utilisation, cap))``
   per endpoint, at its live smoothed utilisation; the quote is what the request pays.
4. **Order**: by model entry (``models`` are tried in order), then ``provider.order``,
   then the strategy: ``balanced`` (the weighted score of ``routing.scoring``) or one key
   (``price``, ``latency``, ``throughput``, ``quality``) with ties broken by the balanced
   score and then the endpoint id, so the order is total and deterministic.
5. **Exploration** (fairness rule): an endpoint with fewer than ``EXPLORE_MIN_REQUESTS``
   observed requests is *new*. When ``explore_draw < EXPLORE_SHARE`` (the gateway draws
   uniformly in [0, 1)), the new eligible endpoint with the fewest requests (ties: lowest
   id) among those of the first model entry that has eligible endpoints goes first; the
   others keep their order behind it.
   So at most ``EXPLORE_SHARE`` of decisions explore, exactly one endpoint each time,
   never one that a filter excluded, and new endpoints take turns as their counts grow.
   No exploration when the customer chose the order: ``provider.order``, a ``sort`` or
   variant other than balanced, or ``allow_fallbacks: false`` (a new endpoint with no
   fallback behind it would put the whole request at risk).
6. ``allow_fallbacks: false`` keeps only the first candidate; otherwise at most
   ``MAX_CANDIDATES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from billing.money import format_usd
from routing.errors import BadRequest, GatewayError, NoCapacity, NotFound
from routing.policy import BALANCED, ModelSpec, RoutePolicy
from routing.scoring import (
    CIRCUIT_HALF_OPEN,
    CIRCUIT_OPEN,
    LATENCY_PRIOR_MS,
    QUALITY_PRIOR,
    THROUGHPUT_PRIOR_TPS,
    BoolArray,
    EndpointLive,
    FloatArray,
    IntArray,
    LiveColumns,
    LiveView,
    SnapshotIndex,
    balanced_scores,
    index_for,
    live_columns,
)
from routing.snapshot import EndpointView, Snapshot

__all__ = [
    "EXPLORE_MIN_REQUESTS",
    "EXPLORE_SHARE",
    "MAX_CANDIDATES",
    "REASONS",
    "Candidate",
    "EndpointLive",
    "LiveView",
    "RouteDecision",
    "plan_route",
    "prepare_snapshot",
    "resolve_model",
    "route",
]

EXPLORE_SHARE = 0.05  # at most 1 request in 20 goes to a new endpoint
EXPLORE_MIN_REQUESTS = 50  # below this many observed requests an endpoint is "new"
MAX_CANDIDATES = 6  # the first choice and five fallbacks
TRACE_DETAIL_LIMIT = 50  # above this many endpoints the trace keeps counts, not rows

# Reason codes, stable (they appear in route traces and docs/api.md); index = array code.
REASONS: tuple[str, ...] = (
    "",
    "not_visible",
    "kind_mismatch",
    "ignored",
    "not_in_only",
    "data_policy",
    "region",
    "missing_parameters",
    "below_min_quality",
    "circuit_open",
    "circuit_half_open",
    "at_capacity",
    "over_max_price",
)
(
    _OK,
    _NOT_VISIBLE,
    _KIND,
    _IGNORED,
    _NOT_IN_ONLY,
    _DATA,
    _REGION,
    _PARAMETERS,
    _QUALITY,
    _CIRCUIT_OPEN,
    _CIRCUIT_HALF_OPEN,
    _CAPACITY,
    _PRICE,
) = range(len(REASONS))

# Filters that depend on live load and health: an endpoint they remove may come back.
TRANSIENT_REASONS = frozenset(
    {"circuit_open", "circuit_half_open", "at_capacity", "over_max_price"}
)

REASON_TEXT: Mapping[str, str] = {
    "not_visible": "private to another organisation",
    "kind_mismatch": "serves another kind of request",
    "ignored": "excluded by provider.ignore",
    "not_in_only": "not listed in provider.only",
    "data_policy": "keeps request data; the policy asks for zero data retention",
    "region": "runs outside the allowed regions",
    "missing_parameters": "does not support every parameter of the request",
    "below_min_quality": "quality for this request is below min_quality",
    "circuit_open": "circuit breaker open after recent failures",
    "circuit_half_open": "circuit breaker half-open and its trial request is taken",
    "at_capacity": "every concurrent slot is in use",
    "over_max_price": "the quoted price exceeds max_price",
}


@dataclass(frozen=True, slots=True)
class Candidate:
    """An endpoint to try, at the price quoted for this request."""

    endpoint: EndpointView
    price_input: int  # quoted nanos per million tokens
    price_output: int
    multiplier: float
    score: float = 0.0  # the balanced score
    quality: float = QUALITY_PRIOR  # components, each 0..1 and higher is better
    price_score: float = 1.0
    latency_score: float = 1.0
    latency_ms: float | None = None  # measured EWMA (None: the prior was used)
    explored: bool = False  # put first by the exploration rule

    def to_trace(self, rank: int) -> dict[str, Any]:
        return {
            "rank": rank,
            "endpoint": self.endpoint.full_slug,
            "endpoint_id": self.endpoint.id,
            "vendor": self.endpoint.vendor_slug,
            "score": round(self.score, 6),
            "components": {
                "quality": round(self.quality, 6),
                "price": round(self.price_score, 6),
                "latency": round(self.latency_score, 6),
            },
            "latency_ms": self.latency_ms,
            "quote": _quote_trace(self.price_input, self.price_output, self.multiplier),
            "explored": self.explored,
        }


@dataclass(frozen=True, slots=True, eq=False)
class _Detail:
    """The arrays behind a decision, kept for ``reason_for`` and the trace (built lazily)."""

    index: SnapshotIndex
    policy: RoutePolicy
    kind: str
    request_params: frozenset[str]
    invisible: IntArray  # snapshot positions dropped as not visible
    positions: IntArray  # visible positions, in candidate-set order
    reasons: npt.NDArray[np.int8]  # per visible position: index into REASONS (0 = eligible)
    quality: FloatArray  # per visible position
    live: LiveColumns  # per visible position
    eligible: IntArray  # indices into ``positions``
    score: FloatArray  # per eligible
    price_score: FloatArray
    latency_score: FloatArray


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The router's answer for one request."""

    candidates: tuple[Candidate, ...]
    strategy: str
    explored: int | None  # the endpoint id the exploration rule put first
    unresolved: tuple[str, ...]  # model entries that matched no visible endpoint
    considered_count: int  # visible endpoints the filters looked at
    eligible_count: int
    _detail: _Detail = field(repr=False, compare=False)

    @property
    def filtered(self) -> dict[str, int]:
        """How many endpoints each filter removed, by reason code."""
        counts = np.bincount(self._detail.reasons, minlength=len(REASONS))
        result = {REASONS[c]: int(n) for c, n in enumerate(counts.tolist()) if c and n}
        if self._detail.invisible.size:
            result["not_visible"] = int(self._detail.invisible.size)
        return result

    def reason_for(self, endpoint_id: int) -> str | None:
        """The reason code that filtered the endpoint out (None: eligible or not considered)."""
        detail = self._detail
        position = detail.index.position_of.get(endpoint_id)
        if position is None:
            return None
        if (detail.invisible == position).any():
            return "not_visible"
        rows = np.flatnonzero(detail.positions == position)
        if not rows.size:
            return None
        return REASONS[int(detail.reasons[rows[0]])] or None

    def no_candidates_error(self) -> GatewayError:
        """The error to answer when ``candidates`` is empty, saying what filtered what.

        A 503 when load or health filtered an endpoint (a retry may succeed); a 404
        ``no_matching_endpoint`` when only the request itself (its policy, kind or
        parameters) ruled every endpoint out, which no retry changes.
        """
        counts = {k: v for k, v in self.filtered.items() if k != "not_visible"}
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        filtered = f" (filtered: {summary})" if summary else ""
        if counts and TRANSIENT_REASONS.isdisjoint(counts):
            return NotFound(
                "no endpoint you may use can serve this request as asked" + filtered,
                code="no_matching_endpoint",
            )
        return NoCapacity("no endpoint can take this request right now" + filtered)

    def to_trace(self) -> dict[str, Any]:
        """The decision as JSON-serialisable data for the route trace.

        Up to ``TRACE_DETAIL_LIMIT`` considered endpoints, every one is listed with its
        reason or its score components and quote; beyond that, only the candidates and the
        counts per reason. Endpoints private to other organisations are never mentioned.
        """
        detail = self._detail
        trace: dict[str, Any] = {
            "strategy": self.strategy,
            "policy": detail.policy.to_trace(),
            "explored": self.explored,
            "unresolved": list(self.unresolved),
            "considered": self.considered_count,
            "eligible": self.eligible_count,
            "filtered": {k: v for k, v in self.filtered.items() if k != "not_visible"},
            "candidates": [c.to_trace(rank) for rank, c in enumerate(self.candidates)],
        }
        if self.considered_count <= TRACE_DETAIL_LIMIT:
            trace["endpoints"] = self._endpoint_rows()
        else:
            trace["endpoints_omitted"] = self.considered_count
        return trace

    def _endpoint_rows(self) -> list[dict[str, Any]]:
        detail = self._detail
        ranks = {c.endpoint.id: rank for rank, c in enumerate(self.candidates)}
        eligible_row = {int(r): i for i, r in enumerate(detail.eligible.tolist())}
        rows = []
        for row, position in enumerate(detail.positions.tolist()):
            endpoint = detail.index.endpoints[position]
            live = detail.live
            entry: dict[str, Any] = {
                "endpoint": endpoint.full_slug,
                "endpoint_id": endpoint.id,
                "vendor": endpoint.vendor_slug,
            }
            code = REASONS[int(detail.reasons[row])]
            if code:
                entry.update(
                    status="filtered",
                    reason=code,
                    detail=_reason_detail(code, endpoint, detail, row),
                )
            else:
                i = eligible_row[row]
                latency = live.latency[row].item()
                entry.update(
                    status="candidate" if endpoint.id in ranks else "eligible",
                    rank=ranks.get(endpoint.id),
                    score=round(detail.score[i].item(), 6),
                    components={
                        "quality": round(detail.quality[row].item(), 6),
                        "price": round(detail.price_score[i].item(), 6),
                        "latency": round(detail.latency_score[i].item(), 6),
                    },
                    latency_ms=None if latency != latency else latency,
                    requests=int(live.requests[row]),
                    quote=_quote_trace(
                        int(live.quote_input[row]),
                        int(live.quote_output[row]),
                        live.multiplier[row].item(),
                    ),
                )
            rows.append(entry)
        return rows


def _quote_trace(price_input: int, price_output: int, multiplier: float) -> dict[str, Any]:
    return {
        "input": price_input,
        "output": price_output,
        "multiplier": round(multiplier, 4),
        "unit": "nano-usd-per-1m-tokens",
    }


def _reason_detail(code: str, endpoint: EndpointView, detail: _Detail, row: int) -> str:
    """The human sentence behind a reason code, with the numbers that decided it."""
    policy, live = detail.policy, detail.live
    if code == "kind_mismatch":
        return f"serves {endpoint.kind} requests, not {detail.kind}"
    if code == "data_policy":
        return (
            f"keeps request data for {endpoint.data_retention_days} days; the policy asks "
            "for zero data retention"
        )
    if code == "region":
        allowed = ", ".join(sorted(policy.regions or ()))
        return f"runs in region {endpoint.region}, not in the allowed regions ({allowed})"
    if code == "missing_parameters":
        missing = sorted(detail.request_params - endpoint.supported_parameters)
        return f"does not support: {', '.join(missing)}"
    if code == "below_min_quality":
        return (
            f"quality {detail.quality[row].item():.3f} for this request is below min_quality "
            f"{policy.min_quality:.3f}"
        )
    if code == "at_capacity":
        return f"{int(live.inflight[row])} of {endpoint.capacity} concurrent requests in flight"
    if code == "over_max_price":
        limits = []
        if policy.max_price_prompt is not None:
            limits.append(f"prompt {format_usd(policy.max_price_prompt, 6)}")
        if policy.max_price_completion is not None:
            limits.append(f"completion {format_usd(policy.max_price_completion, 6)}")
        return (
            f"quoted {format_usd(int(live.quote_input[row]), 6)} input / "
            f"{format_usd(int(live.quote_output[row]), 6)} output per 1M tokens "
            f"(x{live.multiplier[row].item():.4f} surge at utilisation "
            f"{live.utilisation[row].item():.2f}) exceeds max_price ({', '.join(limits)})"
        )
    return REASON_TEXT[code]


# --- the router ----------------------------------------------------------------------------


def prepare_snapshot(snapshot: Snapshot) -> None:
    """Build the snapshot's routing arrays now (call it after loading a snapshot, off the
    request path), so that no request pays for it."""
    index_for(snapshot)


def plan_route(
    snapshot: Snapshot,
    policy: RoutePolicy,
    *,
    organization_id: int,
    kind: str,
    live: Mapping[int, EndpointLive],
    explore_draw: float,
    request_params: frozenset[str] = frozenset(),
    max_candidates: int | None = MAX_CANDIDATES,
    check_capacity: bool = True,
) -> RouteDecision:
    """Choose and order the endpoints for one request (see the module docstring).

    ``live`` maps endpoint ids to their live numbers (missing = ``EndpointLive()``); pass a
    ``LiveView`` built once per refresh so its arrays are reused. ``explore_draw`` is a
    uniform random number in [0, 1). ``request_params`` are the request's parameters that
    ``require_parameters`` checks (``routing.policy.request_parameters(body)``).
    ``max_candidates`` = None keeps every eligible endpoint. ``check_capacity`` = False
    keeps endpoints that ``live`` counts as full (reserve, which counts atomically, decides).

    Raises ``NotFound`` when no model entry matches a visible endpoint and ``BadRequest``
    for ``model: auto`` that the gateway did not resolve. An empty ``candidates`` means
    every endpoint was filtered: answer ``decision.no_candidates_error()``.
    """
    if policy.auto:
        raise BadRequest(
            "`model: auto` is not available on this gateway; name a model or `tag:...`",
            param="model",
            code="auto_unavailable",
        )
    index = index_for(snapshot)
    positions, groups, kind_ok, invisible, unresolved = _candidate_set(
        index, policy.models, organization_id, kind
    )
    reasons = np.zeros(len(positions), np.int8)

    def mark(condition: BoolArray, code: int) -> None:
        reasons[(reasons == 0) & condition] = code

    mark(~kind_ok, _KIND)
    if policy.ignore:
        mark(_matches(index, positions, policy.ignore), _IGNORED)
    if policy.only is not None:
        mark(~_matches(index, positions, policy.only), _NOT_IN_ONLY)
    if policy.zero_retention:
        mark(index.retention[positions] > 0, _DATA)
    if policy.trusted_only:
        untrusted = (index.retention[positions] > 0) & (
            index.private_to[positions] != organization_id
        )
        mark(untrusted, _DATA)
    if policy.regions is not None:
        allowed = np.zeros(len(index.region_codes) + 1, np.bool_)
        for region in policy.regions:
            code = index.region_codes.get(region)
            if code is not None:
                allowed[code] = True
        mark(~allowed[index.region[positions]], _REGION)
    if policy.require_parameters and request_params:
        mark(~index.parameters_supported(positions, request_params), _PARAMETERS)
    quality = _quality(index, policy.models, positions, groups)
    if policy.min_quality is not None:
        mark(quality < policy.min_quality, _QUALITY)
    live_now = live_columns(index, live, positions)
    circuit = live_now.circuit
    mark(circuit == CIRCUIT_OPEN, _CIRCUIT_OPEN)
    mark((circuit == CIRCUIT_HALF_OPEN) & (live_now.trial == 0), _CIRCUIT_HALF_OPEN)
    if check_capacity:
        mark(live_now.inflight >= index.capacity[positions], _CAPACITY)
    if policy.max_price_prompt is not None:
        mark(live_now.quote_input > policy.max_price_prompt, _PRICE)
    if policy.max_price_completion is not None:
        mark(live_now.quote_output > policy.max_price_completion, _PRICE)

    eligible = np.flatnonzero(reasons == 0)
    blended = (live_now.quote_input[eligible] + live_now.quote_output[eligible]).astype(np.float64)
    latency = live_now.latency[eligible]
    latency = np.where(np.isnan(latency), LATENCY_PRIOR_MS, latency)
    eligible_quality = quality[eligible]
    score, price_score, latency_score = balanced_scores(eligible_quality, blended, latency)

    ids = index.ids[positions[eligible]]
    keys: list[Any] = [ids, -score]
    if policy.sort == "price":
        keys.append(blended)
    elif policy.sort == "latency":
        keys.append(latency)
    elif policy.sort == "throughput":
        throughput = live_now.throughput[eligible]
        keys.append(-np.where(np.isnan(throughput), THROUGHPUT_PRIOR_TPS, throughput))
    elif policy.sort == "quality":
        keys.append(-eligible_quality)
    if policy.order:
        keys.append(_order_rank(index, positions[eligible], policy.order))
    if len(policy.models) > 1:
        keys.append(groups[eligible])
    ranked = np.lexsort(keys) if len(eligible) > 1 else np.arange(len(eligible))

    limit = 1 if not policy.allow_fallbacks else max_candidates
    chosen = ranked[:limit].tolist() if limit is not None else ranked.tolist()
    explored_row = None
    if (
        explore_draw < EXPLORE_SHARE
        and policy.sort == BALANCED
        and not policy.order
        and policy.allow_fallbacks
        and eligible.size
    ):
        explored_row = _newest(
            live_now.requests[eligible], ids, groups[eligible] if len(policy.models) > 1 else None
        )
        if explored_row is not None:
            rest = [r for r in chosen if r != explored_row]
            chosen = [explored_row, *rest][:limit]

    endpoints = index.endpoints
    candidates = []
    for r in chosen:
        row = int(eligible[r])
        measured = live_now.latency[row].item()
        candidates.append(
            Candidate(
                endpoint=endpoints[int(positions[row])],
                price_input=int(live_now.quote_input[row]),
                price_output=int(live_now.quote_output[row]),
                multiplier=live_now.multiplier[row].item(),
                score=score[r].item(),
                quality=eligible_quality[r].item(),
                price_score=price_score[r].item(),
                latency_score=latency_score[r].item(),
                latency_ms=None if measured != measured else measured,
                explored=r == explored_row,
            )
        )
    return RouteDecision(
        candidates=tuple(candidates),
        strategy=policy.sort,
        explored=candidates[0].endpoint.id if explored_row is not None else None,
        unresolved=unresolved,
        considered_count=len(positions),
        eligible_count=len(eligible),
        _detail=_Detail(
            index=index,
            policy=policy,
            kind=kind,
            request_params=request_params,
            invisible=invisible,
            positions=positions,
            reasons=reasons,
            quality=quality,
            live=live_now,
            eligible=eligible,
            score=score,
            price_score=price_score,
            latency_score=latency_score,
        ),
    )


def _newest(requests: IntArray, ids: IntArray, groups: IntArray | None) -> int | None:
    """The row of the new endpoint to explore: fewest requests, then lowest id (first
    model entry only), or None when no eligible endpoint is new."""
    new = requests < EXPLORE_MIN_REQUESTS
    if groups is not None:
        new &= groups == groups.min()
    rows = np.flatnonzero(new)
    if not rows.size:
        return None
    best = np.lexsort((ids[rows], requests[rows]))[0]
    return int(rows[best])


_EMPTY = np.empty(0, np.int64)


def _candidate_set(
    index: SnapshotIndex, specs: tuple[ModelSpec, ...], organization_id: int, kind: str
) -> tuple[IntArray, IntArray, BoolArray, IntArray, tuple[str, ...]]:
    """(visible positions, their model-entry index, whether each is of the requested
    kind, invisible positions, unresolved entries)."""
    found: list[IntArray] = []
    group_of: list[IntArray] = []
    kind_of: list[BoolArray] = []
    invisible: list[IntArray] = []
    unresolved: list[str] = []
    missing: list[tuple[int, ModelSpec, str]] = []
    kind_code = index.kind_codes.get(kind, -1)
    for g, spec in enumerate(specs):
        positions, hidden, why = _spec_positions(index, spec, organization_id)
        if hidden.size:
            invisible.append(hidden)
        kind_ok = index.kind[positions] == kind_code
        if not kind_ok.any():
            unresolved.append(spec.text)
            missing.append((g, spec, why))
            continue
        found.append(positions)
        kind_of.append(kind_ok)
        group_of.append(np.full(positions.size, g, np.int64))
    if not found:
        g, spec, why = missing[0]
        param = "model" if g == 0 else f"models[{g}]"
        raise NotFound(
            f"the model `{spec.text}` does not exist or you do not have access to it{why}",
            param=param,
        )
    if len(found) == 1:
        positions, groups, kinds = found[0], group_of[0], kind_of[0]
    else:
        positions = np.concatenate(found)
        _, first = np.unique(positions, return_index=True)
        keep = np.sort(first)  # an endpoint listed twice stays in its first entry
        positions = positions[keep]
        groups = np.concatenate(group_of)[keep]
        kinds = np.concatenate(kind_of)[keep]
    if not invisible:
        hidden = _EMPTY
    else:
        hidden = invisible[0] if len(invisible) == 1 else np.unique(np.concatenate(invisible))
    return positions, groups, kinds, hidden, tuple(unresolved)


def _spec_positions(
    index: SnapshotIndex, spec: ModelSpec, organization_id: int
) -> tuple[IntArray, IntArray, str]:
    """The positions a model entry names that the organisation may see, those it may
    not, and a hint for the error when it names none."""
    if spec.kind == "tags":
        visible, hidden = index.visible_tag_set(spec.tags, organization_id)
        return visible, hidden, ""
    position = index.slug_position.get(spec.slug or "")
    if position is None:
        return _EMPTY, _EMPTY, ""
    endpoint = index.endpoints[position]
    found = np.array([position], np.int64)
    if not endpoint.visible_to(organization_id):
        return _EMPTY, found, ""
    if spec.version is not None and endpoint.version != spec.version:
        return _EMPTY, _EMPTY, f" (it serves version {endpoint.version})"
    return found, _EMPTY, ""


def _quality(
    index: SnapshotIndex, specs: tuple[ModelSpec, ...], positions: IntArray, groups: IntArray
) -> FloatArray:
    """Each endpoint's quality for what its model entry asked (mean over the tags)."""

    def of(spec: ModelSpec, where: IntArray) -> FloatArray:
        if spec.kind != "tags":
            return index.quality_overall[where]
        if len(spec.tags) == 1:
            return index.quality(spec.tags[0])[where]
        total = sum((index.quality(tag)[where] for tag in spec.tags), np.zeros(where.size))
        return np.asarray(total / len(spec.tags), np.float64)

    if len(specs) == 1:
        return of(specs[0], positions)
    quality = np.empty(positions.size, np.float64)
    for g, spec in enumerate(specs):
        rows = np.flatnonzero(groups == g)
        if rows.size:
            quality[rows] = of(spec, positions[rows])
    return quality


def _matches(index: SnapshotIndex, positions: IntArray, names: frozenset[str]) -> BoolArray:
    """Which endpoints a list of vendor slugs and ``vendor/endpoint`` slugs names."""
    vendors = np.zeros(len(index.vendor_codes) + 1, np.bool_)
    hit = np.zeros(positions.size, np.bool_)
    for name in names:
        if "/" in name:
            position = index.slug_position.get(name)
            if position is not None:
                hit |= positions == position
        else:
            code = index.vendor_codes.get(name)
            if code is not None:
                vendors[code] = True
    return hit | vendors[index.vendor[positions]]


def _order_rank(index: SnapshotIndex, positions: IntArray, order: tuple[str, ...]) -> IntArray:
    """Each endpoint's place in ``provider.order`` (its first mention; unlisted last)."""
    rank = np.full(positions.size, len(order), np.int64)
    vendors = index.vendor[positions]
    for place in range(len(order) - 1, -1, -1):
        name = order[place]
        if "/" in name:
            position = index.slug_position.get(name)
            if position is not None:
                rank[positions == position] = place
        else:
            code = index.vendor_codes.get(name)
            if code is not None:
                rank[vendors == code] = place
    return rank


# --- the first router's API, kept for the current gateway ----------------------------------


def resolve_model(
    snapshot: Snapshot, model: str, organization_id: int, kind: str
) -> list[EndpointView]:
    """The endpoints that could serve ``model`` for this organisation (not yet filtered)."""
    policy = RoutePolicy.for_model(model)
    index = index_for(snapshot)
    positions, _, kind_ok, _, _ = _candidate_set(index, policy.models, organization_id, kind)
    return [index.endpoints[p] for p in positions[kind_ok].tolist()]


def route(
    snapshot: Snapshot,
    *,
    model: str,
    organization_id: int,
    kind: str = "chat",
    utilisation: Mapping[int, float] | None = None,
) -> list[Candidate]:
    """Order the candidates for one request: cheapest quoted price first (input + output).

    The first router's API, now a thin wrapper over ``plan_route`` with no policy beyond
    the model name, no live numbers but utilisation, and no exploration.
    """
    policy = RoutePolicy.for_model(model)
    if policy.variant is None:
        policy = dataclasses.replace(policy, sort="price")
    live = {
        endpoint_id: EndpointLive(utilisation=value)
        for endpoint_id, value in (utilisation or {}).items()
    }
    decision = plan_route(
        snapshot,
        policy,
        organization_id=organization_id,
        kind=kind,
        live=live,
        explore_draw=1.0,
        max_candidates=None,
    )
    return list(decision.candidates)
