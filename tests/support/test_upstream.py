"""Behaviour of the fault-injecting fake upstream itself (tests/support/upstream.py).

Every fault kind is exercised over real loopback HTTP with httpx. No assertion is about
durations: delays and hangs are checked through client timeouts and the server's stats.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from .upstream import (
    FaultSpecError,
    FaultUpstream,
    UpstreamProcess,
    fault_upstream,
    parse_faults,
)

CHAT = {"model": "fake-small", "messages": [{"role": "user", "content": "hello there world"}]}


@pytest.fixture(scope="module")
def shared() -> Iterator[FaultUpstream]:
    with fault_upstream() as up:
        yield up


@pytest.fixture
def up(shared: FaultUpstream) -> FaultUpstream:
    shared.reset()
    return shared


@pytest.fixture
def client(up: FaultUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=up.base_url, timeout=5.0, trust_env=False) as c:
        yield c


def _wait_for(predicate: Callable[[], bool], what: str, limit: float = 5.0) -> None:
    """Poll until ``predicate`` holds; the limit only guards against a hung test."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _sse_data(lines: list[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


# --------------------------------------------------------------------------- happy paths


def test_it_answers_a_chat_completion(client: httpx.Client) -> None:
    resp = client.post("/chat/completions", json={**CHAT, "max_tokens": 2})
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-small"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hello there", "refusal": None}
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    body = client.post("/chat/completions", json=CHAT).json()
    assert body["choices"][0]["message"]["content"] == "hello there world"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_it_streams_one_chunk_per_word_then_usage_then_done(client: httpx.Client) -> None:
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/chat/completions", json=payload) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        data = _sse_data(list(resp.iter_lines()))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    content, usage_chunk = chunks[:-1], chunks[-1]
    assert [c["choices"][0]["delta"]["content"] for c in content] == ["hello", " there", " world"]
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, "stop"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}

    # Without include_usage there is no usage chunk at all.
    with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as resp:
        data = _sse_data(list(resp.iter_lines()))
    assert len(data) == 4 and data[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in data[:-1])


def test_it_returns_logprobs_with_the_configured_mean(
    up: FaultUpstream, client: httpx.Client
) -> None:
    body = client.post(
        "/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}
    ).json()
    entries = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["hello", " there", " world"]
    assert all(e["logprob"] == -0.1 for e in entries)
    assert len(entries[0]["top_logprobs"]) == 2
    assert entries[0]["top_logprobs"][0]["token"] == "hello"

    up.configure(logprob_mean=-2.5)
    payload = {**CHAT, "logprobs": True, "stream": True}
    with client.stream("POST", "/chat/completions", json=payload) as resp:
        chunks = [json.loads(d) for d in _sse_data(list(resp.iter_lines()))[:-1]]
    logprobs = [c["choices"][0]["logprobs"]["content"][0]["logprob"] for c in chunks]
    assert logprobs == [-2.5, -2.5, -2.5]

    up.reset()  # restores the startup mean
    body = client.post("/chat/completions", json={**CHAT, "logprobs": True}).json()
    assert body["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.1


def test_it_serves_embeddings_models_and_health(up: FaultUpstream, client: httpx.Client) -> None:
    body = client.post(
        "/embeddings", json={"model": "fake-embed", "input": ["a b", "c"], "dimensions": 4}
    ).json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    vector = body["data"][0]["embedding"]
    assert len(vector) == 4
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-6
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}

    again = client.post(
        "/embeddings",
        json={"model": "fake-embed", "input": "a b", "dimensions": 4, "encoding_format": "base64"},
    ).json()
    decoded = struct.unpack("<4f", base64.b64decode(again["data"][0]["embedding"]))
    assert [round(v, 5) for v in decoded] == [round(v, 5) for v in vector]  # deterministic

    models = client.get("/models").json()
    assert [m["id"] for m in models["data"]] == ["fake-small", "fake-embed"]
    assert httpx.get(up.url + "/health", trust_env=False).json() == {"status": "ok"}


def test_it_rejects_invalid_requests_with_openai_errors(client: httpx.Client) -> None:
    resp = client.post("/chat/completions", json={"model": "fake-small"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = client.post("/chat/completions", json={**CHAT, "max_tokens": 0})
    assert resp.status_code == 400


def test_it_works_with_the_official_openai_client(up: FaultUpstream) -> None:
    openai = pytest.importorskip("openai")
    with httpx.Client(trust_env=False) as http:
        oai = openai.OpenAI(base_url=up.base_url, api_key="unused", http_client=http, max_retries=0)
        completion = oai.chat.completions.create(model="fake-small", messages=CHAT["messages"])
        assert completion.choices[0].message.content == "hello there world"
        stream = oai.chat.completions.create(
            model="fake-small",
            messages=CHAT["messages"],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == (
            "hello there world"
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        emb = oai.embeddings.create(model="fake-embed", input="hi")  # base64 by default
        assert len(emb.data[0].embedding) == 8


# --------------------------------------------------------------------------- faults


def test_it_injects_status_faults_with_retry_after(up: FaultUpstream, client: httpx.Client) -> None:
    for code in (500, 503):
        resp = client.post("/chat/completions", json=CHAT, headers={"X-Fault": f"status:{code}"})
        assert resp.status_code == code
        assert resp.json()["error"]["type"] == "server_error"
        assert "retry-after" not in resp.headers

    for spec in ("status:429;retry_after=2", "status:429,retry_after=2"):
        resp = client.post("/chat/completions", json=CHAT, headers={"X-Fault": spec})
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "2"
        assert resp.headers["retry-after-ms"] == "2000"
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"

    by_fault = up.stats()["by_fault"]
    assert by_fault["status:500"] == 1 and by_fault["status:503"] == 1
    assert by_fault["status:429;retry_after=2"] == 1


def test_it_sends_malformed_json_and_wrong_shape(client: httpx.Client) -> None:
    resp = client.post("/chat/completions", json=CHAT, headers={"X-Fault": "malformed-json"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.content)

    resp = client.post("/chat/completions", json=CHAT, headers={"X-Fault": "wrong-shape"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert "choices" not in body and "usage" not in body

    resp = client.post(
        "/embeddings", json={"model": "m", "input": "x"}, headers={"X-Fault": "wrong-shape"}
    )
    assert "data" not in resp.json()


def test_it_cuts_a_stream_without_done(client: httpx.Client) -> None:
    payload = {**CHAT, "stream": True}
    lines: list[str] = []
    headers = {"X-Fault": "cut-stream:2"}
    # The lines received before the cut are kept; the cut itself must surface as an error.
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/chat/completions", json=payload, headers=headers) as resp,
    ):
        assert resp.status_code == 200
        for line in resp.iter_lines():
            lines.append(line)
    data = _sse_data(lines)
    assert len(data) == 2
    assert "[DONE]" not in data
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data] == ["hello", " there"]


def test_it_cuts_a_non_streaming_body(client: httpx.Client) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/chat/completions", json=CHAT, headers={"X-Fault": "cut-stream:10"})


def test_it_mixes_garbage_into_the_sse_stream(client: httpx.Client) -> None:
    payload = {**CHAT, "stream": True}
    with client.stream(
        "POST", "/chat/completions", json=payload, headers={"X-Fault": "invalid-sse"}
    ) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert any(not line.startswith(("data:", "event:", "retry:", ":")) for line in lines)
    data = _sse_data(lines)
    assert data[-1] == "[DONE]"
    with pytest.raises(json.JSONDecodeError):
        for d in data[:-1]:
            json.loads(d)


def test_it_trickles_a_complete_stream(up: FaultUpstream) -> None:
    payload = {**CHAT, "stream": True}
    with (
        httpx.Client(base_url=up.base_url, trust_env=False, timeout=5.0) as c,
        c.stream("POST", "/chat/completions", json=payload, headers={"X-Fault": "trickle:20"}) as r,
    ):
        data = _sse_data(list(r.iter_lines()))
    assert len(data) == 4 and data[-1] == "[DONE]"

    # A gap between chunks longer than the client's read timeout trips the timeout mid-stream.
    slow = {"X-Fault": "slow-stream-chunk-delay:10000"}
    with (
        httpx.Client(base_url=up.base_url, trust_env=False, timeout=0.2) as c,
        pytest.raises(httpx.ReadTimeout),
        c.stream("POST", "/chat/completions", json=payload, headers=slow) as resp,
    ):
        assert resp.status_code == 200  # headers came right away
        list(resp.iter_lines())


def test_it_sends_oversize_bodies(client: httpx.Client) -> None:
    size = 300_000
    resp = client.post("/chat/completions", json=CHAT, headers={"X-Fault": f"oversize:{size}"})
    assert resp.status_code == 200
    assert len(resp.content) >= size
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert resp.json()["choices"][0]["message"]["content"].startswith("xxxx")

    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream(
        "POST", "/chat/completions", json=payload, headers={"X-Fault": f"oversize:{size}"}
    ) as resp:
        raw = resp.read()
    assert len(raw) >= size
    data = _sse_data(raw.decode().splitlines())
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 3


def test_it_resets_the_connection(up: FaultUpstream, client: httpx.Client) -> None:
    with pytest.raises(httpx.TransportError):
        client.post("/chat/completions", json=CHAT, headers={"X-Fault": "reset"})
    # The server itself is fine afterwards.
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert up.stats()["by_fault"] == {"reset": 1}


def test_it_delays_before_sending_headers(up: FaultUpstream) -> None:
    with httpx.Client(base_url=up.base_url, trust_env=False, timeout=0.2) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/chat/completions", json=CHAT, headers={"X-Fault": "delay:30000"})
        # A small delay is still answered normally.
        resp = c.post("/chat/completions", json=CHAT, headers={"X-Fault": "delay:5"})
        assert resp.status_code == 200
    _wait_for(lambda: up.stats()["in_flight"] == 0, "the timed-out request to be dropped")
    stats = up.stats()
    assert stats["by_fault"] == {"delay:30000": 1, "delay:5": 1}
    assert stats["client_disconnects"] == 1


def test_it_answers_others_while_a_delayed_request_is_pending(up: FaultUpstream) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=up.base_url, trust_env=False, timeout=30) as c:
            slow = asyncio.create_task(
                c.post("/chat/completions", json=CHAT, headers={"X-Fault": "delay:30000"})
            )
            hung = [
                asyncio.create_task(
                    c.post("/chat/completions", json=CHAT, headers={"X-Fault": "ttfb-hang"})
                )
                for _ in range(3)
            ]
            deadline = time.monotonic() + 5
            while (await asyncio.to_thread(up.stats))["in_flight"] < 4:
                assert time.monotonic() < deadline, "requests never reached the server"
                await asyncio.sleep(0.01)
            fast = await c.post("/chat/completions", json=CHAT)
            assert fast.status_code == 200
            assert not slow.done() and not any(t.done() for t in hung)
            stats = await asyncio.to_thread(up.stats)
            assert stats["in_flight"] == 4
            assert stats["max_in_flight"] == 5
            for task in (slow, *hung):
                task.cancel()
            await asyncio.gather(slow, *hung, return_exceptions=True)

    asyncio.run(scenario())
    _wait_for(lambda: up.stats()["in_flight"] == 0, "cancelled requests to be dropped")
    stats = up.stats()
    assert stats["client_disconnects"] == 4
    assert stats["by_fault"] == {"delay:30000": 1, "ttfb-hang": 3}
    assert stats["total"] == 5


def test_it_hangs_until_the_client_gives_up(up: FaultUpstream) -> None:
    with (
        httpx.Client(base_url=up.base_url, trust_env=False, timeout=0.2) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.post("/chat/completions", json=CHAT, headers={"X-Fault": "ttfb-hang"})
    _wait_for(lambda: up.stats()["in_flight"] == 0, "the hung request to be dropped")


def test_it_consumes_the_script_in_order_then_answers_normally(
    up: FaultUpstream, client: httpx.Client
) -> None:
    assert up.script(["status:500", "status:503", "none", "status:429"]) == 4
    assert httpx.get(up.url + "/health", trust_env=False).status_code == 200  # not /v1: skipped
    codes = [client.post("/chat/completions", json=CHAT).status_code for _ in range(6)]
    assert codes == [500, 503, 200, 429, 200, 200]
    stats = up.stats()
    assert stats["script_remaining"] == 0
    assert stats["by_fault"] == {"status:500": 1, "status:503": 1, "status:429": 1}
    assert stats["by_path"] == {"/health": 1, "/v1/chat/completions": 6}
    assert stats["total"] == 7

    # Scripts can target one path, and append instead of replacing.
    up.script(["status:502"], path="/v1/embeddings")
    assert up.script(["reset"], path="/v1/embeddings", append=True) == 2
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert client.post("/embeddings", json={"model": "m", "input": "x"}).status_code == 502
    with pytest.raises(httpx.TransportError):
        client.post("/embeddings", json={"model": "m", "input": "x"})


def test_it_combines_script_header_and_comma_separated_faults(
    up: FaultUpstream, client: httpx.Client
) -> None:
    up.script(["delay:1"])
    resp = client.post("/chat/completions", json=CHAT, headers={"X-Fault": "delay:2,status:502"})
    assert resp.status_code == 502
    assert resp.headers["x-upstream-fault"] == "delay:1,delay:2,status:502"
    assert up.stats()["by_fault"] == {"delay:1": 1, "delay:2": 1, "status:502": 1}


def test_it_rejects_unknown_fault_specs(up: FaultUpstream, client: httpx.Client) -> None:
    resp = client.post("/chat/completions", json=CHAT, headers={"X-Fault": "explode"})
    assert resp.status_code == 400
    assert "explode" in resp.json()["error"]["message"]
    with pytest.raises(httpx.HTTPStatusError):
        up.script(["status:abc"])
    with pytest.raises(FaultSpecError):
        parse_faults("delay:-1")
    plan = parse_faults("cut-stream:3, trickle:5")
    assert (plan.cut_stream, plan.trickle_ms) == (3, 5.0)
    assert plan.labels == ("cut-stream:3", "trickle:5")


def test_it_applies_a_default_delay(up: FaultUpstream) -> None:
    up.set_delay(30_000)
    with httpx.Client(base_url=up.base_url, trust_env=False, timeout=0.2) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/chat/completions", json=CHAT)
        # /health is not an answer from the model API, so it stays immediate.
        assert c.get(up.url + "/health").status_code == 200
        up.set_delay(0)
        assert c.post("/chat/completions", json=CHAT).status_code == 200
    assert up.stats()["delay_ms"] == 0


def test_it_records_forwarded_requests_in_a_ring_buffer() -> None:
    with fault_upstream(record_limit=3) as up:
        with httpx.Client(base_url=up.base_url, trust_env=False) as c:
            for i in range(5):
                c.post(
                    "/chat/completions",
                    json={**CHAT, "model": f"m{i}"},
                    headers={"Authorization": f"Bearer key-{i}", "X-Trace": str(i)},
                )
        recorded = up.requests()
        assert [r["body"]["model"] for r in recorded] == ["m2", "m3", "m4"]
        last = up.last_request("/v1/chat/completions")
        assert last is not None
        assert last["headers"]["Authorization"] == "Bearer key-4"
        assert last["headers"]["X-Trace"] == "4"
        assert last["method"] == "POST" and last["fault"] is None
        up.reset()
        assert up.requests() == []


def test_it_requires_the_bearer_key_when_configured() -> None:
    with fault_upstream(api_key="sk-upstream") as up:
        with httpx.Client(base_url=up.base_url, trust_env=False) as c:
            missing = c.post("/chat/completions", json=CHAT)
            wrong = c.get("/models", headers={"Authorization": "Bearer nope"})
            good = c.post("/chat/completions", json=CHAT, headers=up.auth_headers)
            health = c.get(up.url + "/health")
        assert missing.status_code == 401 and wrong.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert good.status_code == 200
        assert health.status_code == 200
        assert up.stats()["auth_failures"] == 2


def test_it_stops_cleanly_with_requests_still_hanging() -> None:
    threads_before = set(threading.enumerate())
    up = FaultUpstream().start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(
                up.base_url + "/chat/completions",
                json=CHAT,
                headers={"X-Fault": "ttfb-hang"},
                trust_env=False,
                timeout=30,
            )
        except httpx.TransportError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    _wait_for(lambda: up.stats()["in_flight"] == 1, "the hung request to arrive")
    up.stop()
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1  # the server dropped the connection instead of waiting 30 s
    assert not up.running
    assert set(threading.enumerate()) <= threads_before  # server thread joined
    up.stop()  # idempotent


def test_it_runs_as_a_separate_process() -> None:
    with UpstreamProcess(api_key="k", delay_ms=1) as proc:
        assert proc.url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=proc.base_url, trust_env=False) as c:
            assert c.post("/chat/completions", json=CHAT).status_code == 401
            body: dict[str, Any] = c.post(
                "/chat/completions", json=CHAT, headers=proc.auth_headers
            ).json()
        assert body["usage"]["completion_tokens"] == 3
        proc.script(["status:503"])
        stats = proc.stats()
        assert stats["delay_ms"] == 1 and stats["script_remaining"] == 1
        assert stats["by_path"] == {"/v1/chat/completions": 2}
        pid = proc.pid
    assert pid is not None and proc.pid is None
