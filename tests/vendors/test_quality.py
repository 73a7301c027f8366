"""Quality scores: golden sets and their rules, the shrinkage blend, customer feedback,
observed success rates, and golden-set probes against real HTTP servers."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from marketplace import invalidation
from marketplace.celery import app as celery_app
from marketplace.redis_client import sync_client
from tests import factories
from vendors import quality, selectors, tasks
from vendors.models import EndpointQuality, Feedback, ProbeResult
from vendors.quality import (
    K_FEEDBACK,
    K_PROBE,
    K_SUCCESS,
    OVERALL,
    PRIOR,
    W_FEEDBACK,
    W_PROBE,
    Evidence,
    GoldenSetError,
    answer_passes,
    blended_score,
    load_golden_set,
)
from vendors.services import (
    FeedbackError,
    VendorError,
    endpoint_probe_quality,
    feedback_record,
    quality_observe,
    quality_observe_many,
    quality_recompute,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def echo_golden(settings, tmp_path):  # type: ignore[no-untyped-def]
    """Golden sets the echoing fault upstream passes ("echo-good") and fails ("echo-bad").

    The upstream answers with the words of the last user message, so an item passes
    exactly when its expected text is in its own prompt.
    """
    good = [
        {"id": f"good-{i}", "prompt": f"please say {word}", "rule": "contains", "expected": word}
        for i, word in enumerate(["alpha", "bravo", "charlie"])
    ]
    bad = [
        {"id": f"bad-{i}", "prompt": f"please say {word}", "rule": "exact", "expected": "zulu"}
        for i, word in enumerate(["delta", "echo", "foxtrot"])
    ]
    (tmp_path / "echo-good.json").write_text(json.dumps({"items": good}))
    (tmp_path / "echo-bad.json").write_text(json.dumps({"items": bad}))
    settings.VENDORS_GOLDEN_DIR = str(tmp_path)
    return tmp_path


@pytest.fixture
def celery_eager() -> Iterator[None]:
    """Run fanned-out tasks inline, as a worker would, in this process."""
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    try:
        yield
    finally:
        celery_app.conf.task_always_eager = False
        celery_app.conf.task_eager_propagates = False


def _scores(endpoint) -> dict[str, EndpointQuality]:  # type: ignore[no-untyped-def]
    return {row.tag: row for row in EndpointQuality.objects.filter(endpoint=endpoint)}


# --------------------------------------------------------------------------- golden sets


@pytest.mark.parametrize("tag", ["general", "sql", "intent-classification", "finance", "legal"])
def test_it_ships_a_golden_set_of_five_to_ten_items_per_core_tag(tag):
    # given the golden sets shipped with the code
    # when one is loaded
    items = load_golden_set(tag)

    # then it has 5-10 valid items, none of which an echo of its own prompt would pass
    assert 5 <= len(items) <= 10
    assert len({item.id for item in items}) == len(items)
    for item in items:
        assert item.rule in quality.RULES
        assert not item.passes(item.prompt), f"{tag}/{item.id} passes by echoing its prompt"


def test_it_scores_exact_answers_ignoring_case_quotes_and_a_final_full_stop():
    assert answer_passes("exact", ("Paris",), '  "paris." ')
    assert answer_passes("exact", ("paris",), "PARIS")
    assert not answer_passes("exact", ("paris",), "Paris, France")


def test_it_scores_contains_any_of_and_regex_rules_case_insensitively():
    assert answer_passes("contains", ("return on investment",), "ROI: Return  on\nInvestment")
    assert not answer_passes("contains", ("jupiter",), "Saturn")
    assert answer_passes("any-of", ("plaintiff", "claimant"), "The Claimant.")
    assert not answer_passes("any-of", ("plaintiff", "claimant"), "the defendant")
    assert answer_passes(
        "regex", (r"select\s+\*\s+from\s+customers",), "```sql\nSELECT * FROM customers;```"
    )
    assert not answer_passes("regex", (r"\b5\b",), "15")


def test_it_fails_a_classification_answer_that_lists_every_label():
    # given an intent item whose rule wants the right label and none of the others
    item = next(i for i in load_golden_set("intent-classification") if i.id == "double-charge")

    # then the right label passes, and hedging over all labels does not
    assert item.passes("Billing")
    assert item.passes("The intent is: billing.")
    assert not item.passes("billing, technical, cancellation, sales")
    assert not item.passes("technical")


def test_it_refuses_a_golden_set_with_an_unknown_rule_or_a_broken_regex(settings, tmp_path):
    # given golden files with mistakes
    settings.VENDORS_GOLDEN_DIR = str(tmp_path)
    (tmp_path / "bad-rule.json").write_text(
        json.dumps([{"id": "a", "prompt": "p", "rule": "fuzzy", "expected": "x"}])
    )
    (tmp_path / "bad-regex.json").write_text(
        json.dumps([{"id": "a", "prompt": "p", "rule": "regex", "expected": "(unclosed"}])
    )

    # when they are loaded, then the error names the file and the problem
    with pytest.raises(GoldenSetError, match=r"bad-rule\.json item 'a'.*'rule'"):
        load_golden_set("bad-rule")
    with pytest.raises(GoldenSetError, match="bad regex"):
        load_golden_set("bad-regex")
    assert load_golden_set("no-such-tag") == ()


# --------------------------------------------------------------------------- the blend


def test_it_scores_the_prior_without_evidence():
    assert blended_score(Evidence()) == PRIOR


def test_it_keeps_a_few_samples_near_the_prior():
    # given one passed probe item, or two perfect ratings, or three successful requests
    one_probe = blended_score(Evidence(probe_pass=1, probe_n=1))
    two_ratings = blended_score(Evidence(feedback_sum=2.0, feedback_n=2))
    three_requests = blended_score(Evidence(success_n=3, total_n=3))

    # then each score moved only part of the way from 0.5 towards 1.0
    assert one_probe == pytest.approx((1 + K_PROBE * PRIOR) / (1 + K_PROBE))
    assert two_ratings == pytest.approx((2 + K_FEEDBACK * PRIOR) / (2 + K_FEEDBACK))
    assert three_requests == pytest.approx((3 + K_SUCCESS * PRIOR) / (3 + K_SUCCESS))
    assert all(0.5 < score < 0.6 for score in (one_probe, two_ratings, three_requests))


def test_it_approaches_the_observed_mean_with_many_samples():
    # given a lot of evidence that 80 % of the answers are good
    score = blended_score(
        Evidence(
            probe_pass=800,
            probe_n=1000,
            feedback_sum=800,
            feedback_n=1000,
            success_n=8000,
            total_n=10000,
        )
    )

    # then the score is close to 0.8
    assert score == pytest.approx(0.8, abs=0.01)


def test_it_renormalises_the_weights_over_the_sources_that_have_data():
    # given probes and feedback but no observed traffic
    evidence = Evidence(probe_pass=4, probe_n=5, feedback_sum=1.0, feedback_n=10)

    # then the success weight is left out rather than counted as the prior
    probe = (4 + K_PROBE * PRIOR) / (5 + K_PROBE)
    feedback = (1.0 + K_FEEDBACK * PRIOR) / (10 + K_FEEDBACK)
    expected = (W_PROBE * probe + W_FEEDBACK * feedback) / (W_PROBE + W_FEEDBACK)
    assert blended_score(evidence) == pytest.approx(expected)


def test_it_decays_success_counters_keeping_their_ratio():
    assert quality.decayed_counters(90, 100) == (90, 100)
    assert quality.decayed_counters(9_000, 10_000, memory=5_000) == (4_500, 5_000)


# --------------------------------------------------------------------------- feedback


def test_it_records_feedback_once_per_request_and_updates_it_when_repeated():
    # given a customer and an endpoint
    org = factories.organization(credit_usd=None)
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1", tags=("sql",))

    # when the same request is rated twice
    first = feedback_record(
        organization=org, request_id="req-1", endpoint=endpoint, tags=["sql"], score=0.2
    )
    second = feedback_record(
        organization=org,
        request_id="req-1",
        endpoint=endpoint,
        tags=["sql"],
        score=1.0,
        comment="better on a second look",
    )

    # then there is one row with the latest score, counted once in the quality evidence
    assert first.pk == second.pk
    assert Feedback.objects.filter(organization=org).count() == 1
    second.refresh_from_db()
    assert (second.score, second.comment) == (1.0, "better on a second look")
    rows = _scores(endpoint)
    assert (rows["sql"].feedback_n, rows["sql"].feedback_sum) == (1, 1.0)
    assert (rows[OVERALL].feedback_n, rows[OVERALL].feedback_sum) == (1, 1.0)


def test_it_keeps_the_same_request_id_of_two_organisations_apart():
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    for org in (factories.organization(credit_usd=None), factories.organization(credit_usd=None)):
        feedback_record(organization=org, request_id="req-1", endpoint=endpoint, tags=[], score=1)
    assert Feedback.objects.filter(request_id="req-1").count() == 2
    assert _scores(endpoint)[OVERALL].feedback_n == 2


@pytest.mark.parametrize(
    ("score", "tags", "message"),
    [
        (1.5, [], "between 0 and 1"),
        (-0.1, [], "between 0 and 1"),
        (math.nan, [], "number between 0 and 1"),
        (True, [], "number between 0 and 1"),
        ("0.5", [], "number between 0 and 1"),
        (0.5, ["Not A Tag!"], "not a capability tag"),
        (0.5, ["*"], "not a capability tag"),
    ],
)
def test_it_refuses_invalid_feedback_and_stores_nothing(score, tags, message):
    org = factories.organization(credit_usd=None)
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1")

    with pytest.raises(FeedbackError, match=message):
        feedback_record(
            organization=org, request_id="req-1", endpoint=endpoint, tags=tags, score=score
        )

    assert not Feedback.objects.exists()


def test_it_moves_the_feedback_score_towards_the_ratings_as_they_accumulate():
    # given an endpoint rated 0.9 by many requests
    org = factories.organization(credit_usd=None)
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1", tags=("legal",))
    for n in range(1, 41):
        feedback_record(
            organization=org, request_id=f"r{n}", endpoint=endpoint, tags=["legal"], score=0.9
        )
        if n == 2:
            after_two = _scores(endpoint)["legal"].score

    # then two ratings barely move it, forty bring it close to 0.9
    after_forty = _scores(endpoint)["legal"].score
    assert 0.5 < after_two < 0.6
    assert after_forty == pytest.approx((40 * 0.9 + K_FEEDBACK * PRIOR) / (40 + K_FEEDBACK))
    assert after_forty > 0.8


def test_it_forgets_feedback_older_than_the_window():
    # given a rating from long ago
    org = factories.organization(credit_usd=None)
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    feedback_record(organization=org, request_id="old", endpoint=endpoint, tags=[], score=0.0)
    Feedback.objects.update(created_at=timezone.now() - quality.FEEDBACK_WINDOW - timedelta(1))

    # when the scores are recomputed
    scores = quality_recompute(endpoint)

    # then it no longer counts
    assert scores[OVERALL] == PRIOR
    assert _scores(endpoint)[OVERALL].feedback_n == 0


# --------------------------------------------------------------------------- observed


def test_it_accumulates_observed_successes_per_tag_and_overall():
    # given an endpoint serving sql requests
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1", tags=("sql",))

    # when usage ingest reports two batches
    quality_observe(endpoint.pk, "sql", 9, 10)
    quality_observe(endpoint.pk, None, 5, 10)

    # then the tag counts its batch, the overall counts both
    rows = _scores(endpoint)
    assert (rows["sql"].success_n, rows["sql"].total_n) == (9, 10)
    assert (rows[OVERALL].success_n, rows[OVERALL].total_n) == (14, 20)
    assert rows["sql"].score == pytest.approx((9 + K_SUCCESS * PRIOR) / (10 + K_SUCCESS))


def test_one_batch_call_counts_every_endpoint_and_tag_like_separate_calls():
    # given two endpoints, and a third that was deleted
    sql = factories.endpoint(base_url="http://127.0.0.1:9/v1", tags=("sql",))
    plain = factories.endpoint(base_url="http://127.0.0.1:9/v1")

    # when one ingest batch reports them all at once
    quality_observe_many(
        [(sql.pk, "sql", 9, 10), (sql.pk, None, 5, 10), (plain.pk, None, 1, 4), (10**9, None, 1, 1)]
    )

    # then each row counts exactly its share, and nothing exists for the deleted endpoint
    assert (_scores(sql)["sql"].success_n, _scores(sql)["sql"].total_n) == (9, 10)
    assert (_scores(sql)[OVERALL].success_n, _scores(sql)[OVERALL].total_n) == (14, 20)
    assert (_scores(plain)[OVERALL].success_n, _scores(plain)[OVERALL].total_n) == (1, 4)
    assert set(EndpointQuality.objects.values_list("endpoint_id", flat=True)) == {sql.pk, plain.pk}


def test_it_lets_a_large_volume_of_failures_pull_the_score_down():
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    for _ in range(10):
        quality_observe(endpoint.pk, None, 100, 1000)
    assert _scores(endpoint)[OVERALL].score == pytest.approx(0.1, abs=0.02)


def test_it_refuses_impossible_observations_and_ignores_empty_ones():
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(VendorError):
        quality_observe(endpoint.pk, None, 11, 10)
    with pytest.raises(VendorError):
        quality_observe(endpoint.pk, None, -1, 10)
    quality_observe(endpoint.pk, None, 0, 0)
    quality_observe(10**9, None, 1, 1)  # a deleted endpoint: nothing to count
    assert not EndpointQuality.objects.exists()


def _next_message(listener) -> bytes | None:  # type: ignore[no-untyped-def]
    # get_message answers None for the (ignored) subscribe confirmation: ask a few times.
    for _ in range(10):
        message = listener.get_message(timeout=0.5)
        if message is not None:
            return message["data"]
    return None


def test_it_publishes_a_quality_invalidation_only_when_a_score_moves_materially(
    django_capture_on_commit_callbacks,
):
    # given a gateway replica listening for invalidations
    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    listener = sync_client().pubsub(ignore_subscribe_messages=True)
    listener.subscribe(invalidation.CHANNEL)
    try:
        # when a batch moves the score a lot, then a small batch hardly moves it
        with django_capture_on_commit_callbacks(execute=True) as material:
            quality_observe(endpoint.pk, None, 0, 100)
        with django_capture_on_commit_callbacks(execute=True) as immaterial:
            quality_observe(endpoint.pk, None, 1, 1)

        # then only the first published "quality" (gateways reload in the background)
        assert len(material) == 1
        assert immaterial == []
        assert _next_message(listener) == invalidation.QUALITY.encode()
    finally:
        listener.close()


def test_it_maps_scores_per_endpoint_and_tag_for_the_routing_snapshot():
    # given one endpoint with evidence and one without
    rated = factories.endpoint(base_url="http://127.0.0.1:9/v1", tags=("sql",))
    unrated = factories.endpoint(base_url="http://127.0.0.1:9/v1")
    quality_observe(rated.pk, "sql", 100, 100)

    # when the snapshot loader asks for both
    scores = selectors.quality_map([rated.pk, unrated.pk])

    # then the rated one has its tag and overall score, the other none (the prior applies)
    assert set(scores[rated.pk]) == {"sql", OVERALL}
    assert scores[rated.pk]["sql"] > 0.7
    assert scores[unrated.pk] == {}


# --------------------------------------------------------------------------- probes


def test_it_probes_an_endpoint_with_its_golden_sets_and_moves_its_scores(upstream, echo_golden):
    # given an endpoint tagged with a set the echo passes and a set it fails
    endpoint = factories.endpoint(
        base_url=upstream.base_url, upstream_model="fake-small", tags=("echo-good", "echo-bad")
    )

    # when the quality probe task runs
    sent = tasks.quality_probe_endpoint(endpoint.pk)

    # then every item was asked at temperature 0 and recorded with its outcome
    assert sent == 6
    results = ProbeResult.objects.filter(endpoint=endpoint)
    assert {(r.tag, r.passed) for r in results} == {("echo-good", True), ("echo-bad", False)}
    assert all(r.error == "" and r.latency_ms is not None for r in results)
    request = upstream.last_request("/v1/chat/completions")
    assert request["body"]["temperature"] == 0
    assert request["body"]["max_tokens"] == quality.DEFAULT_PROBE_MAX_TOKENS

    # and the scores moved away from the prior in opposite directions
    rows = _scores(endpoint)
    assert rows["echo-good"].score == pytest.approx((3 + K_PROBE * PRIOR) / (3 + K_PROBE))
    assert rows["echo-bad"].score == pytest.approx((0 + K_PROBE * PRIOR) / (3 + K_PROBE))
    assert (rows[OVERALL].probe_pass, rows[OVERALL].probe_n) == (3.0, 6)
    assert rows[OVERALL].score == pytest.approx(PRIOR)


def test_it_counts_a_repeated_probe_as_the_same_evidence(upstream, echo_golden):
    # given an endpoint probed twice with the same deterministic items
    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("echo-good",))
    endpoint_probe_quality(endpoint=endpoint)
    endpoint_probe_quality(endpoint=endpoint)

    # then the items are counted once each, not once per run
    assert ProbeResult.objects.filter(endpoint=endpoint).count() == 6
    assert _scores(endpoint)["echo-good"].probe_n == 3


def test_it_records_a_probe_error_without_counting_it_against_quality(upstream, echo_golden):
    # given an upstream whose first answer is an HTTP 500
    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("echo-good",))
    upstream.script(["status:500"])

    # when the endpoint is probed
    endpoint_probe_quality(endpoint=endpoint, tags=["echo-good"])

    # then the failed item carries the error, and only the two answers count
    errored = ProbeResult.objects.get(endpoint=endpoint, item_id="good-0")
    assert not errored.passed
    assert errored.error.startswith("HTTP 500: Injected upstream fault")
    assert _scores(endpoint)["echo-good"].probe_n == 2


def test_it_stops_probing_an_unreachable_endpoint_after_the_first_item(echo_golden):
    from marketplace.devenv import free_port

    endpoint = factories.endpoint(
        base_url=f"http://127.0.0.1:{free_port()}/v1", tags=("echo-good", "echo-bad")
    )

    results = endpoint_probe_quality(endpoint=endpoint)

    assert len(results) == 1
    assert results[0].error.startswith("could not reach")
    assert _scores(endpoint)[OVERALL].probe_n == 0


def test_it_refuses_to_probe_a_url_on_an_address_that_is_not_allowed(
    settings, upstream, echo_golden
):
    # given an endpoint registered while loopback was allowed, and then no longer
    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("echo-good",))
    settings.OUTBOUND_ALLOWED_NETWORKS = []

    # when it is probed
    results = endpoint_probe_quality(endpoint=endpoint)

    # then nothing was sent and the refusal is recorded
    assert [r.error[:18] for r in results] == ["the URL is refused"]
    assert upstream.stats()["total"] == 0


def test_it_fans_quality_probes_out_over_approved_chat_endpoints(
    upstream, echo_golden, celery_eager
):
    # given an approved chat endpoint, a pending one and an embeddings endpoint
    approved = factories.endpoint(base_url=upstream.base_url, tags=("echo-good",))
    pending = factories.endpoint(base_url=upstream.base_url, tags=("echo-good",), approved=False)
    embeddings = factories.endpoint(base_url=upstream.base_url, kind="embeddings")

    # when the hourly fan-out runs
    queued = tasks.quality_probe_all()

    # then only the approved chat endpoint was probed
    assert queued == 1
    assert ProbeResult.objects.filter(endpoint=approved).count() == 3
    assert not ProbeResult.objects.filter(endpoint__in=[pending, embeddings]).exists()


@pytest.mark.slm
def test_it_probes_a_real_small_model_with_the_shipped_general_set(smollm2):
    # given the real SmolLM2 server registered as an endpoint
    endpoint = factories.endpoint(base_url=smollm2.base_url, upstream_model=smollm2.model)

    # when it is probed with the shipped golden sets
    results = endpoint_probe_quality(endpoint=endpoint)

    # then every general item got an answer (whether right is the model's business)
    assert {r.tag for r in results} == {"general"}
    assert len(results) == len(load_golden_set("general"))
    assert all(r.error == "" for r in results), [r.error for r in results]
    assert _scores(endpoint)["general"].probe_n == len(results)


def test_the_three_sources_blend_into_one_score_that_routing_and_the_catalog_show(
    upstream, echo_golden, client
):
    # given an endpoint with evidence from all three sources for one tag
    org = factories.organization(credit_usd=None)
    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("echo-good",))
    endpoint_probe_quality(endpoint=endpoint)  # 3 of 3 golden items pass
    for n, rating in enumerate((0.0, 0.5, 0.25)):  # customers are less impressed
        feedback_record(
            organization=org,
            request_id=f"req-blend-{n}",
            endpoint=endpoint,
            tags=["echo-good"],
            score=rating,
        )
    quality_observe(endpoint.pk, "echo-good", 40, 50)  # 80 % of served requests succeeded

    # then the stored score is the shrunk, weighted blend of the three, not any one of them
    row = _scores(endpoint)["echo-good"]
    assert (row.probe_n, row.feedback_n, row.total_n) == (3, 3, 50)
    blended = blended_score(
        Evidence(
            probe_pass=3.0, probe_n=3, feedback_sum=0.75, feedback_n=3, success_n=40, total_n=50
        )
    )
    assert row.score == pytest.approx(blended)
    singles = [
        blended_score(Evidence(probe_pass=3.0, probe_n=3)),
        blended_score(Evidence(feedback_sum=0.75, feedback_n=3)),
        blended_score(Evidence(success_n=40, total_n=50)),
    ]
    assert all(abs(row.score - single) > 0.01 for single in singles)
    # and it is what the routing snapshot and the public catalog read
    assert selectors.quality_map([endpoint.pk])[endpoint.pk]["echo-good"] == pytest.approx(blended)
    overall = _scores(endpoint)[OVERALL]  # the catalog lists the overall blend
    assert (overall.probe_n, overall.feedback_n, overall.total_n) == (3, 3, 50)
    page = client.get(reverse("catalog")).content.decode()
    assert endpoint.full_slug in page and f"{overall.score:.2f}" in page
