"""The tool catalog (routing.tools): a pure projection of the routing snapshot."""

from __future__ import annotations

import pytest

from routing.errors import BadRequest
from routing.snapshot import EndpointView, Snapshot, TagView
from routing.tools import TOOL_NAME, ToolCatalog, tool_names, tool_result

TAGS = {
    "sql": TagView("sql", "SQL", "task", "Writing and fixing SQL queries."),
    "finance": TagView("finance", "Finance", "domain", "Money matters."),
    "legal": TagView("legal", "Legal", "domain", "Contracts."),
}
_ids = iter(range(1, 1000))


def view(
    *tags: str, private_to: int | None = None, kind: str = "chat", **extra: object
) -> EndpointView:
    n = next(_ids)
    values: dict[str, object] = {
        "id": n,
        "vendor_id": n,
        "vendor_slug": f"vendor-{n}",
        "slug": f"model-{n}",
        "kind": kind,
        "base_url": "http://127.0.0.1:9/v1",
        "upstream_model": "up",
        "secret": "",
        "tags": frozenset(tags),
        "price_input": 1_000_000_000,
        "price_output": 2_000_000_000,
        "context_length": 2048,
        "capacity": 4,
        "surge_curve": ((0.0, 1.0),),
        "surge_cap": 3.0,
        "region": "eu",
        "data_retention_days": 0,
        "private_to": private_to,
    }
    values.update(extra)
    return EndpointView(**values)  # type: ignore[arg-type]


def test_it_names_tools_stably_and_validly():
    names = tool_names(["sql", "intent-classification", "a-b", "a_b"])
    assert names["sql"] == "sql"
    assert names["intent-classification"] == "intent_classification"
    assert names["a_b"] == "a_b"  # the slug that is already a valid name keeps it
    assert names["a-b"].startswith("a_b_") and names["a-b"] != "a_b"
    assert tool_names(["a-b", "a_b"]) == {k: names[k] for k in ("a-b", "a_b")}
    assert all(TOOL_NAME.match(name) for name in names.values())
    # Names already given (the public tags') are kept: a later slug takes the suffix.
    assert tool_names(["a_b", "a-b"], {"a-b": "a_b"})["a_b"].startswith("a_b_")


def test_a_private_tag_never_renames_a_public_tool():
    catalog = ToolCatalog.build(Snapshot.build([view("a-b"), view("a_b", private_to=7)]))
    assert [t.name for t in catalog.public.tools] == ["a_b"]
    assert catalog.public.tools[0].tag == "a-b"
    private = {t.tag: t.name for t in catalog.for_organization(7).tools}
    assert private["a-b"] == "a_b" and private["a_b"].startswith("a_b_")


def test_it_builds_one_tool_per_tag_of_chat_endpoints_and_private_tools_per_owner():
    snapshot = Snapshot.build(
        [
            view("sql", "finance", languages=("en", "fr"), context_length=8192),
            view("sql", "legal", price_input=500_000_000),
            view("embed-only", kind="embeddings"),
            view("contracts", private_to=7),
        ],
        TAGS,
    )
    catalog = ToolCatalog.build(snapshot)

    public = catalog.for_organization(1)
    assert [t.name for t in public.tools] == ["finance", "legal", "sql"]
    assert [t.name for t in catalog.for_organization(7).tools] == [
        "contracts",
        "finance",
        "legal",
        "sql",
    ]
    sql = public.get("sql")
    assert sql is not None
    assert sql.domains == ("finance", "legal") and sql.endpoints == 2
    assert sql.max_tokens_limit == 8192
    assert "languages: en, fr" in sql.description and "$0.5000" in sql.description
    assert catalog.tags["sql"] == "sql"
    # Built once: the same object answers every organisation without private endpoints.
    assert catalog.for_organization(2) is public


def test_it_turns_arguments_into_a_chat_request_for_the_tag():
    catalog = ToolCatalog.build(Snapshot.build([view("sql", "finance")], TAGS))
    sql = catalog.public.get("sql")
    assert sql is not None

    arguments = sql.parse_arguments(
        '{"input": "top customers", "domain": "finance", "instructions": "use CTEs",'
        ' "max_tokens": 64}'
    )
    body = sql.chat_body(arguments, {"sort": "price"})

    assert body["model"] == "tag:sql+finance"
    assert body["max_tokens"] == 64 and body["provider"] == {"sort": "price"}
    system, user = body["messages"]
    assert "SQL" in system["content"] and "use CTEs" in system["content"]
    assert user == {"role": "user", "content": "top customers"}


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        (None, "arguments.input"),
        ({"input": ""}, "arguments.input"),
        ({"input": 3}, "arguments.input"),
        ({"input": "x", "domain": "legal"}, "arguments.domain"),
        ({"input": "x", "max_tokens": 100_000}, "arguments.max_tokens"),
        ({"input": "x", "instructions": "y" * 5000}, "arguments.instructions"),
        ({"input": "x", "extra": 1}, "arguments.extra"),
        ("[1, 2]", "arguments"),
    ],
)
def test_it_refuses_arguments_outside_the_schema(arguments, param):
    sql = ToolCatalog.build(Snapshot.build([view("sql", "finance")], TAGS)).public.get("sql")
    assert sql is not None
    with pytest.raises(BadRequest) as refused:
        sql.parse_arguments(arguments)
    assert refused.value.param == param and refused.value.code == "invalid_tool_arguments"


def test_it_describes_tags_it_knows_nothing_about_by_their_slug():
    tool = ToolCatalog.build(Snapshot.build([view("odd-tag")])).public.get("odd_tag")
    assert tool is not None and tool.tag == "odd-tag"
    assert tool.description.startswith("odd-tag: Requests for the odd-tag capability.")


def test_it_shapes_the_result_from_the_chat_answer():
    sql = ToolCatalog.build(Snapshot.build([view("sql")], TAGS)).public.get("sql")
    assert sql is not None
    answer = {
        "id": "gen-1",
        "model": "v/m",
        "choices": [{"message": {"content": "SELECT 1"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "cost": 1e-06, "cost_nanos": 1000},
        "switchyard": {"endpoint": "v/m"},
    }
    result = tool_result(sql, answer)
    assert result["output"] == "SELECT 1" and result["cost_nanos"] == 1000
    assert (result["id"], result["tool"], result["model"]) == ("gen-1", "sql", "v/m")
