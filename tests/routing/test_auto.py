"""Auto-routing with the real all-MiniLM-L6-v2 encoder and the shipped example prompts:
clear prompts land on their tag, ambiguous ones fall back to ``general``; the classifier
is built from the database's examples; the model is loaded lazily, once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from django.core.management import call_command

from routing.auto import (
    DEFAULT_THRESHOLD,
    GENERAL_TAG,
    MAX_VENDOR_EXAMPLES_PER_TAG,
    TagClassifier,
    classifier_from_db,
    examples_fingerprint,
    get_encoder,
    prompt_text,
    tag_examples_from_db,
)
from tests import factories
from vendors.management.commands.load_tag_examples import (
    DEFAULT_FILE,
    read_tag_examples,
    tag_examples_load,
)
from vendors.models import CapabilityTag, Endpoint
from vendors.reference.models import PROJECT_ROOT

SHIPPED_TAGS = {"sql", "legal", "finance", "intent-classification", "translation", "general"}


@pytest.fixture(scope="module")
def shipped_examples() -> dict[str, list[str]]:
    return {slug: spec["examples"] for slug, spec in read_tag_examples(DEFAULT_FILE).items()}


@pytest.fixture(scope="module")
def classifier(shipped_examples) -> TagClassifier:
    return TagClassifier(shipped_examples)


# --- the shipped examples -------------------------------------------------------------------


def test_it_ships_ten_clear_examples_for_each_default_tag(shipped_examples):
    assert set(shipped_examples) >= SHIPPED_TAGS
    for tag in SHIPPED_TAGS:
        examples = shipped_examples[tag]
        assert len(examples) == 10, tag
        assert len(set(examples)) == 10, tag


# --- classification ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "tag"),
    [
        ("Write a SQL query that counts orders per customer", "sql"),
        ("Is this non-compete clause enforceable in California?", "legal"),
        ("What's the P/E ratio and how do I compute it?", "finance"),
        ("Translate 'good morning' into French", "translation"),
        ("I want to cancel my subscription", "intent-classification"),
        ("Write a haiku about the sea", "general"),
    ],
)
def test_it_puts_a_clear_prompt_on_its_tag(classifier, prompt, tag):
    result = classifier.classify(prompt)

    assert result.tag == tag
    assert result.predicted == tag
    assert not result.fallback_used
    assert result.confidence >= DEFAULT_THRESHOLD
    assert result.confidence == max(result.scores.values())
    assert set(result.scores) == set(classifier.tags)
    assert sum(result.scores.values()) == pytest.approx(1.0)


def test_it_falls_back_to_general_when_unsure(classifier):
    result = classifier.classify("hello there, how's it going")

    assert result.tag == GENERAL_TAG
    assert result.fallback_used
    assert result.confidence < DEFAULT_THRESHOLD
    assert result.predicted in classifier.tags  # what it would have chosen, for the trace
    assert result.to_trace()["fallback_used"] is True


def test_it_falls_back_to_a_configured_tag_and_threshold(shipped_examples):
    strict = TagClassifier(shipped_examples, threshold=1.0, fallback_tag="chat")

    result = strict.classify("Write a SQL query that counts orders per customer")

    assert result.tag == "chat"
    assert result.fallback_used
    assert result.predicted == "sql"


def test_it_falls_back_for_an_empty_prompt_or_without_examples(classifier):
    assert classifier.classify("   ").tag == GENERAL_TAG
    assert classifier.classify("").fallback_used

    empty = TagClassifier({})
    result = empty.classify("Write a SQL query")
    assert (result.tag, result.confidence, result.fallback_used) == (GENERAL_TAG, 0.0, True)


async def test_it_classifies_off_the_event_loop(classifier):
    result = await classifier.classify_async("Translate 'good morning' into French")

    assert result == classifier.classify("Translate 'good morning' into French")


def test_it_traces_the_classification(classifier):
    trace = classifier.classify("Write a SQL query that counts orders per customer").to_trace()

    json.dumps(trace)
    assert trace["tag"] == "sql"
    assert trace["threshold"] == DEFAULT_THRESHOLD
    assert next(iter(trace["scores"])) == "sql"


# --- what is classified -----------------------------------------------------------------------


def test_it_classifies_the_last_user_message_not_the_system_prompt():
    messages = [
        {"role": "system", "content": "You are a helpful assistant for a law firm."},
        {"role": "user", "content": "Translate 'good morning' into French"},
        {"role": "assistant", "content": "Bonjour"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Now write a SQL query"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "that counts orders per customer"},
            ],
        },
    ]

    assert prompt_text(messages) == "Now write a SQL query\nthat counts orders per customer"


def test_it_uses_another_message_when_there_is_no_user_text():
    assert prompt_text([{"role": "system", "content": "Summarise contracts"}]) == (
        "Summarise contracts"
    )
    assert prompt_text([{"role": "user", "content": ""}, {"role": "user", "content": None}]) == ""
    assert prompt_text("not a list") == ""


def test_it_keeps_the_head_and_tail_of_a_long_prompt(classifier):
    document = "The parties agree to the following terms. " * 200
    text = prompt_text([{"role": "user", "content": document + "Translate the above into German."}])

    assert len(text) < 1100
    assert text.startswith("The parties agree")
    assert text.endswith("Translate the above into German.")
    assert classifier.classify(text).tag in (*classifier.tags, GENERAL_TAG)


# --- the encoder is loaded lazily, once ---------------------------------------------------------


def test_it_does_not_load_the_model_on_import():
    script = textwrap.dedent(
        """
        import sys
        import routing.auto as auto
        assert auto._encoder is None and not auto.encoder_loaded()
        assert "onnxruntime" not in sys.modules, "importing routing.auto loaded onnxruntime"
        classifier = auto.TagClassifier({"sql": ["Write a SQL query"], "general": ["Hi"]})
        assert auto.encoder_loaded()
        assert auto.get_encoder() is auto.get_encoder() is auto._encoder
        print(classifier.classify("SELECT count(*) FROM orders").tag)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sql"


def test_it_shares_one_encoder_per_process(classifier):
    assert get_encoder() is get_encoder()
    assert classifier._get_encoder() is get_encoder()


# --- from the database --------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_loads_the_default_examples_idempotently():
    CapabilityTag.objects.create(slug="sql", name="SQL", examples=["My own SQL example"])

    first = tag_examples_load()
    second = tag_examples_load()

    assert (first.created, first.updated) == (len(SHIPPED_TAGS) - 1, 1)
    assert (second.created, second.updated, second.unchanged) == (0, 0, len(SHIPPED_TAGS))
    sql = CapabilityTag.objects.get(slug="sql")
    assert sql.examples[0] == "My own SQL example"  # an operator's examples are kept
    assert len(sql.examples) == 11
    assert CapabilityTag.objects.get(slug="translation").examples[0].startswith("Translate")

    call_command("load_tag_examples", "--replace", stdout=open(os.devnull, "w"))  # noqa: SIM115
    assert len(CapabilityTag.objects.get(slug="sql").examples) == 10


@pytest.mark.django_db
def test_it_merges_platform_and_vendor_examples_from_the_database():
    tag_examples_load()
    legal_vendor = factories.endpoint(base_url="http://127.0.0.1:9/v1", tags=("legal",))
    declared = {
        "legal": ["Review my employment contract's termination clause.", 42, ""],
        "sql": ["A tag this endpoint does not carry is ignored."],
    }
    Endpoint.objects.filter(pk=legal_vendor.pk).update(tag_examples=declared)
    pending = factories.endpoint(base_url="http://127.0.0.1:9/v1", tags=("sql",), approved=False)
    Endpoint.objects.filter(pk=pending.pk).update(tag_examples={"sql": ["Pending: ignored."]})
    flood = factories.endpoint(base_url="http://127.0.0.1:9/v1", tags=("finance",))
    Endpoint.objects.filter(pk=flood.pk).update(
        tag_examples={"finance": [f"Finance example {i}" for i in range(100)]}
    )

    examples = tag_examples_from_db()

    assert "Review my employment contract's termination clause." in examples["legal"]
    assert len(examples["legal"]) == 11
    assert len(examples["sql"]) == 10
    assert len(examples["finance"]) == 10 + MAX_VENDOR_EXAMPLES_PER_TAG
    assert set(examples) == SHIPPED_TAGS


@pytest.mark.django_db
def test_it_builds_the_classifier_from_the_database_and_rebuilds_only_on_change():
    tag_examples_load()

    classifier = classifier_from_db()
    assert classifier.classify("Is this non-compete clause enforceable in California?").tag == (
        "legal"
    )
    assert classifier_from_db(previous=classifier) is classifier

    endpoint = factories.endpoint(base_url="http://127.0.0.1:9/v1", tags=("sql",))
    Endpoint.objects.filter(pk=endpoint.pk).update(
        tag_examples={"sql": ["Optimise this slow PostgreSQL query plan."]}
    )
    rebuilt = classifier_from_db(previous=classifier)
    assert rebuilt is not classifier
    assert rebuilt.fingerprint != classifier.fingerprint
    assert rebuilt.example_counts["sql"] == 11

    tag = CapabilityTag.objects.get(slug="finance")
    tag.examples = [*tag.examples, "How do I value a startup with discounted cash flows?"]
    tag.save()
    assert classifier_from_db(previous=rebuilt).fingerprint != rebuilt.fingerprint


def test_it_fingerprints_the_examples_not_their_order():
    a = {"sql": ["one", "two"], "legal": ["three"]}
    b = {"legal": ["three", "three"], "sql": ["two", "one"]}

    assert examples_fingerprint(a) == examples_fingerprint(b)
    assert examples_fingerprint(a) != examples_fingerprint({**a, "legal": ["four"]})
