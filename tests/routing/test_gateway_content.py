"""Prompts and completions in the route trace: never by default, kept for a key that opts in."""

from __future__ import annotations

import orjson
import pytest

from routing.traces import stored_trace
from tests import factories
from tests.conftest import ingest_traces

pytestmark = pytest.mark.django_db(transaction=True)

PROMPT = "tell me about the weather in lisbon"


def _opt_in(customer, *, privacy: str = "") -> None:  # type: ignore[no-untyped-def]
    if privacy:
        factories.guarded(customer, privacy)
    factories.log_content(customer)


def _body(model: str, text: str = PROMPT, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def test_a_trace_keeps_no_content_unless_the_key_opts_in(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        answer = client.post("/v1/chat/completions", json=_body(endpoint.full_slug))
        trace = client.get("/v1/generation", params={"id": answer.json()["id"]}).json()["data"]
    assert "content" not in trace and "lisbon" not in orjson.dumps(trace).decode()


@pytest.mark.parametrize("stream", [False, True])
def test_an_opted_in_key_keeps_the_prompt_and_the_completion(gateway_server, upstream, stream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    _opt_in(customer)
    with gateway_server.client(customer.key) as client:
        answer = client.post("/v1/chat/completions", json=_body(endpoint.full_slug, stream=stream))
        request_id = answer.headers["x-request-id"]
        trace = client.get("/v1/generation", params={"id": request_id}).json()["data"]

    if stream:
        chunks = [
            orjson.loads(line[6:])
            for line in answer.text.splitlines()
            if line.startswith("data: {")
        ]
        said = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    else:
        said = answer.json()["choices"][0]["message"]["content"]
    assert said  # the fake vendor echoes the prompt's words
    content = trace["content"]
    assert orjson.loads(content["prompt"]["text"]) == [{"role": "user", "content": PROMPT}]
    assert content["completion"] == {"text": said, "truncated": False}
    ingest_traces()  # PostgreSQL's copy keeps it too (for TRACE_RETENTION_DAYS)
    assert stored_trace(request_id)["content"] == content  # type: ignore[index]


def test_the_kept_prompt_is_the_redacted_one(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    _opt_in(customer, privacy="redact")
    with gateway_server.client(customer.key) as client:
        answer = client.post(
            "/v1/chat/completions",
            json=_body(endpoint.full_slug, "write to jane.doe@example.com today"),
        )
        trace = client.get("/v1/generation", params={"id": answer.json()["id"]}).json()["data"]

    assert "jane.doe@example.com" in answer.text  # restored for the client
    kept = orjson.dumps(trace).decode()
    assert "jane.doe@example.com" not in kept and "<EMAIL_1>" in kept


@pytest.mark.parametrize("log_content", [False, True])
def test_keeping_the_completion_does_not_change_what_a_stream_costs(
    gateway_server, upstream, log_content
):
    # A vendor's stream with a line that is not JSON after a good chunk is relayed as it
    # came either way; parsing every chunk for the trace must not turn it into a break.
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    if log_content:
        _opt_in(customer)
    upstream.script(["invalid-sse"])
    with gateway_server.client(customer.key) as client:
        answer = client.post("/v1/chat/completions", json=_body(endpoint.full_slug, stream=True))
        trace = client.get("/v1/generation", params={"id": answer.headers["x-request-id"]}).json()[
            "data"
        ]
    assert answer.status_code == 200
    assert "stream_interrupted" not in answer.text
    assert trace["outcome"] == "success"
    assert ("content" in trace) is log_content
