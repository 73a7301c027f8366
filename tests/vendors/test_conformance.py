"""Conformance checks against a real SmolLM2 server and a misbehaving fake upstream."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from marketplace.devenv import free_port
from tests import factories
from vendors import selectors, tasks
from vendors.models import ConformanceReport
from vendors.services import endpoint_check_conformance

pytestmark = pytest.mark.django_db


@contextlib.contextmanager
def redirecting_server(target: str) -> Iterator[str]:
    """A real HTTP server on loopback that answers every request with a 307 to ``target``."""

    class Redirect(BaseHTTPRequestHandler):
        def _redirect(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(307)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _redirect

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _checks(report: ConformanceReport) -> dict[str, dict[str, object]]:
    return {check["name"]: check for check in report.checks}


@pytest.mark.slm
def test_it_passes_a_real_small_model_server(smollm2):
    # given the real SmolLM2 server registered as a pending endpoint
    endpoint = factories.endpoint(
        base_url=smollm2.base_url, upstream_model=smollm2.model, approved=False
    )

    # when its conformance is checked
    report = endpoint_check_conformance(endpoint=endpoint)

    # then every check passed, with its latency, and logprobs are known to work
    checks = _checks(report)
    assert report.passed, report.failed_checks
    assert set(checks) == {
        "url",
        "chat",
        "chat.usage",
        "stream",
        "stream.usage",
        "logprobs",
        "models",
    }
    assert all(check["passed"] for name, check in checks.items() if name != "models")
    assert all(checks[name]["latency_ms"] is not None for name in ("chat", "stream", "logprobs"))
    assert report.supports_logprobs is True
    assert selectors.conformance_latest(endpoint) == report


def test_it_passes_a_well_behaved_upstream_and_records_what_it_sent(upstream):
    # given a correct OpenAI-compatible upstream with a secret
    endpoint = factories.endpoint(
        base_url=upstream.base_url, upstream_model="fake-small", secret="vendor-secret"
    )

    # when the conformance task runs
    passed = tasks.conformance_check_endpoint(endpoint.pk)

    # then it passed, and the stream was asked to include usage
    assert passed is True
    report = ConformanceReport.objects.get(endpoint=endpoint)
    assert report.passed and report.supports_logprobs is True
    assert _checks(report)["models"]["passed"] is True
    streamed = [
        r for r in upstream.requests("/v1/chat/completions") if r["body"].get("stream") is True
    ]
    assert streamed[0]["body"]["stream_options"] == {"include_usage": True}
    assert all(r["headers"]["Authorization"] == "Bearer vendor-secret" for r in upstream.requests())


def test_it_fails_an_endpoint_that_answers_malformed_json(upstream):
    # given an upstream whose plain chat answer is cut-off JSON
    endpoint = factories.endpoint(base_url=upstream.base_url)
    upstream.script(["malformed-json"])

    # when its conformance is checked
    report = endpoint_check_conformance(endpoint=endpoint)

    # then the report fails and says why
    assert not report.passed
    chat = _checks(report)["chat"]
    assert chat["passed"] is False
    assert chat["detail"].startswith("the chat completion failed: the answer is not valid JSON")
    assert _checks(report)["stream"]["passed"] is True


def test_it_fails_an_answer_without_choices_or_usage(upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    upstream.script(["wrong-shape"])

    report = endpoint_check_conformance(endpoint=endpoint)

    checks = _checks(report)
    assert not report.passed
    assert "no choices[0].message.content" in checks["chat"]["detail"]
    assert checks["chat.usage"]["detail"] == "'usage' is missing or not an object"


def test_it_fails_a_stream_that_is_cut_before_done(upstream):
    # given an upstream that closes the stream after two chunks
    endpoint = factories.endpoint(base_url=upstream.base_url)
    upstream.script(["none", "cut-stream:2"])

    # when its conformance is checked
    report = endpoint_check_conformance(endpoint=endpoint)

    # then the stream checks fail, saying where the stream ended
    checks = _checks(report)
    assert not report.passed
    assert checks["chat"]["passed"] is True
    assert checks["stream"]["passed"] is False
    assert "after 2 chunks" in checks["stream"]["detail"]
    assert checks["stream.usage"]["passed"] is False


def test_it_fails_a_stream_with_lines_that_are_not_sse(upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url)
    upstream.script(["none", "invalid-sse"])

    report = endpoint_check_conformance(endpoint=endpoint)

    stream = _checks(report)["stream"]
    assert not report.passed
    assert stream["detail"].startswith("the stream failed after 1 chunk: chunk 2 is not valid JSON")


def test_it_fails_an_endpoint_that_redirects_without_following_it(upstream):
    # given a URL that redirects to a working upstream
    with redirecting_server(upstream.url) as url:
        endpoint = factories.endpoint(base_url=f"{url}/v1")

        # when its conformance is checked
        report = endpoint_check_conformance(endpoint=endpoint)

    # then the redirect fails the check with a clear message, and was not followed
    chat = _checks(report)["chat"]
    assert not report.passed
    assert "answered with a redirect (HTTP 307" in chat["detail"]
    assert "register the final URL" in chat["detail"]
    assert upstream.stats()["total"] == 0


def test_it_stops_at_the_first_call_when_nothing_listens():
    endpoint = factories.endpoint(base_url=f"http://127.0.0.1:{free_port()}/v1")

    report = endpoint_check_conformance(endpoint=endpoint)

    assert not report.passed
    assert [c["name"] for c in report.checks] == ["url", "chat", "chat.usage"]
    assert "could not reach" in _checks(report)["chat"]["detail"]


def test_it_refuses_a_url_on_an_address_that_is_not_allowed(settings, upstream):
    # given an endpoint on loopback, which the operator does not allow
    endpoint = factories.endpoint(base_url=upstream.base_url)
    settings.OUTBOUND_ALLOWED_NETWORKS = []

    # when its conformance is checked
    report = endpoint_check_conformance(endpoint=endpoint)

    # then nothing was called and the report says the URL is refused
    assert not report.passed
    assert [c["name"] for c in report.checks] == ["url"]
    assert report.checks[0]["detail"].startswith("the URL is refused")
    assert upstream.stats()["total"] == 0


def test_it_checks_the_embeddings_shape_for_an_embeddings_endpoint(upstream):
    # given an embeddings endpoint
    endpoint = factories.endpoint(
        base_url=upstream.base_url, upstream_model="fake-embed", kind="embeddings"
    )

    # when its conformance is checked
    report = endpoint_check_conformance(endpoint=endpoint)

    # then the embeddings call was checked instead of chat
    checks = _checks(report)
    assert report.passed, report.failed_checks
    assert set(checks) == {"url", "embeddings", "embeddings.usage"}
    assert checks["embeddings"]["detail"] == "2 vectors of 8 numbers"
    assert upstream.requests("/v1/chat/completions") == []


def test_it_fails_an_embeddings_endpoint_with_a_wrong_shape(upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url, kind="embeddings")
    upstream.script(["wrong-shape"])

    report = endpoint_check_conformance(endpoint=endpoint)

    checks = _checks(report)
    assert not report.passed
    assert "one embedding per input" in checks["embeddings"]["detail"]
    assert checks["embeddings.usage"]["passed"] is False
