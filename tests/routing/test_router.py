"""The router as a pure function: candidate sets, filters (with their reason codes),
quotes at the surged price, strategies, exploration and the route trace.

No database: snapshots are built from ``EndpointView`` values directly.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.errors import BadRequest, NoCapacity, NotFound
from routing.policy import RoutePolicy, route_policy
from routing.router import (
    EXPLORE_MIN_REQUESTS,
    EXPLORE_SHARE,
    MAX_CANDIDATES,
    REASONS,
    TRACE_DETAIL_LIMIT,
    EndpointLive,
    LiveView,
    RouteDecision,
    plan_route,
    route,
)
from routing.scoring import (
    LATENCY_PRIOR_MS,
    QUALITY_PRIOR,
    W_LATENCY,
    W_PRICE,
    W_QUALITY,
    index_for,
    surge_multipliers,
)
from routing.snapshot import DEFAULT_SUPPORTED_PARAMETERS, EndpointView, Snapshot
from vendors.pricing import quote, surge_multiplier, validate_surge_curve

ORG = 1
OTHER_ORG = 2
CURVE = ((0.5, 1.0), (1.0, 2.0))  # no surge below half load, 2x when full


def endpoint(endpoint_id: int, **overrides: Any) -> EndpointView:
    values: dict[str, Any] = {
        "id": endpoint_id,
        "vendor_id": 100 + endpoint_id,
        "vendor_slug": f"vendor{endpoint_id}",
        "slug": f"model{endpoint_id}",
        "kind": "chat",
        "base_url": "http://127.0.0.1:9/v1",
        "upstream_model": "up",
        "secret": "",
        "tags": frozenset({"sql"}),
        "price_input": 1_000_000_000,  # $1 per million tokens
        "price_output": 2_000_000_000,
        "context_length": 2048,
        "capacity": 4,
        "surge_curve": CURVE,
        "surge_cap": 3.0,
        "region": "eu",
        "data_retention_days": 0,
        "private_to": None,
    }
    if "tags" in overrides:
        overrides["tags"] = frozenset(overrides["tags"])
    values.update(overrides)
    return EndpointView(**values)


def snapshot(*endpoints: EndpointView) -> Snapshot:
    return Snapshot.build(list(endpoints))


def decide(
    snap: Snapshot,
    body: dict[str, Any] | RoutePolicy | None = None,
    *,
    live: dict[int, EndpointLive] | None = None,
    draw: float = 0.99,
    organization_id: int = ORG,
    kind: str = "chat",
    params: frozenset[str] = frozenset(),
    max_candidates: int | None = MAX_CANDIDATES,
) -> RouteDecision:
    policy = body if isinstance(body, RoutePolicy) else route_policy(body or {"model": "tag:sql"})
    return plan_route(
        snap,
        policy,
        organization_id=organization_id,
        kind=kind,
        live=LiveView(live or {}),
        explore_draw=draw,
        request_params=params,
        max_candidates=max_candidates,
    )


def ids(decision: RouteDecision) -> list[int]:
    return [c.endpoint.id for c in decision.candidates]


# --- the candidate set ---------------------------------------------------------------------


def test_it_routes_a_slug_to_its_endpoint():
    snap = snapshot(endpoint(1), endpoint(2))

    decision = decide(snap, {"model": "vendor2/model2"})

    assert ids(decision) == [2]


def test_it_routes_a_tag_to_every_endpoint_that_carries_it():
    snap = snapshot(endpoint(1), endpoint(2), endpoint(3, tags={"legal"}))

    decision = decide(snap, {"model": "tag:sql"})

    assert sorted(ids(decision)) == [1, 2]


def test_it_needs_every_tag_joined_with_plus():
    snap = snapshot(
        endpoint(1, tags={"sql", "legal"}), endpoint(2, tags={"sql"}), endpoint(3, tags={"legal"})
    )

    decision = decide(snap, {"model": "tag:sql+legal"})

    assert ids(decision) == [1]


@pytest.mark.parametrize("model", ["nobody/nothing", "tag:nothing-serves-this", "gpt-4o"])
def test_it_answers_not_found_for_an_unknown_model(model):
    snap = snapshot(endpoint(1))

    with pytest.raises(NotFound) as caught:
        decide(snap, {"model": model})

    assert caught.value.param == "model"
    assert "does not exist or you do not have access to it" in caught.value.message


def test_it_pins_the_version_of_a_slug():
    snap = snapshot(endpoint(1, version=2))

    assert ids(decide(snap, {"model": "vendor1/model1@2"})) == [1]
    with pytest.raises(NotFound) as caught:
        decide(snap, {"model": "vendor1/model1@3"})
    assert "serves version 2" in caught.value.message


def test_it_hides_a_private_endpoint_from_other_organisations():
    snap = snapshot(endpoint(1, private_to=OTHER_ORG), endpoint(2))

    with pytest.raises(NotFound):
        decide(snap, {"model": "vendor1/model1"})
    decision = decide(snap, {"model": "tag:sql"})

    assert ids(decision) == [2]
    assert decision.reason_for(1) == "not_visible"
    trace = json.dumps(decision.to_trace())
    assert "vendor1" not in trace and "not_visible" not in trace


def test_it_routes_a_private_endpoint_for_its_own_organisation():
    snap = snapshot(endpoint(1, private_to=ORG))

    assert ids(decide(snap, {"model": "vendor1/model1"}, organization_id=ORG)) == [1]


def test_it_filters_endpoints_of_another_kind():
    snap = snapshot(endpoint(1), endpoint(2, kind="embeddings"))

    decision = decide(snap)

    assert ids(decision) == [1]
    assert decision.reason_for(2) == "kind_mismatch"
    with pytest.raises(NotFound):
        decide(snap, {"model": "vendor2/model2"})


def test_it_tries_the_entries_of_models_in_order():
    expensive = endpoint(1, tags={"legal"}, price_input=9_000_000_000)
    cheap = endpoint(2, tags={"sql"}, price_input=1)
    snap = snapshot(expensive, cheap)

    decision = decide(snap, {"models": ["tag:legal", "tag:sql"]})

    assert ids(decision) == [1, 2]


def test_it_keeps_going_when_an_entry_of_models_is_unknown_and_says_so():
    snap = snapshot(endpoint(1))

    decision = decide(snap, {"models": ["ghost/model", "tag:sql"]})

    assert ids(decision) == [1]
    assert decision.unresolved == ("ghost/model",)
    with pytest.raises(NotFound) as caught:
        decide(snap, {"models": ["ghost/model", "tag:nothing"]})
    assert caught.value.param == "model"


def test_it_refuses_an_unresolved_auto():
    snap = snapshot(endpoint(1))

    with pytest.raises(BadRequest) as caught:
        decide(snap, {"model": "auto"})
    decision = decide(snap, route_policy({"model": "auto"}).with_auto_tags("sql"))

    assert caught.value.code == "auto_unavailable"
    assert ids(decision) == [1]


# --- filters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "filtered_id", "reason"),
    [
        ({"ignore": ["vendor1"]}, 1, "ignored"),
        ({"ignore": ["vendor1/model1"]}, 1, "ignored"),
        ({"only": ["vendor2", "vendor3/model3"]}, 1, "not_in_only"),
        ({"zdr": True}, 3, "data_policy"),
        ({"data_collection": "deny"}, 3, "data_policy"),
        ({"region": "EU"}, 2, "region"),
        ({"region": ["eu", "ap"]}, 2, "region"),
        ({"min_quality": 0.6}, 1, "below_min_quality"),
    ],
)
def test_it_filters_by_the_policy_with_a_reason(provider, filtered_id, reason):
    snap = snapshot(
        endpoint(1, quality={"sql": 0.4}),
        endpoint(2, region="us", quality={"sql": 0.9}),
        endpoint(3, data_retention_days=30, quality={"sql": 0.9}),
    )

    decision = decide(snap, {"model": "tag:sql", "provider": provider})

    assert filtered_id not in ids(decision)
    assert decision.reason_for(filtered_id) == reason
    assert decision.filtered == {reason: 1}
    row = next(r for r in decision.to_trace()["endpoints"] if r["endpoint_id"] == filtered_id)
    assert (row["status"], row["reason"]) == ("filtered", reason)
    assert row["detail"]


def test_it_requires_the_request_parameters_only_when_asked():
    no_logprobs = DEFAULT_SUPPORTED_PARAMETERS - {"logprobs"}
    snap = snapshot(endpoint(1, supported_parameters=no_logprobs), endpoint(2))
    params = frozenset({"logprobs", "temperature"})

    strict = decide(
        snap, {"model": "tag:sql", "provider": {"require_parameters": True}}, params=params
    )
    lenient = decide(snap, {"model": "tag:sql"}, params=params)

    assert ids(strict) == [2]
    assert strict.reason_for(1) == "missing_parameters"
    assert "logprobs" in strict.to_trace()["endpoints"][0]["detail"]
    assert sorted(ids(lenient)) == [1, 2]


def test_it_filters_an_open_circuit_and_a_half_open_one_without_a_trial_slot():
    snap = snapshot(endpoint(1), endpoint(2), endpoint(3), endpoint(4))
    live = {
        1: EndpointLive(circuit="open"),
        2: EndpointLive(circuit="half_open", half_open_trial=False),
        3: EndpointLive(circuit="half_open", half_open_trial=True),
    }

    decision = decide(snap, live=live)

    assert sorted(ids(decision)) == [3, 4]
    assert decision.reason_for(1) == "circuit_open"
    assert decision.reason_for(2) == "circuit_half_open"


def test_it_filters_an_endpoint_at_capacity():
    snap = snapshot(endpoint(1, capacity=2), endpoint(2, capacity=2))

    decision = decide(snap, live={1: EndpointLive(inflight=2), 2: EndpointLive(inflight=1)})

    assert ids(decision) == [2]
    assert decision.reason_for(1) == "at_capacity"


def test_it_judges_max_price_at_the_surged_quote():
    # $1/$2 at rest; at full load the curve doubles it to $2/$4.
    snap = snapshot(endpoint(1))
    body = {"model": "tag:sql", "provider": {"max_price": {"prompt": 1.5, "completion": "3"}}}

    at_rest = decide(snap, body, live={1: EndpointLive(utilisation=0.2)})
    surged = decide(snap, body, live={1: EndpointLive(utilisation=1.0)})

    assert ids(at_rest) == [1]
    assert ids(surged) == []
    assert surged.reason_for(1) == "over_max_price"
    detail = surged.to_trace()["endpoints"][0]["detail"]
    assert "$2.000000 input" in detail and "x2.0000" in detail


def test_it_explains_an_empty_decision():
    snap = snapshot(endpoint(1), endpoint(2))

    decision = decide(snap, live={1: EndpointLive(circuit="open"), 2: EndpointLive(inflight=9)})

    assert decision.candidates == ()
    error = decision.no_candidates_error()
    assert isinstance(error, NoCapacity)
    assert "1 at_capacity" in error.message and "1 circuit_open" in error.message


def test_it_answers_not_found_when_only_the_request_rules_every_endpoint_out():
    """Found by schemathesis: a min_quality no endpoint meets was a 503, which invites
    retries that can never succeed."""
    snap = snapshot(endpoint(1), endpoint(2, region="us"))
    policy = route_policy({"model": "tag:sql", "provider": {"min_quality": 0.99}})

    decision = decide(snap, policy)

    error = decision.no_candidates_error()
    assert isinstance(error, NotFound) and error.status == 404
    assert error.code == "no_matching_endpoint" and "2 below_min_quality" in error.message

    good_but_down = snapshot(endpoint(1), endpoint(3, quality={"sql": 1.0}))
    mixed = decide(good_but_down, policy, live={3: EndpointLive(circuit="open")})
    assert isinstance(mixed.no_candidates_error(), NoCapacity)  # a retry may find one


# --- quotes --------------------------------------------------------------------------------


def test_it_quotes_a_price_that_rises_with_utilisation():
    snap = snapshot(endpoint(1))
    quotes = []

    for utilisation in (0.0, 0.5, 0.6, 0.75, 0.9, 1.0, 1.5):
        decision = decide(snap, live={1: EndpointLive(utilisation=utilisation)})
        candidate = decision.candidates[0]
        multiplier = surge_multiplier(CURVE, utilisation, 3.0)
        assert candidate.multiplier == multiplier
        assert candidate.price_input == quote(1_000_000_000, multiplier)
        assert candidate.price_output == quote(2_000_000_000, multiplier)
        quotes.append(candidate.price_output)

    assert quotes == sorted(quotes)
    assert quotes[0] == 2_000_000_000 and quotes[-1] == 4_000_000_000


curves = (
    st.lists(
        st.tuples(st.floats(0, 1, allow_nan=False), st.floats(1, 100, allow_nan=False, width=32)),
        min_size=1,
        max_size=6,
    )
    .map(lambda points: sorted({u: m for u, m in points}.items()))
    .map(
        lambda points: [
            (u, m) for (u, _), m in zip(points, sorted(p[1] for p in points), strict=True)
        ]
    )
)


@settings(max_examples=300, deadline=None)
@given(
    curve=curves,
    cap=st.floats(1, 100, allow_nan=False),
    utilisation=st.floats(-1, 3, allow_nan=False),
    price=st.integers(0, 10**12) | st.integers(10**14, 10**16),  # both quote paths
)
def test_it_quotes_exactly_what_the_pricing_module_quotes(curve, cap, utilisation, price):
    validate_surge_curve(curve)
    x = np.array([[u for u, _ in curve] + [2.0 + k for k in range(6 - len(curve))]])
    y = np.array([[m for _, m in curve] + [curve[-1][1]] * (6 - len(curve))])

    multiplier = surge_multipliers(x, y, np.array([cap]), np.array([utilisation]))[0]
    snap = snapshot(endpoint(1, surge_curve=tuple(curve), surge_cap=cap, price_output=price))
    candidate = decide(snap, live={1: EndpointLive(utilisation=utilisation)}).candidates[0]

    assert multiplier == surge_multiplier(curve, utilisation, cap)
    assert candidate.price_output == quote(price, surge_multiplier(curve, utilisation, cap))


# --- strategies ----------------------------------------------------------------------------


def test_it_scores_balanced_as_the_documented_weighted_sum():
    snap = snapshot(
        endpoint(1, quality={"sql": 0.9}, price_input=3_000_000_000, price_output=3_000_000_000),
        endpoint(2, quality={"sql": 0.5}, price_input=1_000_000_000, price_output=1_000_000_000),
        endpoint(3, quality={"*": 0.7}, price_input=2_000_000_000, price_output=2_000_000_000),
    )
    live = {1: EndpointLive(latency_ms=300.0), 2: EndpointLive(latency_ms=900.0)}

    decision = decide(snap, live=live)

    # price: 6, 2, 4 ($/M blended) -> 0, 1, 0.5; latency: 300, 900, prior 1000 -> 1, 1/7, 0
    expected = {
        1: W_QUALITY * 0.9 + W_PRICE * 0 + W_LATENCY * 1,
        2: W_QUALITY * 0.5 + W_PRICE * 1 + W_LATENCY * (100 / 700),
        3: W_QUALITY * 0.7 + W_PRICE * 0.5 + W_LATENCY * 0,
    }
    assert LATENCY_PRIOR_MS == 1000.0
    assert ids(decision) == sorted(expected, key=lambda i: -expected[i])
    for candidate in decision.candidates:
        assert candidate.score == pytest.approx(expected[candidate.endpoint.id])


def test_it_uses_the_quality_prior_and_the_mean_over_tags():
    snap = snapshot(
        endpoint(1, tags={"sql", "legal"}, quality={"sql": 0.9, "legal": 0.5}),
        endpoint(2, tags={"sql", "legal"}),
        endpoint(3, tags={"sql", "legal"}, quality={"*": 0.8}),
    )

    decision = decide(snap, {"model": "tag:sql+legal"})

    quality = {c.endpoint.id: c.quality for c in decision.candidates}
    assert quality == {1: pytest.approx(0.7), 2: QUALITY_PRIOR, 3: pytest.approx(0.8)}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "tag:sql", "provider": {"sort": "price"}}, [3, 1, 2, 4]),
        ({"model": "tag:sql:floor"}, [3, 1, 2, 4]),
        ({"model": "tag:sql", "provider": {"sort": "latency"}}, [2, 4, 1, 3]),
        ({"model": "tag:sql", "provider": {"sort": "throughput"}}, [4, 3, 2, 1]),
        ({"model": "tag:sql:nitro"}, [4, 3, 2, 1]),
        ({"model": "tag:sql", "provider": {"sort": "quality"}}, [1, 4, 2, 3]),
    ],
)
def test_it_sorts_by_the_requested_key(body, expected):
    snap = snapshot(
        endpoint(1, price_input=2, price_output=2, quality={"sql": 0.9}),
        endpoint(2, price_input=3, price_output=3, quality={"sql": 0.6}),
        endpoint(3, price_input=1, price_output=1, quality={"sql": 0.2}),
        endpoint(4, price_input=9, price_output=9, quality={"sql": 0.8}),
    )
    live = {
        1: EndpointLive(latency_ms=900.0, throughput_tps=10.0),
        2: EndpointLive(latency_ms=100.0, throughput_tps=20.0),
        3: EndpointLive(latency_ms=950.0, throughput_tps=30.0),
        4: EndpointLive(latency_ms=200.0, throughput_tps=90.0),
    }

    decision = decide(snap, body, live=live)

    assert ids(decision) == expected


def test_it_breaks_ties_by_the_balanced_score_then_the_id():
    snap = snapshot(
        endpoint(3, quality={"sql": 0.5}),
        endpoint(1, quality={"sql": 0.5}),
        endpoint(2, quality={"sql": 0.9}),
    )

    decision = decide(snap, {"model": "tag:sql:floor"})

    assert ids(decision) == [2, 1, 3]


def test_it_puts_the_ordered_vendors_and_endpoints_first():
    snap = snapshot(
        endpoint(1, price_input=1),
        endpoint(2, price_input=2),
        endpoint(3, price_input=3, vendor_slug="acme", slug="a"),
        endpoint(4, price_input=4, vendor_slug="acme", slug="b"),
    )

    decision = decide(
        snap, {"model": "tag:sql:floor", "provider": {"order": ["vendor2/model2", "acme"]}}
    )

    assert ids(decision) == [2, 3, 4, 1]


def test_it_keeps_only_the_first_candidate_without_fallbacks():
    snap = snapshot(endpoint(1), endpoint(2), endpoint(3))

    decision = decide(snap, {"model": "tag:sql", "provider": {"allow_fallbacks": False}})

    assert len(decision.candidates) == 1
    assert decision.eligible_count == 3


def test_it_keeps_at_most_max_candidates():
    snap = snapshot(*(endpoint(i) for i in range(1, 12)))

    decision = decide(snap)

    assert len(decision.candidates) == MAX_CANDIDATES
    assert len(decide(snap, max_candidates=None).candidates) == 11


# --- exploration ---------------------------------------------------------------------------


def _market() -> tuple[Snapshot, dict[int, EndpointLive]]:
    """Two established endpoints that win on score and three new, worse ones."""
    established = [endpoint(i, quality={"sql": 0.9}, price_input=1) for i in (1, 2)]
    new = [endpoint(i, quality={"sql": 0.1}, price_input=9_000_000_000) for i in (10, 11, 12)]
    live = {
        1: EndpointLive(requests=5_000, latency_ms=100.0),
        2: EndpointLive(requests=5_000, latency_ms=120.0),
        10: EndpointLive(requests=3),
        11: EndpointLive(requests=0),
        12: EndpointLive(requests=0),
    }
    return snapshot(*established, *new), live


def test_it_explores_the_newest_eligible_endpoint_below_the_share():
    snap, live = _market()

    explored = decide(snap, live=live, draw=EXPLORE_SHARE / 2)
    exploited = decide(snap, live=live, draw=EXPLORE_SHARE)

    assert ids(explored)[:3] == [11, 1, 2]  # fewest requests, then the lowest id
    assert explored.explored == 11 and explored.candidates[0].explored
    assert ids(exploited)[:2] == [1, 2] and exploited.explored is None


def test_it_never_explores_a_filtered_new_endpoint():
    snap, live = _market()
    live[11] = EndpointLive(requests=0, circuit="open")
    live[12] = EndpointLive(requests=0, inflight=4)
    live[10] = EndpointLive(requests=3)

    decision = decide(snap, {"model": "tag:sql", "provider": {"ignore": ["vendor10"]}}, live=live)
    explored = decide(
        snap, {"model": "tag:sql", "provider": {"ignore": ["vendor10"]}}, live=live, draw=0.0
    )

    assert decision.explored is None
    assert explored.explored is None
    assert ids(explored)[:2] == [1, 2]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "tag:sql", "provider": {"order": ["vendor2"]}},
        {"model": "tag:sql:floor"},
        {"model": "tag:sql", "provider": {"sort": "latency"}},
        {"model": "tag:sql", "provider": {"allow_fallbacks": False}},
    ],
)
def test_it_does_not_explore_when_the_customer_chose_the_order(body):
    snap, live = _market()

    decision = decide(snap, body, live=live, draw=0.0)

    assert decision.explored is None
    assert 11 not in ids(decision)[:1]


def test_it_explores_its_share_of_requests_over_many_draws():
    snap, live = _market()
    draws = random.Random(20260101)
    view = LiveView(live)
    policy = route_policy({"model": "tag:sql"})
    explored = below = 0

    for _ in range(20_000):
        draw = draws.random()
        below += draw < EXPLORE_SHARE
        decision = plan_route(
            snap, policy, organization_id=ORG, kind="chat", live=view, explore_draw=draw
        )
        explored += decision.explored is not None

    assert explored == below  # never more than the draws allow
    assert abs(explored / 20_000 - EXPLORE_SHARE) < 0.005


def test_it_lets_new_endpoints_take_turns_until_they_are_established():
    snap, live = _market()
    live[10] = EndpointLive(requests=0)
    draws = random.Random(7)
    policy = route_policy({"model": "tag:sql"})
    turns = []

    for _ in range(8_000):
        decision = plan_route(
            snap,
            policy,
            organization_id=ORG,
            kind="chat",
            live=live,
            explore_draw=draws.random(),
        )
        served = decision.candidates[0].endpoint.id
        old = live[served]
        live[served] = EndpointLive(requests=old.requests + 1, latency_ms=old.latency_ms)
        if decision.explored is not None:
            turns.append(decision.explored)

    assert turns[:6] == [10, 11, 12, 10, 11, 12]
    assert len(turns) == 3 * EXPLORE_MIN_REQUESTS  # then none is new any more
    assert {i: turns.count(i) for i in (10, 11, 12)} == dict.fromkeys(
        (10, 11, 12), EXPLORE_MIN_REQUESTS
    )


# --- the trace -----------------------------------------------------------------------------


def test_it_traces_every_endpoint_of_a_small_decision():
    snap = snapshot(endpoint(1), endpoint(2), endpoint(3))

    decision = decide(snap, live={3: EndpointLive(circuit="open"), 1: EndpointLive(utilisation=1)})
    trace = json.loads(json.dumps(decision.to_trace()))

    rows = {r["endpoint_id"]: r for r in trace["endpoints"]}
    assert rows[3]["status"] == "filtered" and rows[3]["reason"] == "circuit_open"
    assert rows[2]["rank"] == 0 and rows[1]["rank"] == 1
    assert set(rows[1]["components"]) == {"quality", "price", "latency"}
    assert rows[1]["quote"] == {
        "input": 2_000_000_000,
        "output": 4_000_000_000,
        "multiplier": 2.0,
        "unit": "nano-usd-per-1m-tokens",
    }
    assert trace["filtered"] == {"circuit_open": 1}
    assert [c["endpoint_id"] for c in trace["candidates"]] == [2, 1]


def test_it_keeps_counts_instead_of_rows_for_a_large_decision():
    size = TRACE_DETAIL_LIMIT + 10
    snap = snapshot(*(endpoint(i) for i in range(1, size + 1)))
    live = {i: EndpointLive(circuit="open") for i in range(1, 21)}

    trace = json.loads(json.dumps(decide(snap, live=live).to_trace()))

    assert "endpoints" not in trace and trace["endpoints_omitted"] == size
    assert trace["filtered"] == {"circuit_open": 20}
    assert len(trace["candidates"]) == MAX_CANDIDATES
    assert trace["eligible"] == size - 20


def test_it_has_a_stable_list_of_reason_codes():
    assert REASONS[1:] == (
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


# --- the first router's API ----------------------------------------------------------------


def test_it_keeps_the_first_route_function_cheapest_first():
    snap = snapshot(
        endpoint(1, price_input=3), endpoint(2, price_input=1), endpoint(3, price_input=2)
    )

    candidates = route(snap, model="tag:sql", organization_id=ORG, utilisation={2: 1.0})

    assert [c.endpoint.id for c in candidates] == [3, 1, 2]
    assert candidates[2].multiplier == 2.0


def test_it_reuses_the_index_of_a_snapshot():
    snap = snapshot(endpoint(1))

    assert index_for(snap) is index_for(snap)
    assert index_for(snapshot(endpoint(1))) is not index_for(snap)


# --- property: never a filtered candidate, never twice --------------------------------------

VENDORS = ("acme", "bolt", "core")
TAGS = ("sql", "legal", "chat")
PARAMS = ("logprobs", "tools", "temperature", "response_format")


@st.composite
def markets(draw: st.DrawFn) -> tuple[Snapshot, dict[int, EndpointLive]]:
    count = draw(st.integers(1, 14))
    endpoints, live = [], {}
    for i in range(1, count + 1):
        vendor = draw(st.sampled_from(VENDORS))
        endpoints.append(
            endpoint(
                i,
                vendor_slug=vendor,
                slug=f"m{i}",
                kind=draw(st.sampled_from(("chat", "chat", "chat", "embeddings"))),
                tags=draw(st.sets(st.sampled_from(TAGS), min_size=1)),
                price_input=draw(st.integers(0, 5_000_000_000)),
                price_output=draw(st.integers(0, 5_000_000_000)),
                capacity=draw(st.integers(1, 4)),
                surge_curve=draw(st.sampled_from((CURVE, ((0.0, 1.0),), ((0.2, 1.5), (0.9, 4))))),
                surge_cap=draw(st.sampled_from((1.0, 3.0, 10.0))),
                region=draw(st.sampled_from(("eu", "us"))),
                data_retention_days=draw(st.sampled_from((0, 30))),
                private_to=draw(st.sampled_from((None, None, ORG, OTHER_ORG))),
                quality=draw(
                    st.dictionaries(st.sampled_from((*TAGS, "*")), st.floats(0, 1), max_size=3)
                ),
                supported_parameters=frozenset(draw(st.sets(st.sampled_from(PARAMS)))),
            )
        )
        if draw(st.booleans()):
            live[i] = EndpointLive(
                inflight=draw(st.integers(0, 5)),
                utilisation=draw(st.floats(0, 1.3)),
                circuit=draw(st.sampled_from(("closed", "closed", "half_open", "open"))),
                half_open_trial=draw(st.booleans()),
                latency_ms=draw(st.none() | st.floats(1, 5000)),
                throughput_tps=draw(st.none() | st.floats(1, 500)),
                requests=draw(st.integers(0, 100)),
            )
    return snapshot(*endpoints), live


names = st.sampled_from((*VENDORS, "acme/m1", "bolt/m2", "core/m3"))
providers = st.fixed_dictionaries(
    {},
    optional={
        "ignore": st.lists(names, max_size=3),
        "only": st.lists(names, max_size=4),
        "order": st.lists(names, max_size=3),
        "zdr": st.booleans(),
        "region": st.sampled_from(("eu", "us", ["eu", "us"])),
        "require_parameters": st.booleans(),
        "min_quality": st.floats(0, 1),
        "allow_fallbacks": st.booleans(),
        "sort": st.sampled_from(("price", "latency", "throughput", "quality")),
        "max_price": st.fixed_dictionaries(
            {}, optional={"prompt": st.integers(0, 12), "completion": st.integers(0, 12)}
        ),
    },
)


def _oracle(
    snap: Snapshot,
    policy: RoutePolicy,
    live: dict[int, EndpointLive],
    params: frozenset[str],
) -> set[int]:
    """The endpoints that pass every filter, checked one by one in plain Python."""
    tags = policy.models[0].tags
    allowed = set()
    for e in snap.endpoints:
        now = live.get(e.id, EndpointLive())

        def named(names: frozenset[str], e: EndpointView = e) -> bool:
            return e.vendor_slug in names or e.full_slug in names

        quality = sum(e.quality.get(t, e.quality.get("*", QUALITY_PRIOR)) for t in tags) / len(tags)
        m = surge_multiplier(e.surge_curve, now.utilisation, e.surge_cap)
        checks = [
            set(tags) <= e.tags,
            e.visible_to(ORG),
            e.kind == "chat",
            not named(policy.ignore),
            policy.only is None or named(policy.only),
            not policy.zero_retention or e.data_retention_days == 0,
            policy.regions is None or e.region in policy.regions,
            not policy.require_parameters or params <= e.supported_parameters,
            policy.min_quality is None or quality >= policy.min_quality,
            now.circuit == "closed" or (now.circuit == "half_open" and now.half_open_trial),
            now.inflight < e.capacity,
            policy.max_price_prompt is None or quote(e.price_input, m) <= policy.max_price_prompt,
            policy.max_price_completion is None
            or quote(e.price_output, m) <= policy.max_price_completion,
        ]
        if all(checks):
            allowed.add(e.id)
    return allowed


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    market=markets(),
    provider=providers,
    tags=st.sets(st.sampled_from(TAGS), min_size=1, max_size=2),
    params=st.sets(st.sampled_from(PARAMS)).map(frozenset),
    draw=st.floats(0, 1, exclude_max=True),
)
def test_it_never_returns_a_filtered_or_repeated_candidate(market, provider, tags, params, draw):
    snap, live = market
    policy = route_policy({"model": "tag:" + "+".join(sorted(tags)), "provider": provider})
    eligible = _oracle(snap, policy, live, params)

    try:
        decision = decide(snap, policy, live=live, draw=draw, params=params, max_candidates=None)
    except NotFound:
        assert not eligible
        return

    chosen = ids(decision)
    assert len(chosen) == len(set(chosen))
    assert set(chosen) <= eligible
    if policy.allow_fallbacks:
        assert set(chosen) == eligible
    else:
        assert len(chosen) == min(1, len(eligible))
    for e in snap.endpoints:
        if set(tags) <= e.tags and e.id not in eligible:
            assert decision.reason_for(e.id) is not None
