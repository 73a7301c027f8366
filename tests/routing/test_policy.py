"""Parsing and merging of routing policies: ``model``/``models`` and the ``provider`` object."""

from __future__ import annotations

import pytest

from routing.errors import BadRequest
from routing.policy import (
    MaxPrice,
    ModelSpec,
    ProviderPolicy,
    RoutePolicy,
    merge_provider,
    parse_provider,
    request_parameters,
    route_policy,
)

USD = 1_000_000_000  # nanos


# --- model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "spec", "variant", "sort"),
    [
        (
            "acme/sql-7b",
            ModelSpec(kind="slug", text="acme/sql-7b", slug="acme/sql-7b"),
            None,
            "balanced",
        ),
        (
            "acme/sql-7b@3",
            ModelSpec(kind="slug", text="acme/sql-7b@3", slug="acme/sql-7b", version=3),
            None,
            "balanced",
        ),
        ("tag:sql", ModelSpec(kind="tags", text="tag:sql", tags=("sql",)), None, "balanced"),
        (
            "tag:sql+legal",
            ModelSpec(kind="tags", text="tag:sql+legal", tags=("sql", "legal")),
            None,
            "balanced",
        ),
        ("tag:sql:floor", ModelSpec(kind="tags", text="tag:sql", tags=("sql",)), "floor", "price"),
        (
            "acme/sql-7b:nitro",
            ModelSpec(kind="slug", text="acme/sql-7b", slug="acme/sql-7b"),
            "nitro",
            "throughput",
        ),
        ("auto", ModelSpec(kind="auto", text="auto"), None, "balanced"),
        (" tag:sql ", ModelSpec(kind="tags", text="tag:sql", tags=("sql",)), None, "balanced"),
    ],
)
def test_it_parses_the_model(model, spec, variant, sort):
    policy = route_policy({"model": model})

    assert policy.models == (spec,)
    assert (policy.variant, policy.sort) == (variant, sort)
    assert policy.auto is (spec.kind == "auto")


def test_it_lists_models_after_the_model_without_repeating_them():
    policy = route_policy({"model": "tag:sql", "models": ["acme/a", "tag:sql", "tag:legal"]})

    assert [s.text for s in policy.models] == ["tag:sql", "acme/a", "tag:legal"]


def test_it_accepts_models_without_model():
    policy = route_policy({"models": ["acme/a", "acme/b@2"]})

    assert [s.text for s in policy.models] == ["acme/a", "acme/b@2"]


def test_it_replaces_auto_with_the_tags_a_classifier_chose():
    policy = route_policy({"model": "auto:floor"})

    chosen = policy.with_auto_tags("sql", "legal")

    assert policy.auto and not chosen.auto
    assert chosen.models == (ModelSpec(kind="tags", text="tag:sql+legal", tags=("sql", "legal")),)
    assert chosen.sort == "price"


# --- provider ------------------------------------------------------------------------------


def test_it_parses_every_provider_field():
    policy = route_policy(
        {
            "model": "tag:sql",
            "provider": {
                "order": ["acme", "bolt/sql", "acme"],
                "only": ["acme", "bolt"],
                "ignore": ["core"],
                "allow_fallbacks": False,
                "sort": "latency",
                "max_price": {"prompt": 0.25, "completion": "1.5"},
                "data_collection": "allow",
                "zdr": False,
                "region": ["EU", "us"],
                "require_parameters": True,
                "min_quality": 0.7,
            },
        }
    )

    assert policy == RoutePolicy(
        models=(ModelSpec(kind="tags", text="tag:sql", tags=("sql",)),),
        sort="latency",
        order=("acme", "bolt/sql"),
        only=frozenset({"acme", "bolt"}),
        ignore=frozenset({"core"}),
        allow_fallbacks=False,
        max_price_prompt=250_000_000,
        max_price_completion=1_500_000_000,
        zero_retention=False,
        regions=frozenset({"eu", "us"}),
        require_parameters=True,
        min_quality=0.7,
    )


@pytest.mark.parametrize(
    ("provider", "zero_retention"),
    [({}, False), ({"zdr": True}, True), ({"data_collection": "deny"}, True)],
)
def test_it_asks_for_zero_retention_with_deny_or_zdr(provider, zero_retention):
    policy = route_policy({"model": "tag:sql", "provider": provider})

    assert policy.zero_retention is zero_retention


def test_it_defaults_to_a_balanced_policy_with_fallbacks():
    policy = route_policy({"model": "tag:sql"})

    assert (policy.sort, policy.allow_fallbacks, policy.order, policy.only) == (
        "balanced",
        True,
        (),
        None,
    )
    assert policy.max_price_prompt is policy.max_price_completion is None


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "model", "missing_model"),
        ({"model": 42}, "model", "invalid_type"),
        ({"model": "  "}, "model", "invalid_type"),
        ({"model": "tag:"}, "model", "invalid_value"),
        ({"model": "tag:sql+"}, "model", "invalid_value"),
        ({"model": "tag:s q l"}, "model", "invalid_value"),
        ({"model": "tag:" + "+".join(f"t{i}" for i in range(9))}, "model", "invalid_value"),
        ({"model": "acme/a@"}, "model", "invalid_value"),
        ({"model": "acme/a@0"}, "model", "invalid_value"),
        ({"model": "acme/a@v2"}, "model", "invalid_value"),
        ({"models": "acme/a"}, "models", "invalid_type"),
        ({"models": []}, "models", "invalid_type"),
        ({"models": ["acme/a", 7]}, "models[1]", "invalid_type"),
        ({"models": ["acme/a:floor"]}, "models[0]", "invalid_value"),
        ({"models": ["auto"]}, "models[0]", "invalid_value"),
        ({"model": "auto", "models": ["acme/a"]}, "models", "invalid_value"),
        ({"models": [f"acme/m{i}" for i in range(9)]}, "models", "invalid_value"),
        ({"model": "m", "provider": "cheap"}, "provider", "invalid_type"),
        ({"model": "m", "provider": {"fastest": True}}, "provider.fastest", "unknown_parameter"),
        ({"model": "m", "provider": {"order": "acme"}}, "provider.order", "invalid_type"),
        ({"model": "m", "provider": {"only": [1]}}, "provider.only", "invalid_type"),
        ({"model": "m", "provider": {"ignore": [""]}}, "provider.ignore", "invalid_type"),
        ({"model": "m", "provider": {"ignore": ["a"] * 65}}, "provider.ignore", "invalid_value"),
        (
            {"model": "m", "provider": {"allow_fallbacks": "no"}},
            "provider.allow_fallbacks",
            "invalid_type",
        ),
        (
            {"model": "m", "provider": {"allow_fallbacks": 0}},
            "provider.allow_fallbacks",
            "invalid_type",
        ),
        ({"model": "m", "provider": {"sort": "cheapest"}}, "provider.sort", "invalid_value"),
        # Found by schemathesis: unhashable values were a 500 (TypeError), not a 400.
        ({"model": "m", "provider": {"sort": {"by": "price"}}}, "provider.sort", "invalid_value"),
        ({"model": "m", "provider": {"sort": ["price"]}}, "provider.sort", "invalid_value"),
        (
            {"model": "m", "provider": {"data_collection": ["deny"]}},
            "provider.data_collection",
            "invalid_value",
        ),
        ({"model": "m:floor", "provider": {"sort": "latency"}}, "provider.sort", "invalid_value"),
        ({"model": "m", "provider": {"max_price": 1}}, "provider.max_price", "invalid_type"),
        (
            {"model": "m", "provider": {"max_price": {"image": 1}}},
            "provider.max_price.image",
            "unknown_parameter",
        ),
        (
            {"model": "m", "provider": {"max_price": {"prompt": -1}}},
            "provider.max_price.prompt",
            "invalid_value",
        ),
        (
            {"model": "m", "provider": {"max_price": {"prompt": "NaN"}}},
            "provider.max_price.prompt",
            "invalid_value",
        ),
        (
            {"model": "m", "provider": {"max_price": {"completion": "Infinity"}}},
            "provider.max_price.completion",
            "invalid_value",
        ),
        (
            {"model": "m", "provider": {"max_price": {"completion": "cheap"}}},
            "provider.max_price.completion",
            "invalid_value",
        ),
        (
            {"model": "m", "provider": {"max_price": {"prompt": "0.0000000001"}}},
            "provider.max_price.prompt",
            "invalid_value",
        ),
        (
            {"model": "m", "provider": {"max_price": {"prompt": True}}},
            "provider.max_price.prompt",
            "invalid_type",
        ),
        (
            {"model": "m", "provider": {"max_price": {"prompt": [1]}}},
            "provider.max_price.prompt",
            "invalid_type",
        ),
        (
            {"model": "m", "provider": {"data_collection": "never"}},
            "provider.data_collection",
            "invalid_value",
        ),
        ({"model": "m", "provider": {"zdr": "yes"}}, "provider.zdr", "invalid_type"),
        ({"model": "m", "provider": {"region": 3}}, "provider.region", "invalid_type"),
        ({"model": "m", "provider": {"region": ["eu", None]}}, "provider.region", "invalid_type"),
        (
            {"model": "m", "provider": {"require_parameters": 1}},
            "provider.require_parameters",
            "invalid_type",
        ),
        ({"model": "m", "provider": {"min_quality": 1.5}}, "provider.min_quality", "invalid_value"),
        (
            {"model": "m", "provider": {"min_quality": -0.1}},
            "provider.min_quality",
            "invalid_value",
        ),
        (
            {"model": "m", "provider": {"min_quality": "high"}},
            "provider.min_quality",
            "invalid_type",
        ),
        ({"model": "m", "provider": {"min_quality": True}}, "provider.min_quality", "invalid_type"),
        # Beyond what a 64-bit amount holds (it broke the trace after the vendor was called),
        # and exponents whose integer takes seconds to build.
        (
            {"model": "m", "provider": {"max_price": {"prompt": "100000000000"}}},
            "provider.max_price.prompt",
            "invalid_value",
        ),
        (
            {"model": "m", "provider": {"max_price": {"completion": "1e330000"}}},
            "provider.max_price.completion",
            "invalid_value",
        ),
        (
            {"model": "m", "provider": {"max_price": {"prompt": 10**23}}},
            "provider.max_price.prompt",
            "invalid_value",
        ),
        (
            {"model": "m", "provider": {"ignore": ["acme\u0000x"]}},
            "provider.ignore",
            "invalid_value",
        ),
        ({"model": "m", "provider": {"only": ["\ud800"]}}, "provider.only", "invalid_value"),
    ],
)
def test_it_refuses_a_bad_policy_naming_the_parameter(body, param, code):
    with pytest.raises(BadRequest) as caught:
        route_policy(body)

    assert (caught.value.param, caught.value.code) == (param, code)
    assert caught.value.status == 400
    assert caught.value.message


def test_vendor_and_endpoint_names_are_matched_as_the_lowercase_slugs_they_are():
    provider = parse_provider(
        {"ignore": ["ACME"], "only": ["Acme/SQL-Coder", " beta "], "order": ["BETA"]},
        param="provider",
    )
    assert provider.ignore == frozenset({"acme"})
    assert provider.only == frozenset({"acme/sql-coder", "beta"})
    assert provider.order == ("beta",)


def test_it_names_the_unknown_provider_key_and_the_known_ones():
    with pytest.raises(BadRequest) as caught:
        route_policy({"model": "m", "provider": {"quantizations": ["int4"]}})

    assert "`provider.quantizations`" in caught.value.message
    assert "allow_fallbacks" in caught.value.message


@pytest.mark.parametrize(
    ("amount", "nanos"),
    [(0, 0), (2, 2 * USD), (0.5, USD // 2), ("0.000001", 1_000), ("12", 12 * USD), (1e-05, 10_000)],
)
def test_it_converts_max_price_to_nanos_per_million(amount, nanos):
    policy = route_policy({"model": "m", "provider": {"max_price": {"prompt": amount}}})

    assert policy.max_price_prompt == nanos
    assert policy.max_price_completion is None


# --- organisation defaults -----------------------------------------------------------------


def test_it_merges_the_organisation_defaults_under_the_request():
    default = parse_provider(
        {
            "order": ["acme"],
            "only": ["acme", "bolt", "core"],
            "ignore": ["shady"],
            "allow_fallbacks": False,
            "sort": "price",
            "max_price": {"prompt": 1, "completion": 2},
            "region": ["eu", "us"],
            "require_parameters": True,
            "min_quality": 0.5,
        },
        param="organization.provider",
    )

    policy = route_policy(
        {
            "model": "tag:sql",
            "provider": {
                "order": ["bolt"],
                "only": ["bolt", "core", "extra"],
                "ignore": ["core"],
                "sort": "latency",
                "max_price": {"prompt": 3},
                "region": "us",
                "min_quality": 0.2,
            },
        },
        organization_default=default,
    )

    assert policy.order == ("bolt",)  # the request wins
    assert policy.sort == "latency"
    assert policy.min_quality == 0.2
    assert policy.only == frozenset({"bolt", "core"})  # allow-lists intersect
    assert policy.regions == frozenset({"us"})
    assert policy.ignore == frozenset({"shady", "core"})  # deny-lists add up
    assert (policy.max_price_prompt, policy.max_price_completion) == (3 * USD, 2 * USD)
    assert policy.allow_fallbacks is False  # unsaid in the request: the default holds
    assert policy.require_parameters is True


def test_it_keeps_the_organisations_privacy_demands():
    default = parse_provider({"data_collection": "deny"})

    policy = route_policy(
        {"model": "tag:sql", "provider": {"data_collection": "allow", "zdr": False}},
        organization_default=default,
    )

    assert policy.zero_retention is True


def test_it_lets_a_variant_override_the_organisations_sort():
    default = parse_provider({"sort": "quality"})

    assert route_policy({"model": "tag:sql:nitro"}, organization_default=default).sort == (
        "throughput"
    )
    assert route_policy({"model": "tag:sql"}, organization_default=default).sort == "quality"


def test_it_reports_the_organisation_parameter_in_its_errors():
    with pytest.raises(BadRequest) as caught:
        parse_provider({"sort": "random"}, param="organization.provider")

    assert caught.value.param == "organization.provider.sort"


def test_it_merges_nothing_when_there_is_no_default():
    request = ProviderPolicy(ignore=frozenset({"a"}), max_price=MaxPrice(prompt=1))

    assert merge_provider(None, request) is request


# --- request parameters --------------------------------------------------------------------


def test_it_lists_the_request_parameters_that_routing_checks():
    body = {
        "model": "m",
        "messages": [],
        "temperature": 0.2,
        "logprobs": True,
        "tools": [{"type": "function"}],
        "seed": None,
        "user": "u-1",
        "max_completion_tokens": 64,
    }

    assert request_parameters(body) == frozenset({"temperature", "logprobs", "tools", "max_tokens"})
