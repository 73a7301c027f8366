"""Cascade logic without I/O: confidence from logprobs, parsing the request, planning
tiers over the router's candidates, escalation and the trace.

Real models are in ``tests/e2e/test_cascade_models.py``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from routing.cascade import (
    CONFIDENCE_METHOD,
    DEFAULT_MAX_TIERS,
    DEFAULT_THRESHOLD,
    LOGPROB_FLOOR,
    CascadePolicy,
    CascadeTrace,
    confidence_from_logprobs,
    confidence_from_response,
    confidence_from_stream_chunks,
    parse_cascade,
    plan_tiers,
    should_escalate,
    strip_logprobs,
    upstream_body,
    without_cascade,
)
from routing.errors import BadRequest
from routing.policy import route_policy
from routing.router import Candidate, LiveView, plan_route
from routing.snapshot import DEFAULT_SUPPORTED_PARAMETERS, EndpointView, Snapshot

ORG = 1
USD = 1_000_000_000  # nano-USD


def tokens(*logprobs: float) -> list[dict[str, Any]]:
    return [{"token": f"t{i}", "logprob": lp, "top_logprobs": []} for i, lp in enumerate(logprobs)]


def completion(*logprobs: float) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "x"},
                "logprobs": {"content": tokens(*logprobs)},
                "finish_reason": "stop",
            }
        ],
    }


# --- confidence -----------------------------------------------------------------------------


def test_it_is_confident_when_every_token_is_likely():
    confidence = confidence_from_logprobs({"content": tokens(*[-0.01] * 12)})

    assert confidence == pytest.approx(math.exp(-0.01))  # 0.990
    assert not should_escalate(confidence, DEFAULT_THRESHOLD)


def test_it_is_unsure_when_every_token_is_unlikely():
    confidence = confidence_from_logprobs(tokens(*[-2.0] * 12))

    assert confidence == pytest.approx(math.exp(-2.0))  # 0.135
    assert should_escalate(confidence, DEFAULT_THRESHOLD)


def test_it_takes_the_geometric_mean_so_length_does_not_matter():
    short = confidence_from_logprobs(tokens(-0.1, -0.5))
    long = confidence_from_logprobs(tokens(*[-0.1, -0.5] * 20))

    assert short == pytest.approx(math.exp(-0.3))
    assert long == pytest.approx(short)


def test_it_floors_an_impossible_token_instead_of_zeroing_the_answer():
    confidence = confidence_from_logprobs(tokens(-math.inf, *[0.0] * 19))

    assert confidence == pytest.approx(math.exp(LOGPROB_FLOOR / 20))
    assert 0.0 < confidence < 1.0


@pytest.mark.parametrize(
    "logprobs",
    [
        None,
        {},
        {"content": None},
        {"content": []},
        [],
        [{"token": "a"}, {"token": "b", "logprob": None}, {"token": "c", "logprob": "x"}],
        "nonsense",
    ],
)
def test_it_has_no_confidence_without_logprobs(logprobs):
    assert confidence_from_logprobs(logprobs) is None


def test_it_reads_choice_zero_of_a_response():
    assert confidence_from_response(completion(-0.2, -0.2)) == pytest.approx(math.exp(-0.2))
    assert confidence_from_response({"choices": []}) is None
    assert confidence_from_response({"error": {"message": "boom"}}) is None


def test_it_reads_the_same_confidence_from_stream_chunks():
    logprobs = [-0.3, -1.2, -0.05, -0.7]
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}
    ]
    for i, lp in enumerate(logprobs):
        chunks.append(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": f"t{i}"},
                        "logprobs": {"content": tokens(lp)},
                    }
                ]
            }
        )
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"choices": [], "usage": {"completion_tokens": 4}})

    assert confidence_from_stream_chunks(chunks) == pytest.approx(
        confidence_from_logprobs(tokens(*logprobs))
    )
    assert confidence_from_stream_chunks(chunks[:1] + chunks[-2:]) is None


# --- escalation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("confidence", "threshold", "has_next", "escalate"),
    [
        (0.59, 0.6, True, True),
        (0.6, 0.6, True, False),  # at the threshold the answer is good enough
        (0.95, 0.6, True, False),
        (None, 0.6, True, True),  # cannot be judged: not trusted while a better tier exists
        (0.1, 0.6, False, False),  # the last tier's answer is served whatever it scores
        (None, 0.6, False, False),
        (0.99, 1.0, True, True),
        (0.0, 0.0, True, False),
    ],
)
def test_it_escalates_below_the_threshold_only_when_a_next_tier_exists(
    confidence, threshold, has_next, escalate
):
    assert should_escalate(confidence, threshold, has_next_tier=has_next) is escalate


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "tag:sql"}, None),
        ({"model": "tag:sql", "cascade": None}, None),
        ({"model": "tag:sql", "cascade": False}, None),
        ({"model": "tag:sql", "provider": {"sort": "price"}}, None),
        ({"model": "tag:sql", "provider": {"sort": "cascade"}}, CascadePolicy()),
        ({"model": "tag:sql", "cascade": True}, CascadePolicy()),
        ({"model": "tag:sql", "cascade": {}}, CascadePolicy(DEFAULT_THRESHOLD, DEFAULT_MAX_TIERS)),
        ({"model": "tag:sql", "cascade": {"threshold": 0.8}}, CascadePolicy(0.8, 2)),
        ({"model": "tag:sql", "cascade": {"threshold": 0, "max_tiers": 4}}, CascadePolicy(0.0, 4)),
        ({"model": "tag:sql", "cascade": {"threshold": 1, "max_tiers": 3}}, CascadePolicy(1.0, 3)),
        (
            {"model": "tag:sql", "provider": {"sort": "cascade"}, "cascade": {"max_tiers": 3}},
            CascadePolicy(DEFAULT_THRESHOLD, 3),
        ),
        ({"model": "tag:sql:floor", "cascade": True}, CascadePolicy()),
        ({"model": "tag:nitro", "cascade": True}, CascadePolicy()),  # a tag named nitro
        ({"model": "tag:sql", "cascade": True, "n": 1}, CascadePolicy()),
    ],
)
def test_it_parses_the_cascade_of_a_request(body, expected):
    assert parse_cascade(body) == expected


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"cascade": "yes"}, "cascade", "invalid_type"),
        ({"cascade": 1}, "cascade", "invalid_type"),
        ({"cascade": ["threshold"]}, "cascade", "invalid_type"),
        ({"cascade": {"threshold": "0.5"}}, "cascade.threshold", "invalid_type"),
        ({"cascade": {"threshold": True}}, "cascade.threshold", "invalid_type"),
        ({"cascade": {"threshold": 1.5}}, "cascade.threshold", "invalid_value"),
        ({"cascade": {"threshold": -0.1}}, "cascade.threshold", "invalid_value"),
        ({"cascade": {"threshold": math.nan}}, "cascade.threshold", "invalid_value"),
        ({"cascade": {"max_tiers": 1}}, "cascade.max_tiers", "invalid_value"),
        ({"cascade": {"max_tiers": 5}}, "cascade.max_tiers", "invalid_value"),
        ({"cascade": {"max_tiers": 2.0}}, "cascade.max_tiers", "invalid_type"),
        ({"cascade": {"max_tiers": False}}, "cascade.max_tiers", "invalid_type"),
        ({"cascade": {"tiers": 2}}, "cascade.tiers", "unknown_parameter"),
        ({"cascade": True, "provider": {"sort": "latency"}}, "provider.sort", "invalid_value"),
        ({"cascade": False, "provider": {"sort": "cascade"}}, "cascade", "invalid_value"),
        ({"model": "tag:sql:nitro", "cascade": True}, "model", "invalid_value"),
        ({"provider": {"sort": "cascade"}, "n": 2}, "n", "invalid_value"),
    ],
)
def test_it_refuses_a_malformed_or_contradictory_cascade(body, param, code):
    with pytest.raises(BadRequest) as raised:
        parse_cascade({"model": "tag:sql", **body})

    assert raised.value.param == param
    assert raised.value.code == code
    assert raised.value.status == 400


def test_it_hands_the_router_a_body_it_accepts():
    body = {
        "model": "tag:sql",
        "provider": {"sort": "cascade", "ignore": ["bad-vendor"]},
        "cascade": {"threshold": 0.7},
        "messages": [],
    }

    routed = without_cascade(body)

    assert routed == {
        "model": "tag:sql",
        "provider": {"sort": "price", "ignore": ["bad-vendor"]},
        "messages": [],
    }
    assert route_policy(routed).sort == "price"
    assert body["provider"]["sort"] == "cascade"  # the request itself is not changed


def test_it_asks_every_tier_for_logprobs_and_hides_them_when_not_wanted():
    sent = upstream_body({"model": "tag:sql", "cascade": True, "messages": [], "top_logprobs": 2})
    assert sent == {"model": "tag:sql", "messages": [], "top_logprobs": 2, "logprobs": True}

    answer = strip_logprobs(completion(-0.1))
    assert answer["choices"][0]["logprobs"] is None
    assert answer["choices"][0]["message"]["content"] == "x"


# --- tiers over the router's candidates ------------------------------------------------------


def view(endpoint_id: int, *, usd_in: float, usd_out: float, logprobs: bool = True) -> EndpointView:
    params = (
        DEFAULT_SUPPORTED_PARAMETERS
        if logprobs
        else DEFAULT_SUPPORTED_PARAMETERS
        - {
            "logprobs",
            "top_logprobs",
        }
    )
    return EndpointView(
        id=endpoint_id,
        vendor_id=100 + endpoint_id,
        vendor_slug=f"vendor{endpoint_id}",
        slug=f"model{endpoint_id}",
        kind="chat",
        base_url="http://127.0.0.1:9/v1",
        upstream_model="up",
        secret="",
        tags=frozenset({"sql"}),
        price_input=int(usd_in * USD),
        price_output=int(usd_out * USD),
        context_length=2048,
        capacity=4,
        surge_curve=((0.5, 1.0), (1.0, 2.0)),
        surge_cap=3.0,
        region="eu",
        data_retention_days=0,
        private_to=None,
        supported_parameters=params,
    )


def candidates(*views: EndpointView, body: dict[str, Any] | None = None) -> list[Candidate]:
    """The router's candidates for a cascaded request over these endpoints."""
    request = body or {"model": "tag:sql", "cascade": True}
    decision = plan_route(
        Snapshot.build(list(views)),
        route_policy(without_cascade(request)),
        organization_id=ORG,
        kind="chat",
        live=LiveView({}),
        explore_draw=0.99,
        max_candidates=None,
    )
    return list(decision.candidates)


def tier_ids(tiers) -> list[list[int]]:
    return [[c.endpoint.id for c in tier.candidates] for tier in tiers]


def test_it_orders_tiers_cheapest_first_by_quoted_input_plus_output_price():
    # 3: $0.50, 1: $3.00, 2: $1.50 (in + out per million); 4 is dearer than 1 by input only
    views = [
        view(1, usd_in=1, usd_out=2),
        view(2, usd_in=0.5, usd_out=1),
        view(3, usd_in=0.2, usd_out=0.3),
        view(4, usd_in=2.5, usd_out=1),
    ]

    tiers = plan_tiers(candidates(*views), max_tiers=4)

    assert tier_ids(tiers) == [[3], [2], [1], [4]]
    assert [t.final for t in tiers] == [False, False, False, True]
    assert [t.price for t in tiers] == [int(0.5 * USD), int(1.5 * USD), 3 * USD, int(3.5 * USD)]


def test_it_stops_at_max_tiers_and_keeps_dearer_endpoints_as_fallbacks_of_the_last():
    views = [view(i, usd_in=i, usd_out=i) for i in (1, 2, 3, 4)]

    tiers = plan_tiers(candidates(*views), max_tiers=2)

    assert tier_ids(tiers) == [[1], [2, 3, 4]]
    assert tiers[1].primary.endpoint.id == 2
    assert tiers[-1].final


def test_it_keeps_equally_priced_endpoints_in_one_tier_as_fallbacks():
    views = [
        view(1, usd_in=1, usd_out=1),
        view(2, usd_in=1, usd_out=1),
        view(3, usd_in=5, usd_out=5),
    ]

    tiers = plan_tiers(candidates(*views), max_tiers=3)

    assert len(tiers) == 2
    assert sorted(tier_ids(tiers)[0]) == [1, 2]
    assert tier_ids(tiers)[1] == [3]


def test_it_judges_only_with_logprobs_and_skips_a_cheap_level_without():
    views = [
        view(1, usd_in=0.1, usd_out=0.1, logprobs=False),
        view(2, usd_in=0.5, usd_out=0.5, logprobs=False),
        view(3, usd_in=0.5, usd_out=0.5),
        view(4, usd_in=2, usd_out=2, logprobs=False),
    ]

    tiers = plan_tiers(candidates(*views), max_tiers=3)

    # 1 cannot be judged (skipped); 2 cannot either, so only 3 serves its level;
    # the last tier needs no judgement.
    assert tier_ids(tiers) == [[3], [4]]


def test_it_makes_a_single_tier_when_there_is_nothing_dearer():
    tiers = plan_tiers(candidates(view(1, usd_in=1, usd_out=1)), max_tiers=3)

    assert tier_ids(tiers) == [[1]]
    assert tiers[0].final
    assert plan_tiers([], max_tiers=2) == ()


def test_it_plans_over_the_quoted_surged_price_not_the_base_price():
    from routing.router import EndpointLive

    views = [view(1, usd_in=1, usd_out=1), view(2, usd_in=1.5, usd_out=1.5)]
    decision = plan_route(
        Snapshot.build(views),
        route_policy({"model": "tag:sql", "provider": {"sort": "price"}}),
        organization_id=ORG,
        kind="chat",
        live=LiveView({1: EndpointLive(utilisation=1.0)}),  # 1 surges to 2x: $4 > $3
        explore_draw=0.99,
        max_candidates=None,
    )

    tiers = plan_tiers(decision.candidates, max_tiers=2)

    assert tier_ids(tiers) == [[2], [1]]


# --- the trace --------------------------------------------------------------------------------


def test_it_traces_an_escalation_then_the_served_tier():
    views = [view(i, usd_in=i, usd_out=i) for i in (1, 2, 3)]
    tiers = plan_tiers(candidates(*views), max_tiers=3)
    trace = CascadeTrace(CascadePolicy(threshold=0.6, max_tiers=3), tiers)

    assert trace.judge(tiers[0], tiers[0].primary.endpoint, 0.31) is True
    assert trace.judge(tiers[1], tiers[1].primary.endpoint, 0.72) is False

    assert trace.to_trace() == {
        "threshold": 0.6,
        "max_tiers": 3,
        "confidence_method": CONFIDENCE_METHOD,
        "served_tier": 1,
        "tiers": [
            {
                "tier": 0,
                "endpoint": "vendor1/model1",
                "endpoint_id": 1,
                "price": 2 * USD,
                "confidence": 0.31,
                "decision": "escalated",
            },
            {
                "tier": 1,
                "endpoint": "vendor2/model2",
                "endpoint_id": 2,
                "price": 4 * USD,
                "confidence": 0.72,
                "decision": "accepted",
            },
            {
                "tier": 2,
                "endpoint": "vendor3/model3",
                "endpoint_id": 3,
                "price": 6 * USD,
                "confidence": None,
                "decision": "not_reached",
            },
        ],
    }


def test_it_traces_a_failed_tier_and_serves_the_last_whatever_it_scores():
    views = [view(1, usd_in=1, usd_out=1), view(2, usd_in=2, usd_out=2)]
    tiers = plan_tiers(candidates(*views), max_tiers=2)
    trace = CascadeTrace(CascadePolicy(), tiers)

    trace.failed(tiers[0])
    assert trace.judge(tiers[1], tiers[1].primary.endpoint, 0.05) is False

    data = trace.to_trace()
    assert [row["decision"] for row in data["tiers"]] == ["failed", "final"]
    assert data["served_tier"] == 1


@pytest.mark.parametrize(
    ("code", "decision"), [("upstream_failed", "failed"), ("insufficient_credit", "refused")]
)
def test_it_traces_an_escalation_that_ended_and_the_unsure_answer_kept(code, decision):
    views = [view(i, usd_in=i, usd_out=i) for i in (1, 2, 3)]
    tiers = plan_tiers(candidates(*views), max_tiers=3)
    trace = CascadeTrace(CascadePolicy(threshold=0.6, max_tiers=3), tiers)

    assert trace.judge(tiers[0], tiers[0].primary.endpoint, 0.31) is True
    trace.failed(tiers[1])
    trace.fell_back(tiers[2], tiers[0], tiers[0].primary.endpoint, code)

    data = trace.to_trace()
    assert [(row["decision"], row["confidence"]) for row in data["tiers"]] == [
        ("kept", 0.31),
        ("failed", None),
        (decision, None),
    ]
    assert data["served_tier"] == 0 and data["kept_because"] == code
    assert "kept_because" not in CascadeTrace(CascadePolicy(), tiers).to_trace()
