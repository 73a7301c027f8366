"""The privacy guard through the real gateway: the vendor never sees the personal data of a
redacting organisation, the answer gets it back, ``trusted_only`` keeps such prompts on
private and zero-retention endpoints, and the trace and usage record kinds, never values.
Embeddings inputs are guarded like chat prompts, and a key that logs content keeps no
personal data in Switchyard's own trace under either policy."""

from __future__ import annotations

import orjson
import pytest

from billing.models import UsageRecord
from marketplace.data_policy import api_key_data_policy_update
from marketplace.models import ApiKey, Membership
from marketplace.redis_client import sync_client
from routing.privacy import Redaction, readable_input, scan_input, scan_messages
from routing.traces import stored_trace
from tests import factories
from tests.conftest import ingest_all, ingest_traces
from tests.support.upstream import DEFAULT_EMBEDDING_DIMS, _embedding_vector

pytestmark = pytest.mark.django_db(transaction=True)

EMAIL, PHONE, CARD = "jane.doe@example.com", "+1 212-555-0199", "4111 1111 1111 1111"
PROMPT = f"Repeat after me: {EMAIL} {PHONE} card {CARD}"


_guarded = factories.guarded
_log_content = factories.log_content


def _embedder(upstream, **extra: object):  # type: ignore[no-untyped-def]
    return factories.endpoint(
        base_url=upstream.base_url, kind="embeddings", tags=("embed",), **extra
    )


def _chat(model: str, text: str = PROMPT, **extra: object) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 64,
        **extra,
    }


def test_it_redacts_personal_data_before_the_vendor_and_restores_it(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    _guarded(customer, "redact")

    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=_chat(endpoint.full_slug))
        trace = client.get("/v1/generation", params={"id": response.json()["id"]}).json()["data"]

    assert response.status_code == 200, response.text
    seen = orjson.dumps(upstream.last_request("/v1/chat/completions")["body"]).decode()
    for value in (EMAIL, PHONE, CARD, "4111"):
        assert value not in seen
    assert "<EMAIL_1>" in seen and "<CARD_1>" in seen
    # The upstream echoes the prompt: the client gets the original values back.
    answer = response.json()["choices"][0]["message"]["content"]
    assert EMAIL in answer and "<EMAIL_1>" not in answer
    assert trace["privacy"]["action"] == "redacted"
    assert trace["privacy"]["found"]["EMAIL"] == 1 and trace["privacy"]["found"]["CARD"] == 1
    assert EMAIL not in orjson.dumps(trace).decode()

    ingest_all()
    record = UsageRecord.objects.get(request_id=response.json()["id"])
    assert record.privacy_action == "redacted" and record.privacy_found >= 3
    assert "EMAIL" in record.privacy_kinds.split(",")


def test_it_restores_placeholders_split_across_stream_chunks(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    _guarded(customer, "redact")

    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json=_chat(endpoint.full_slug, f"write to {EMAIL} today", stream=True),
        )

    events = [e[6:] for e in response.text.splitlines() if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in map(orjson.loads, events[:-1])
        if c.get("choices")
    )
    assert EMAIL in text and "<EMAIL" not in text
    assert EMAIL not in orjson.dumps(upstream.last_request("/v1/chat/completions")).decode()


def test_it_leaves_prompts_of_organisations_without_a_policy_alone(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    with gateway_server.client(customer.key) as client:
        response = client.post("/v1/chat/completions", json=_chat(endpoint.full_slug))
    assert response.status_code == 200
    assert EMAIL in orjson.dumps(upstream.last_request("/v1/chat/completions")["body"]).decode()


def test_it_keeps_personal_data_on_trusted_endpoints_only(gateway_server, upstream):
    customer = factories.customer()
    _guarded(customer, "trusted_only")
    keeps_data = factories.endpoint(
        base_url=upstream.base_url, tags=("chat", "pii"), data_retention_days=30
    )
    zero_retention = factories.endpoint(
        base_url=upstream.base_url, tags=("chat", "pii"), price_input_usd="5"
    )
    own = factories.endpoint(
        base_url=upstream.base_url,
        tags=("chat", "pii"),
        data_retention_days=30,
        private_to=customer.organization,
        price_input_usd="9",
    )

    served = set()
    with gateway_server.client(customer.key) as client:
        for _ in range(6):
            response = client.post("/v1/chat/completions", json=_chat("tag:pii"))
            assert response.status_code == 200, response.text
            served.add(response.json()["switchyard"]["endpoint"])
        trace = client.get("/v1/generation", params={"id": response.json()["id"]}).json()["data"]
        plain = client.post(
            "/v1/chat/completions",
            json=_chat("tag:pii", "hello there", provider={"order": [keeps_data.full_slug]}),
        )

    assert served <= {zero_retention.full_slug, own.full_slug}
    assert trace["privacy"]["action"] == "trusted_only"
    assert trace["routing"]["policy"]["trusted_only"] is True
    # A prompt without personal data goes wherever the router sends it.
    assert plain.json()["switchyard"]["endpoint"] == keeps_data.full_slug


def test_trusted_regions_narrow_where_personal_data_may_go(gateway_server, upstream):
    customer = factories.customer()
    _guarded(customer, "trusted_only", regions="EU")
    elsewhere = factories.endpoint(base_url=upstream.base_url, tags=("chat", "pii"), region="us")
    in_region = factories.endpoint(
        base_url=upstream.base_url, tags=("chat", "pii"), region="eu", price_input_usd="7"
    )

    with gateway_server.client(customer.key) as client:
        for _ in range(4):
            response = client.post("/v1/chat/completions", json=_chat("tag:pii"))
            assert response.json()["switchyard"]["endpoint"] == in_region.full_slug
        plain = client.post(
            "/v1/chat/completions",
            json=_chat("tag:pii", "hello", provider={"order": [elsewhere.full_slug]}),
        )
    assert plain.json()["switchyard"]["endpoint"] == elsewhere.full_slug


def test_a_key_can_override_its_organisation(gateway_server, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    _guarded(customer, "off")
    owner = Membership.objects.get(organization=customer.organization).user
    api_key_data_policy_update(
        actor=owner,
        api_key=ApiKey.objects.get(organization=customer.organization),
        privacy_policy="redact",
        cache_ttl=None,
        cache_similarity=None,
    )
    with gateway_server.client(customer.key) as client:
        assert client.post("/v1/chat/completions", json=_chat(endpoint.full_slug)).is_success
    assert EMAIL not in orjson.dumps(upstream.last_request("/v1/chat/completions")).decode()


def test_the_same_value_gets_the_same_placeholder_across_messages():
    messages = [
        {"role": "system", "content": f"The user is {EMAIL}."},
        {"role": "user", "content": [{"type": "text", "text": f"Mail {EMAIL} and b@example.org"}]},
    ]
    redacted, redaction = scan_messages(messages)
    assert redacted[0]["content"] == "The user is <EMAIL_1>."
    assert redacted[1]["content"][0]["text"] == "Mail <EMAIL_1> and <EMAIL_2>"
    assert messages[0]["content"] == f"The user is {EMAIL}."  # the caller's body is untouched
    assert redaction.found == {"EMAIL": 3}


def test_a_stream_restorer_waits_for_a_split_placeholder():
    redaction = Redaction()
    token = redaction.placeholder("EMAIL", EMAIL)
    stream = redaction.stream()
    pieces = ["write <EM", "AIL_", "1> now <", "3 is less"]
    out = "".join(stream.feed(p) for p in pieces) + stream.flush()
    assert token == "<EMAIL_1>"
    assert out == f"write {EMAIL} now <3 is less"


def test_it_finds_names_iban_and_phone_numbers_in_free_text():
    text = "Hi, I'm John Smith; call +1 212-555-0199 or pay to DE89370400440532013000."
    redacted, redaction = scan_messages([{"role": "user", "content": text}])
    assert redacted[0]["content"] == "Hi, I'm <NAME_1>; call <PHONE_1> or pay to <IBAN_1>."
    assert redaction.kinds() == "IBAN,NAME,PHONE"


# --- embeddings ----------------------------------------------------------------------------


def test_embeddings_inputs_are_redacted_before_the_vendor(gateway_server, upstream):
    endpoint = _embedder(upstream)
    customer = factories.customer()
    _guarded(customer, "redact")
    inputs = [f"write to {EMAIL}", f"call {PHONE} or {EMAIL}", "nothing personal here"]

    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/embeddings", json={"model": endpoint.full_slug, "input": inputs}
        )
        trace = client.get(
            "/v1/generation", params={"id": response.headers["x-request-id"]}
        ).json()["data"]
        single = client.post(
            "/v1/embeddings", json={"model": endpoint.full_slug, "input": f"mail {EMAIL}"}
        )

    assert response.status_code == 200, response.text
    sent = upstream.requests("/v1/embeddings")
    assert sent[0]["body"]["input"] == [
        "write to <EMAIL_1>",
        "call <PHONE_1> or <EMAIL_1>",
        "nothing personal here",
    ]
    assert single.status_code == 200 and sent[1]["body"]["input"] == "mail <EMAIL_1>"
    # Nothing is put back: each vector is the vendor's vector of the redacted text.
    vectors = [item["embedding"] for item in response.json()["data"]]
    assert vectors[0] == _embedding_vector("write to <EMAIL_1>", DEFAULT_EMBEDDING_DIMS)
    assert vectors[2] == _embedding_vector("nothing personal here", DEFAULT_EMBEDDING_DIMS)
    assert trace["privacy"] == {
        "policy": "redact",
        "action": "redacted",
        "found": {"EMAIL": 2, "PHONE": 1},
    }
    assert EMAIL not in orjson.dumps(trace).decode()

    ingest_all()
    record = UsageRecord.objects.get(request_id=response.headers["x-request-id"])
    assert record.privacy_action == "redacted" and record.privacy_found == 3
    assert record.privacy_kinds == "EMAIL,PHONE"


def test_embeddings_without_personal_data_record_the_policy(gateway_server, upstream):
    endpoint = _embedder(upstream)
    customer = factories.customer()
    _guarded(customer, "redact")
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/embeddings", json={"model": endpoint.full_slug, "input": "hello there"}
        )
        trace = client.get(
            "/v1/generation", params={"id": response.headers["x-request-id"]}
        ).json()["data"]
    assert response.status_code == 200
    assert upstream.last_request("/v1/embeddings")["body"]["input"] == "hello there"
    assert trace["privacy"] == {"policy": "redact", "action": "", "found": {}}


def test_embeddings_with_personal_data_stay_on_trusted_endpoints(gateway_server, upstream):
    customer = factories.customer()
    _guarded(customer, "trusted_only")
    keeps_data = _embedder(upstream, data_retention_days=30)
    zero_retention = _embedder(upstream, price_input_usd="5")

    served = set()
    with gateway_server.client(customer.key) as client:
        for _ in range(4):
            response = client.post(
                "/v1/embeddings", json={"model": "tag:embed", "input": [f"write to {EMAIL}"]}
            )
            assert response.status_code == 200, response.text
            served.add(response.json()["model"])
        trace = client.get(
            "/v1/generation", params={"id": response.headers["x-request-id"]}
        ).json()["data"]
        plain = client.post("/v1/embeddings", json={"model": "tag:embed", "input": "hello there"})

    assert served == {zero_retention.full_slug}
    # trusted_only does not change what is sent: the trusted vendor gets the text as is.
    assert upstream.requests("/v1/embeddings")[0]["body"]["input"] == [f"write to {EMAIL}"]
    assert trace["privacy"] == {
        "policy": "trusted_only",
        "action": "trusted_only",
        "found": {"EMAIL": 1},
    }
    assert trace["routing"]["policy"]["trusted_only"] is True
    # Without personal data the cheaper endpoint that keeps data is fine.
    assert plain.json()["model"] == keeps_data.full_slug


@pytest.mark.parametrize("policy", ["redact", "trusted_only"])
@pytest.mark.parametrize("tokens", [[101, 2023, 102], [[101, 2023], [102]], ["hi", [101, 102]]])
def test_token_arrays_are_refused_under_a_policy(gateway_server, upstream, policy, tokens):
    endpoint = _embedder(upstream)
    customer = factories.customer()
    _guarded(customer, policy)
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/embeddings", json={"model": endpoint.full_slug, "input": tokens}
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "privacy_unreadable_input" and error["param"] == "input"
    assert "token" in error["message"]
    assert upstream.requests("/v1/embeddings") == []  # nothing went to a vendor


def test_token_arrays_pass_without_a_policy(gateway_server, upstream):
    endpoint = _embedder(upstream)
    customer = factories.customer()
    _guarded(customer, "off")
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/embeddings", json={"model": endpoint.full_slug, "input": [101, 2023, 102]}
        )
    assert response.status_code == 200, response.text


def test_scan_input_shares_placeholders_across_inputs():
    inputs = [f"to {EMAIL}", f"cc {EMAIL} and b@example.org"]
    redacted, redaction = scan_input(inputs)
    assert redacted == ["to <EMAIL_1>", "cc <EMAIL_1> and <EMAIL_2>"]
    assert inputs[0] == f"to {EMAIL}"  # the caller's list is untouched
    assert redaction.found == {"EMAIL": 3}
    assert scan_input(f"to {EMAIL}")[0] == "to <EMAIL_1>"
    assert readable_input("text") and readable_input(["a", "b"])
    assert not readable_input([1, 2]) and not readable_input(["a", [1]])


# --- what Switchyard's own trace keeps (a key that logs content) ---------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_trusted_only_keeps_the_prompt_redacted_and_no_completion(gateway_server, upstream, stream):
    factories.endpoint(base_url=upstream.base_url, tags=("chat", "pii"))  # keeps no data
    customer = factories.customer()
    _guarded(customer, "trusted_only")
    _log_content(customer)
    text = f"write to {EMAIL} today"

    with gateway_server.client(customer.key) as client:
        answer = client.post("/v1/chat/completions", json=_chat("tag:pii", text, stream=stream))
        request_id = answer.headers["x-request-id"]
        trace = client.get("/v1/generation", params={"id": request_id}).json()["data"]
        plain = client.post("/v1/chat/completions", json=_chat("tag:pii", "hello there"))
        plain_trace = client.get(
            "/v1/generation", params={"id": plain.headers["x-request-id"]}
        ).json()["data"]

    assert answer.status_code == 200, answer.text
    assert EMAIL in answer.text  # the (trusted) vendor saw it and echoed it to the client
    assert EMAIL in orjson.dumps(upstream.requests("/v1/chat/completions")[0]).decode()
    assert trace["privacy"]["action"] == "trusted_only"
    content = trace["content"]
    assert orjson.loads(content["prompt"]["text"]) == [
        {"role": "user", "content": "write to <EMAIL_1> today"}
    ]
    assert content["completion"] is None and "trusted_only" in content["note"]
    assert EMAIL not in orjson.dumps(trace).decode()
    ingest_traces()  # PostgreSQL's copy neither
    stored = stored_trace(request_id)
    assert stored is not None and EMAIL not in orjson.dumps(stored).decode()
    # A prompt without personal data is kept as usual.
    assert plain_trace["content"]["completion"]["text"]
    assert "note" not in plain_trace["content"]


@pytest.mark.parametrize("policy", ["redact", "trusted_only"])
def test_embeddings_content_keeps_no_personal_data(gateway_server, upstream, policy):
    _embedder(upstream)
    customer = factories.customer()
    _guarded(customer, policy)
    _log_content(customer)
    with gateway_server.client(customer.key) as client:
        response = client.post(
            "/v1/embeddings", json={"model": "tag:embed", "input": [f"write to {EMAIL}"]}
        )
        trace = client.get(
            "/v1/generation", params={"id": response.headers["x-request-id"]}
        ).json()["data"]
    assert response.status_code == 200, response.text
    assert orjson.loads(trace["content"]["prompt"]["text"]) == ["write to <EMAIL_1>"]
    assert EMAIL not in orjson.dumps(trace).decode()


@pytest.mark.parametrize("policy", ["redact", "trusted_only"])
def test_an_answer_to_a_prompt_with_personal_data_is_never_cached(gateway_server, upstream, policy):
    # The cache keeps answers as the client got them (values restored): under a data policy,
    # the answer to a prompt that holds personal data is not kept; others are, as usual.
    endpoint = factories.endpoint(base_url=upstream.base_url)
    customer = factories.customer()
    _guarded(customer, policy)
    upstream.reset()

    def chat(text: str) -> dict:
        return {
            "model": endpoint.full_slug,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 8,
            "temperature": 0,
            "cache": {"ttl": 600},
        }

    with gateway_server.client(customer.key) as client:
        personal = [client.post("/v1/chat/completions", json=chat(PROMPT)) for _ in range(2)]
        plain = [
            client.post("/v1/chat/completions", json=chat("what is the capital of france"))
            for _ in range(2)
        ]
        trace = client.get("/v1/generation", params={"id": personal[1].json()["id"]}).json()
    assert [r.status_code for r in personal + plain] == [200] * 4
    assert ["x-switchyard-cache" in r.headers for r in personal] == [False, False]
    assert [r.headers["x-switchyard-cache"] for r in plain] == ["miss", "hit"]
    assert len(upstream.requests("/v1/chat/completions")) == 3
    assert trace["data"]["routing"]["cache"]["reason"] == "personal data"
    redis = sync_client()
    prefix = f"sy:cache:{customer.organization.pk}:*"
    stored = [  # exact entries are strings (semantic ones would be hashes: none asked here)
        redis.get(key) or b"" for key in redis.scan_iter(prefix) if redis.type(key) == b"string"
    ]
    assert any(b"france" in value for value in stored)  # the plain answer is there...
    assert not any(b"jane.doe" in value for value in stored)  # ...and nothing personal
