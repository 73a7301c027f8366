"""The official openai SDK as the client, against the running ASGI app, with a real local
small language model (SmolLM2-135M-Instruct on llama.cpp) as the vendor."""

from __future__ import annotations

import openai
import pytest

from billing.ledger import organization_balance
from billing.models import UsageRecord
from tests import factories
from tests.conftest import ingest_all

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slm]


@pytest.fixture
def sdk_setup(gateway_server, smollm2):  # type: ignore[no-untyped-def]
    endpoint = factories.endpoint(
        base_url=smollm2.base_url,
        upstream_model=smollm2.model,
        tags=("chat", "general"),
        price_input_usd="0.1",
        price_output_usd="0.2",
    )
    customer = factories.customer(credit_usd="1")
    client = openai.OpenAI(api_key=customer.key, base_url=f"{gateway_server.url}/v1", max_retries=0)
    return client, endpoint, customer


def test_it_answers_the_sdk_with_a_real_model_and_charges_for_it(sdk_setup):
    client, endpoint, customer = sdk_setup
    before = organization_balance(customer.organization)

    completion = client.chat.completions.create(
        model=endpoint.full_slug,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
    )

    choice = completion.choices[0]
    assert choice.message.content
    assert choice.logprobs is not None and choice.logprobs.content
    assert all(token.logprob <= 0 for token in choice.logprobs.content)
    assert completion.usage.prompt_tokens > 0 and 0 < completion.usage.completion_tokens <= 8
    extra = completion.model_extra or {}
    assert extra["switchyard"]["vendor"] == endpoint.vendor.slug
    cost = completion.usage.model_extra["cost_nanos"]
    assert cost > 0

    assert ingest_all() == 1
    assert UsageRecord.objects.get(request_id=completion.id).cost == cost
    assert organization_balance(customer.organization) == before - cost


def test_it_streams_a_real_model_to_the_sdk(sdk_setup):
    client, endpoint, _customer = sdk_setup
    stream = client.chat.completions.create(
        model="tag:general",
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens > 0
    assert usage_chunk.usage.model_extra["cost_nanos"] > 0

    ingest_all()
    record = UsageRecord.objects.get(request_id=usage_chunk.id)
    assert record.stream and record.endpoint_id == endpoint.pk


def test_it_raises_the_sdks_typed_errors(sdk_setup, gateway_server):
    client, endpoint, _ = sdk_setup
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="nobody/nothing", messages=[{"role": "user", "content": "hi"}]
        )
    assert missing.value.code == "model_not_found"

    bad_key = openai.OpenAI(
        api_key="sy-bad-key", base_url=f"{gateway_server.url}/v1", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(
            model=endpoint.full_slug, messages=[{"role": "user", "content": "hi"}]
        )

    broke = factories.customer(credit_usd=None)
    poor = openai.OpenAI(api_key=broke.key, base_url=f"{gateway_server.url}/v1", max_retries=0)
    with pytest.raises(openai.APIStatusError) as unpaid:
        poor.chat.completions.create(
            model=endpoint.full_slug, messages=[{"role": "user", "content": "hi"}]
        )
    assert unpaid.value.status_code == 402


def test_it_lists_models_to_the_sdk(sdk_setup):
    client, endpoint, _ = sdk_setup
    ids = {model.id for model in client.models.list()}
    assert endpoint.full_slug in ids and "tag:general" in ids
