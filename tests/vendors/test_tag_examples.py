"""Example prompts a vendor declares per capability tag: ``endpoint_create`` checks them
(tags the endpoint carries, non-empty, length, count per tag; repeats dropped), refuses
anything else with a message naming the tag and the prompt, saves nothing then, and
auto-routing's ``tag_examples_from_db`` counts them only once the endpoint is approved."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.money import usd_to_nanos
from routing.auto import tag_examples_from_db
from tests import factories
from vendors.models import CapabilityTag, Endpoint
from vendors.services import VendorError, endpoint_approve, endpoint_create, vendor_approve
from vendors.tag_examples import MAX_EXAMPLE_CHARS, MAX_VENDOR_EXAMPLES_PER_TAG

pytestmark = pytest.mark.django_db

URL = "http://127.0.0.1:9/v1"


def create(tag_examples: object, *, tags: tuple[str, ...] = ("sql", "chat"), vendor=None):  # type: ignore[no-untyped-def]
    return endpoint_create(
        vendor=vendor or factories.vendor(),
        slug="sql-small",
        base_url=URL,
        upstream_model="fake-small",
        price_input=usd_to_nanos("0.1"),
        price_output=usd_to_nanos("0.2"),
        tags=tags,
        tag_examples=tag_examples,  # type: ignore[arg-type]
    )


def test_it_stores_the_declared_examples_stripped_and_without_repeats():
    endpoint = create(
        {
            "SQL ": [
                "  Which customers spent most last month?  ",
                "Which customers spent most last month?",
                "Write a query for the top 10 products by revenue.",
            ],
            "chat": [],
        }
    )

    endpoint.refresh_from_db()
    assert endpoint.tag_examples == {
        "sql": [
            "Which customers spent most last month?",
            "Write a query for the top 10 products by revenue.",
        ]
    }


def test_it_stores_nothing_without_examples():
    assert create(None).tag_examples == {}


def test_it_accepts_the_limits_exactly_and_does_not_count_repeats():
    prompts = [f"{i:03d} " + "x" * (MAX_EXAMPLE_CHARS - 4) for i in range(20)]
    assert all(len(p) == MAX_EXAMPLE_CHARS for p in prompts)

    endpoint = create({"sql": [*prompts, prompts[0], prompts[1]]})

    assert endpoint.tag_examples == {"sql": prompts}
    assert len(prompts) == MAX_VENDOR_EXAMPLES_PER_TAG


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        (
            {"sql": ["Fine."], "legal": ["Review this contract."]},
            "example prompt 1 for 'legal': 'legal' is not one of this endpoint's capability "
            "tags (chat, sql)",
        ),
        ({"sql": ["Fine.", "   "]}, "example prompt 2 for 'sql': the example prompt is empty"),
        ({"sql": [42]}, "example prompt 1 for 'sql': the example prompt must be text"),
        (
            {"sql": ["Fine.", "y" * (MAX_EXAMPLE_CHARS + 1)]},
            f"example prompt 2 for 'sql': the example prompt has {MAX_EXAMPLE_CHARS + 1} "
            f"characters; at most {MAX_EXAMPLE_CHARS} are allowed",
        ),
        (
            {"sql": [f"Query number {i}" for i in range(MAX_VENDOR_EXAMPLES_PER_TAG + 1)]},
            f"example prompt {MAX_VENDOR_EXAMPLES_PER_TAG + 1} for 'sql': 'sql' has more than "
            f"{MAX_VENDOR_EXAMPLES_PER_TAG} example prompts",
        ),
        ({"sql": "Not a list."}, "the example prompts for 'sql' must be a list of prompts"),
        (["sql: a list"], "example prompts must map each capability tag to a list of prompts"),
    ],
)
def test_it_refuses_bad_examples_and_saves_nothing(examples, message):
    vendor = factories.vendor()

    with pytest.raises(VendorError) as refused:
        create(examples, vendor=vendor)

    assert message in str(refused.value)
    assert not Endpoint.objects.filter(vendor=vendor).exists()
    assert not CapabilityTag.objects.filter(slug__in=["sql", "chat", "legal"]).exists()


def test_an_endpoints_declared_examples_reach_auto_routing_only_once_approved():
    vendor = factories.vendor(approved=False)
    endpoint = create(
        {"sql": ["Which customers spent most last month?"], "chat": ["Tell me a joke."]},
        vendor=vendor,
    )
    assert tag_examples_from_db() == {}  # pending endpoint of a pending vendor

    vendor_approve(vendor=vendor)
    assert tag_examples_from_db() == {}  # the endpoint itself still pending

    endpoint_approve(endpoint=endpoint)
    assert tag_examples_from_db() == {
        "chat": ["Tell me a joke."],
        "sql": ["Which customers spent most last month?"],
    }


def test_the_create_endpoint_command_reads_an_examples_file(tmp_path: Path):
    vendor = factories.vendor(slug="sql-experts")
    good = tmp_path / "examples.json"
    good.write_text(json.dumps({"sql": ["Which customers spent most last month?"]}))
    args = [
        "create_endpoint",
        "--vendor=sql-experts",
        f"--url={URL}",
        "--upstream-model=sqlcoder",
        "--tags=sql",
        "--price-input-usd=0.1",
        "--price-output-usd=0.2",
    ]

    call_command(*args, "--slug=one", f"--examples-file={good}", stdout=io.StringIO())

    one = Endpoint.objects.get(vendor=vendor, slug="one")
    assert one.tag_examples == {"sql": ["Which customers spent most last month?"]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"legal": ["Review this contract."]}))
    with pytest.raises(CommandError, match="'legal' is not one of this endpoint's"):
        call_command(*args, "--slug=two", f"--examples-file={bad}", stdout=io.StringIO())
    bad.write_text("[1, 2]")
    with pytest.raises(CommandError, match="must hold a JSON object"):
        call_command(*args, "--slug=two", f"--examples-file={bad}", stdout=io.StringIO())
    assert not Endpoint.objects.filter(vendor=vendor, slug="two").exists()
