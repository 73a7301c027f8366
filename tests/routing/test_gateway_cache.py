"""The response cache through the real gateway and a real upstream: exact hits on replay,
never across organisations, semantic hits on a paraphrase, streaming replay, and a hit's
metering (free, what it saved) through ingest with the ledger reconciled."""

from __future__ import annotations

import io
import time

import orjson
import pytest
from django.core.management import call_command

from billing.ledger import organization_balance
from billing.models import UsageRecord
from marketplace.data_policy import organization_data_policy_update
from tests import factories
from tests.conftest import ingest_all

pytestmark = pytest.mark.django_db(transaction=True)


def _chat(model: str, text: str = "what is the capital of France", **extra: object) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


def _vendor_calls(upstream) -> int:  # type: ignore[no-untyped-def]
    return len(upstream.requests("/v1/chat/completions"))


def _wait_for_semantic_entry(organization_id: int) -> None:
    """The semantic entry is stored after the answer went out (the prompt is embedded then)."""
    from marketplace.redis_client import sync_client

    deadline = time.monotonic() + 60
    while not sync_client().exists(f"sy:cache:{organization_id}:sidx"):
        assert time.monotonic() < deadline, "the semantic entry was never stored"
        time.sleep(0.05)


def _exact_entry_key(organization_id: int) -> bytes:
    """The one exact entry's key; it is stored after the answer went out, so wait for it."""
    from marketplace.redis_client import sync_client

    deadline = time.monotonic() + 30
    while not (keys := sync_client().keys(f"sy:cache:{organization_id}:x:*")):
        assert time.monotonic() < deadline, "the exact entry was never stored"
        time.sleep(0.02)
    (key,) = keys
    return key


def _reconciled() -> bool:
    out = io.StringIO()
    call_command("reconcile", "--skip-stripe", stdout=out)
    return "no mismatch" in out.getvalue()


def test_it_answers_a_repeated_request_from_the_cache_for_free(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    payload = _chat(endpoint.full_slug, cache={"ttl": 600})

    with gateway_server.client(customer.key) as client:
        first = client.post("/v1/chat/completions", json=payload)
        second = client.post("/v1/chat/completions", json=payload)
        trace = client.get("/v1/generation", params={"id": second.json()["id"]}).json()["data"]

    assert first.status_code == second.status_code == 200, second.text
    assert first.headers["x-switchyard-cache"] == "miss"
    assert second.headers["x-switchyard-cache"] == "hit"
    assert _vendor_calls(upstream) == 1
    hit = second.json()
    assert hit["choices"] == first.json()["choices"]
    assert hit["id"] != first.json()["id"]
    paid = first.json()["usage"]["cost_nanos"]
    assert hit["usage"]["cost_nanos"] == 0
    assert hit["usage"]["cache"] == {
        "hit": "exact",
        "source_request_id": first.json()["id"],
        "saved_nanos": paid,
    }
    assert trace["cache"]["kind"] == "exact" and trace["served_by"] is None

    before = organization_balance(customer.organization)
    assert ingest_all() == 2
    record = UsageRecord.objects.get(request_id=hit["id"])
    assert (record.cache, record.cache_saved, record.cost) == ("exact", paid, 0)
    assert record.vendor_id is None and record.transaction_id is None
    # Only the vendor's answer was charged; the hit moved no money.
    assert organization_balance(customer.organization) == before - paid
    assert _reconciled()


def test_it_never_shares_an_answer_across_organisations(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    first, second = factories.customer(), factories.customer()
    payload = _chat(endpoint.full_slug, cache={"ttl": 600})

    with gateway_server.client(first.key) as client:
        client.post("/v1/chat/completions", json=payload)
    with gateway_server.client(second.key) as client:
        other = client.post("/v1/chat/completions", json=payload)

    assert other.headers["x-switchyard-cache"] == "miss"
    assert other.json()["usage"]["cost_nanos"] > 0
    assert _vendor_calls(upstream) == 2


def test_it_does_not_cache_a_sampled_request_or_one_that_opts_out(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    sampled = _chat(endpoint.full_slug, cache={"ttl": 600}, temperature=0.8)
    opted_out = _chat(endpoint.full_slug, cache=False)

    with gateway_server.client(customer.key) as client:
        for payload in (sampled, sampled, opted_out, opted_out):
            response = client.post("/v1/chat/completions", json=payload)
            assert response.status_code == 200
            assert "x-switchyard-cache" not in response.headers

    assert _vendor_calls(upstream) == 4
    assert "cache" not in upstream.last_request("/v1/chat/completions")["body"]


def test_it_refuses_a_bad_cache_option(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions", json=_chat(endpoint.full_slug, cache={"ttl": -1})
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "cache.ttl"
    assert _vendor_calls(upstream) == 0


def test_it_replays_a_cached_answer_as_a_stream(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    payload = _chat(
        endpoint.full_slug,
        text="one two three",
        cache={"ttl": 600},
        stream=True,
        stream_options={"include_usage": True},
    )

    with gateway_server.client(customer.key) as client:
        first = client.post("/v1/chat/completions", json=payload)
        second = client.post("/v1/chat/completions", json=payload)
        as_json = client.post("/v1/chat/completions", json={**payload, "stream": False})

    def text_of(response) -> str:  # type: ignore[no-untyped-def]
        events = [e[6:] for e in response.text.splitlines() if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )

    assert second.headers["x-switchyard-cache"] == "hit"
    assert second.headers["content-type"].startswith("text/event-stream")
    assert text_of(second) == text_of(first) == "one two three"
    # The stream's answer serves a later non-streaming request too.
    assert as_json.headers["x-switchyard-cache"] == "hit"
    assert as_json.json()["choices"][0]["message"]["content"] == "one two three"
    assert _vendor_calls(upstream) == 1


def test_it_reuses_an_answer_for_a_paraphrase_above_the_threshold(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    owner = factories.owner(customer.organization)
    organization_data_policy_update(
        actor=owner,
        organization=customer.organization,
        privacy_policy="off",
        cache_ttl=600,
        cache_similarity=850,
    )

    with gateway_server.client(customer.key) as client:
        first = client.post(
            "/v1/chat/completions", json=_chat(endpoint.full_slug, "What is the capital of France?")
        )
        _wait_for_semantic_entry(customer.organization.pk)
        paraphrase = client.post(
            "/v1/chat/completions", json=_chat(endpoint.full_slug, "what's the capital of france")
        )
        unrelated = client.post(
            "/v1/chat/completions",
            json=_chat(endpoint.full_slug, "Write a SQL query that counts orders per customer"),
        )

    assert first.headers["x-switchyard-cache"] == "miss"
    assert paraphrase.headers["x-switchyard-cache"] == "hit"
    assert paraphrase.headers["x-switchyard-cache-kind"] == "semantic"
    cache = paraphrase.json()["usage"]["cache"]
    assert cache["source_request_id"] == first.json()["id"] and cache["similarity"] >= 0.85
    assert paraphrase.json()["choices"] == first.json()["choices"]
    assert unrelated.headers["x-switchyard-cache"] == "miss"
    assert _vendor_calls(upstream) == 2


def test_a_request_accepts_no_answer_older_than_its_ttl(gateway_server, upstream):
    from marketplace.redis_client import sync_client

    model = factories.endpoint(base_url=upstream.base_url).full_slug
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        client.post("/v1/chat/completions", json=_chat(model, cache={"ttl": 600}))
        # Given the stored answer is two minutes old...
        redis = sync_client()
        key = _exact_entry_key(customer.organization.pk)
        entry = orjson.loads(redis.get(key))
        entry["at"] -= 120_000
        redis.set(key, orjson.dumps(entry), ex=600)
        # ...a request that accepts ten minutes takes it, one that accepts one minute does not.
        older = client.post("/v1/chat/completions", json=_chat(model, cache={"ttl": 600}))
        fresh = client.post("/v1/chat/completions", json=_chat(model, cache={"ttl": 60}))

    assert older.headers["x-switchyard-cache"] == "hit"
    assert fresh.headers["x-switchyard-cache"] == "miss"
    assert _vendor_calls(upstream) == 2
