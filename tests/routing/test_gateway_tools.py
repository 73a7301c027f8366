"""GET /v1/tools and POST /v1/tools/<name> through the running gateway, against real
fault-injecting upstreams: the catalog a key sees, a billed and traced call, fallback and
the error paths."""

from __future__ import annotations

import pytest

from billing.ledger import organization_balance
from billing.models import LedgerEntry, LedgerTransaction, UsageRecord
from tests import factories
from tests.conftest import ingest_all
from tests.support.upstream import FaultUpstream
from vendors.models import CapabilityTag

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def second_upstream():  # type: ignore[no-untyped-def]
    with FaultUpstream() as server:
        yield server


def _tags() -> None:
    CapabilityTag.objects.create(
        slug="sql",
        name="SQL",
        kind=CapabilityTag.Kind.TASK,
        description="Writing, explaining and fixing SQL queries.",
    )
    CapabilityTag.objects.create(
        slug="finance", name="Finance", kind=CapabilityTag.Kind.DOMAIN, description="Money."
    )
    CapabilityTag.objects.create(
        slug="intent-classification", name="Intent classification", kind="task"
    )


def _tools(client) -> dict[str, dict]:  # type: ignore[no-untyped-def,type-arg]
    response = client.get("/v1/tools")
    assert response.status_code == 200, response.text
    return {t["function"]["name"]: t for t in response.json()["data"]}


def test_it_lists_one_function_tool_per_capability_the_key_may_use(gateway_server, upstream):
    _tags()
    factories.endpoint(
        base_url=upstream.base_url,
        tags=("sql", "finance"),
        languages=["en", "de"],
        context_length=4096,
    )
    factories.endpoint(base_url=upstream.base_url, tags=("intent-classification",))
    owner = factories.customer()
    factories.endpoint(
        base_url=upstream.base_url, tags=("contracts",), private_to=owner.organization
    )
    customer = factories.customer()

    with gateway_server.client(customer.key) as client:
        tools = _tools(client)
    with gateway_server.client(owner.key) as client:
        owner_tools = _tools(client)

    assert set(tools) == {"sql", "finance", "intent_classification"}
    assert set(owner_tools) == {"sql", "finance", "intent_classification", "contracts"}
    sql = tools["sql"]
    assert sql["type"] == "function"
    assert sql["function"]["description"].startswith(
        "SQL: Writing, explaining and fixing SQL queries."
    )
    assert "languages: de, en" in sql["function"]["description"]
    parameters = sql["function"]["parameters"]
    assert parameters["required"] == ["input"]
    assert parameters["additionalProperties"] is False
    assert parameters["properties"]["domain"]["enum"] == ["finance"]
    assert parameters["properties"]["max_tokens"]["maximum"] == 4096
    assert "domain" not in tools["finance"]["function"]["parameters"]["properties"]


def test_it_runs_a_tool_billed_metered_and_traced(gateway_server, upstream):
    _tags()
    endpoint = factories.endpoint(base_url=upstream.base_url, tags=("sql", "finance"))
    customer = factories.customer(credit_usd="10")
    before = organization_balance(customer.organization)

    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/tools/sql",
            json={
                "arguments": {
                    "input": "list the ten newest orders",
                    "instructions": "PostgreSQL dialect",
                    "domain": "finance",
                    "max_tokens": 32,
                }
            },
        )
        assert response.status_code == 200, response.text
        result = response.json()
        trace = client.get("/v1/generation", params={"id": result["id"]}).json()["data"]

    assert result["object"] == "tool.result"
    assert (result["tool"], result["tag"], result["model"]) == ("sql", "sql", endpoint.full_slug)
    assert result["output"] == "list the ten newest orders"  # the fake vendor echoes
    assert result["cost_nanos"] == result["usage"]["cost_nanos"] > 0
    assert response.headers["x-request-id"] == result["id"]
    assert response.headers["x-switchyard-endpoint"] == endpoint.full_slug

    forwarded = upstream.last_request("/v1/chat/completions")["body"]
    assert forwarded["max_tokens"] == 32
    system, user = forwarded["messages"]
    assert system["role"] == "system" and "SQL" in system["content"]
    assert "PostgreSQL dialect" in system["content"]
    assert user == {"role": "user", "content": "list the ten newest orders"}

    assert trace["tool"] == "sql" and trace["model"] == "tag:sql+finance"
    assert trace["served_by"] == endpoint.full_slug

    assert ingest_all() == 1
    record = UsageRecord.objects.get(request_id=result["id"])
    assert (record.cost, record.endpoint_id) == (result["cost_nanos"], endpoint.pk)
    assert organization_balance(customer.organization) == before - result["cost_nanos"]
    assert record.transaction.kind == LedgerTransaction.Kind.USAGE
    debited = LedgerEntry.objects.filter(
        transaction=record.transaction, account__organization=customer.organization
    ).values_list("amount", flat=True)
    assert list(debited) == [-result["cost_nanos"]]


def test_it_takes_the_arguments_as_the_json_string_of_a_tool_call(gateway_server, upstream):
    factories.endpoint(base_url=upstream.base_url, tags=("translation",))
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/tools/translation", json={"arguments": '{"input": "guten Morgen"}'}
        )
    assert response.status_code == 200, response.text
    assert response.json()["output"] == "guten Morgen"


def test_it_falls_back_when_the_first_vendor_fails(gateway_server, upstream, second_upstream):
    failing = factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    healthy = factories.endpoint(base_url=second_upstream.base_url, tags=("sql",))
    customer = factories.customer()
    upstream.script(["status:500"])

    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/tools/sql",
            json={
                "arguments": {"input": "count the rows"},
                "provider": {"order": [failing.vendor.slug]},
            },
        )
        assert response.status_code == 200, response.text
        result = response.json()
        trace = client.get("/v1/generation", params={"id": result["id"]}).json()["data"]

    assert result["model"] == healthy.full_slug
    assert [a["outcome"] for a in trace["attempts"]] == ["http_error", "success"]
    assert upstream.stats()["total"] == 1 and second_upstream.stats()["total"] == 1
    ingest_all()
    assert UsageRecord.objects.get(request_id=result["id"]).endpoint_id == healthy.pk


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"arguments": {}}, "arguments.input"),
        ({"arguments": {"input": "  "}}, "arguments.input"),
        ({"arguments": {"input": "x", "colour": "red"}}, "arguments.colour"),
        ({"arguments": {"input": "x", "max_tokens": 0}}, "arguments.max_tokens"),
        ({"arguments": {"input": "x", "max_tokens": True}}, "arguments.max_tokens"),
        ({"arguments": {"input": "x", "domain": "legal"}}, "arguments.domain"),
        ({"arguments": {"input": "x", "instructions": 3}}, "arguments.instructions"),
        ({"arguments": "{not json"}, "arguments"),
        ({"arguments": ["x"]}, "arguments"),
        ({"arguments": {"input": "x"}, "stream": True}, "stream"),
        ({"arguments": {"input": "x"}, "provider": {"colour": "red"}}, None),
    ],
)
def test_it_refuses_bad_arguments_before_calling_any_vendor(gateway_server, upstream, body, param):
    factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/tools/sql", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert upstream.stats()["total"] == 0


def test_it_answers_404_for_an_unknown_tool_or_another_organisations_private_one(
    gateway_server, upstream
):
    owner = factories.organization()
    factories.endpoint(base_url=upstream.base_url, tags=("contracts",), private_to=owner)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        unknown = client.post("/v1/tools/no_such_tool", json={"arguments": {"input": "x"}})
        private = client.post("/v1/tools/contracts", json={"arguments": {"input": "x"}})
        odd = client.post("/v1/tools/Contracts", json={"arguments": {"input": "x"}})
    for response in (unknown, private):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "tool_not_found"
    assert odd.status_code == 404
    assert upstream.stats()["total"] == 0


def test_it_refuses_calls_without_a_valid_key_or_credit(gateway_server, upstream):
    factories.endpoint(base_url=upstream.base_url, tags=("sql",))
    broke = factories.customer(credit_usd=None)
    call = {"arguments": {"input": "select 1"}}
    with gateway_server.client() as client:
        missing = client.post("/v1/tools/sql", json=call)
        listing = client.get("/v1/tools")
    with gateway_server.client("sy-live-notarealkey0000000000000000") as client:
        wrong = client.post("/v1/tools/sql", json=call)
    with gateway_server.client(broke.key) as client:
        unpaid = client.post("/v1/tools/sql", json=call)
        method = client.get("/v1/tools/sql")

    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_api_key")
    assert listing.status_code == 401
    assert wrong.status_code == 401
    assert (unpaid.status_code, unpaid.json()["error"]["code"]) == (402, "insufficient_credit")
    assert method.status_code == 405
    assert upstream.stats()["total"] == 0


def test_an_idempotency_key_covers_the_tool_as_well_as_the_body(gateway_server, upstream):
    factories.endpoint(base_url=upstream.base_url, tags=("sql", "translation"))
    customer = factories.customer()
    call = {"arguments": {"input": "hello there"}}
    headers = {"Idempotency-Key": "tool-call-1"}
    with gateway_server.client(customer.key) as client:
        first = client.post("/v1/tools/sql", json=call, headers=headers)
        again = client.post("/v1/tools/sql", json=call, headers=headers)
        other_tool = client.post("/v1/tools/translation", json=call, headers=headers)

    assert first.status_code == 200 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert other_tool.status_code == 422
    assert upstream.stats()["total"] == 1
    assert ingest_all() == 1
