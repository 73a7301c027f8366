"""The reference vendors serve real local models over OpenAI-compatible HTTP.

Each server starts once per module on a random loopback port; requests ask for a few
tokens at temperature 0 and the assertions check shape, usage and logprobs, never exact
text. No Django, no database.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from vendors.reference.embeddings import EMBEDDING_DIMENSIONS, MiniLMEncoder
from vendors.reference.launch import (
    ReferenceVendor,
    ReferenceVendorError,
    start_reference_vendor,
)
from vendors.reference.models import (
    GEMMA_MODEL_NAME,
    MINILM_MODEL_NAME,
    SMOLLM2_MODEL_NAME,
    gemma_path,
    minilm_paths,
    smollm2_path,
)

API_KEY = "test-reference-vendor-secret"
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture(scope="module")
def smollm2() -> Iterator[ReferenceVendor]:
    with start_reference_vendor("smollm2", api_key=API_KEY, parallel=2, ctx=2048) as vendor:
        yield vendor


@pytest.fixture(scope="module")
def gemma() -> Iterator[ReferenceVendor]:
    with start_reference_vendor("gemma", parallel=2, ctx=2048) as vendor:
        yield vendor


@pytest.fixture(scope="module")
def minilm() -> Iterator[ReferenceVendor]:
    with start_reference_vendor("minilm", api_key=API_KEY) as vendor:
        yield vendor


def chat(vendor: ReferenceVendor, **body: Any) -> httpx.Response:
    payload = {"model": vendor.model, "messages": HELLO, "max_tokens": 8, "temperature": 0}
    return httpx.post(
        f"{vendor.base_url}/chat/completions",
        json=payload | body,
        headers=vendor.headers,
        timeout=30,
    )


def embed(
    vendor: ReferenceVendor, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{vendor.base_url}/embeddings",
        json=body,
        headers=vendor.headers if headers is None else headers,
        timeout=30,
    )


# --- model files --------------------------------------------------------------------------


def test_it_finds_every_model_file_offline() -> None:
    assert smollm2_path().stat().st_size > 90_000_000
    model, tokenizer = minilm_paths()
    assert model.suffix == ".onnx" and tokenizer.name == "tokenizer.json"
    assert tokenizer.is_file()


def test_it_assembles_gemma_once_into_the_cache(tmp_path: Any) -> None:
    path = gemma_path(tmp_path)
    first_mtime = path.stat().st_mtime_ns

    again = gemma_path(tmp_path)

    assert again == path and path.stat().st_size > 200_000_000
    assert again.stat().st_mtime_ns == first_mtime  # reused, not rewritten
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


# --- SmolLM2 (instruction-tuned chat) -------------------------------------------------------


def test_it_answers_a_chat_with_usage_and_logprobs(smollm2: ReferenceVendor) -> None:
    response = chat(smollm2, logprobs=True, top_logprobs=1)

    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in {"stop", "length"}
    assert body["usage"]["prompt_tokens"] > 0
    assert 0 < body["usage"]["completion_tokens"] <= 8
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == body["usage"]["completion_tokens"]
    assert all(isinstance(t["token"], str) and t["logprob"] <= 0 for t in tokens)
    assert all(len(t["top_logprobs"]) == 1 for t in tokens)


def test_it_streams_sse_chunks_ending_with_usage_and_done(smollm2: ReferenceVendor) -> None:
    body = {
        "model": smollm2.model,
        "messages": HELLO,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST",
        f"{smollm2.base_url}/chat/completions",
        json=body,
        headers=smollm2.headers,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")
        ]

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )
    assert text.strip()
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] > 0
    assert usage_chunk["usage"]["completion_tokens"] > 0


def test_it_announces_its_model_name(smollm2: ReferenceVendor) -> None:
    response = httpx.get(f"{smollm2.base_url}/models", headers=smollm2.headers)

    assert response.status_code == 200
    assert SMOLLM2_MODEL_NAME in [model["id"] for model in response.json()["data"]]
    assert smollm2.model == SMOLLM2_MODEL_NAME


def test_it_refuses_chat_without_the_api_key(smollm2: ReferenceVendor) -> None:
    url = f"{smollm2.base_url}/chat/completions"
    body = {"messages": HELLO, "max_tokens": 1}

    missing = httpx.post(url, json=body)
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer not-the-key"})
    health = httpx.get(f"{smollm2.root_url}/health")

    assert missing.status_code == 401 and "error" in missing.json()
    assert wrong.status_code == 401
    assert health.status_code == 200  # health probes need no secret


async def test_it_serves_two_requests_at_once(smollm2: ReferenceVendor) -> None:
    async with httpx.AsyncClient(headers=smollm2.headers, timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    f"{smollm2.base_url}/chat/completions",
                    json={"model": smollm2.model, "messages": HELLO, "max_tokens": 8},
                )
                for _ in range(2)
            )
        )

    assert [r.status_code for r in responses] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] > 0 for r in responses)


def test_it_exits_cleanly_on_sigterm() -> None:
    vendor = start_reference_vendor("smollm2", parallel=1, ctx=512)

    vendor.stop()

    assert vendor.process.returncode == 0
    assert not vendor.log_path.exists()  # its temporary log is cleaned up


# --- Gemma 3 270M (base model, deliberately weak) -------------------------------------------


def test_it_answers_a_chat_with_the_gemma_base_model(gemma: ReferenceVendor) -> None:
    response = chat(gemma, logprobs=True, top_logprobs=1)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == GEMMA_MODEL_NAME
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens"] > 5  # a real template, not a 3-token prompt
    assert body["usage"]["completion_tokens"] > 0
    assert body["choices"][0]["logprobs"]["content"]


def test_it_renders_gemma_turns_with_its_template(gemma: ReferenceVendor) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]

    response = httpx.post(f"{gemma.root_url}/apply-template", json={"messages": messages})

    assert response.status_code == 200, response.text
    prompt = response.json()["prompt"]
    assert "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n" in prompt
    assert prompt.endswith("<start_of_turn>model\n")


# --- MiniLM embeddings ----------------------------------------------------------------------


def test_it_returns_unit_vectors_with_usage(minilm: ReferenceVendor) -> None:
    response = embed(minilm, {"model": MINILM_MODEL_NAME, "input": ["a cat", "a dog", "tax law"]})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == MINILM_MODEL_NAME
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    vectors = np.array([item["embedding"] for item in body["data"]])
    assert vectors.shape == (3, EMBEDDING_DIMENSIONS)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3


def test_it_puts_similar_sentences_closer(minilm: ReferenceVendor) -> None:
    sentences = [
        "How do I reset my password?",
        "I forgot my password and need to change it.",
        "The recipe needs two cups of flour.",
    ]

    data = embed(minilm, {"input": sentences}).json()["data"]

    query, paraphrase, unrelated = (np.array(item["embedding"]) for item in data)
    assert query @ paraphrase > query @ unrelated + 0.2


def test_it_embeds_a_single_string_and_base64(minilm: ReferenceVendor) -> None:
    as_floats = embed(minilm, {"input": "hello world"}).json()["data"][0]["embedding"]
    as_base64 = embed(minilm, {"input": "hello world", "encoding_format": "base64"}).json()

    decoded = np.frombuffer(base64.b64decode(as_base64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_floats, atol=1e-6)


def test_it_truncates_overlong_input(minilm: ReferenceVendor) -> None:
    response = embed(minilm, {"input": "word " * 5000})

    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 256


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input": None},
        {"input": 42},
        {"input": []},
        {"input": [1, 2, 3]},
        {"input": ["ok", 7]},
        {"input": ""},
        {"input": ["x"] * 257},
        {"input": "x", "encoding_format": "int8"},
        {"input": "x", "dimensions": 128},
        ["not", "an", "object"],
    ],
)
def test_it_rejects_bad_input_with_an_openai_error(minilm: ReferenceVendor, body: Any) -> None:
    response = embed(minilm, body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] and error["code"]


def test_it_rejects_an_unknown_model_with_404(minilm: ReferenceVendor) -> None:
    response = embed(minilm, {"model": "text-embedding-3-large", "input": "x"})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_it_refuses_embeddings_without_the_api_key(minilm: ReferenceVendor) -> None:
    refused = embed(minilm, {"input": "x"}, headers={})
    health = httpx.get(f"{minilm.root_url}/health")

    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert health.status_code == 200


def test_it_encodes_in_process_like_the_server(minilm: ReferenceVendor) -> None:
    texts = ["route this to a coding model", "short", "a " * 40]
    served = np.array(
        [item["embedding"] for item in embed(minilm, {"input": texts}).json()["data"]]
    )

    local = MiniLMEncoder(batch_size=2).encode(texts)

    assert local.shape == (3, EMBEDDING_DIMENSIONS) and local.dtype == np.float32
    np.testing.assert_allclose(local, served, atol=1e-5)
    assert MiniLMEncoder().encode([]).shape == (0, EMBEDDING_DIMENSIONS)


# --- launcher ---------------------------------------------------------------------------------


def test_it_reports_a_server_that_cannot_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(ReferenceVendorError, match="exited with status 1") as failure:
            start_reference_vendor("minilm", port=port)

    assert "error:" in str(failure.value)  # the log's tail says why
