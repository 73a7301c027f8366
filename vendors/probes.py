"""Calling vendor endpoints from the control plane: health probes and golden-set probes.

Every call goes through ``VendorClient``: the URL is checked by ``vendors.ssrf.check_url``
right before the call and the connection goes to the vetted address (the URL's host is
replaced by it; ``Host`` and TLS SNI keep the name), so a DNS answer cannot change between
check and connect. Redirects are never followed (a 3xx is an error naming its target),
environment proxies are ignored, answers are capped at ``MAX_BODY_BYTES`` and every call
has a deadline.

The functions here do I/O only; ``vendors.services`` records their outcomes.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import httpx

from vendors.crypto import decrypt_secret
from vendors.models import Endpoint
from vendors.quality import GoldenItem, load_golden_set
from vendors.ssrf import UnsafeURLError, check_url

MAX_BODY_BYTES: Final = 1_048_576
CONNECT_TIMEOUT: Final = 3.0
READ_TIMEOUT: Final = 15.0
CALL_DEADLINE: Final = 30.0
HEALTH_READ_TIMEOUT: Final = 5.0
HEALTH_DEADLINE: Final = 8.0
HEALTH_KEY_PREFIX: Final = "sy:health:"
HEALTH_KEY_TTL_SECONDS: Final = 600
_ERROR_CHARS: Final = 300


class VendorCallError(Exception):
    """A call that produced no usable HTTP answer; the message is for the vendor to read.

    ``status`` is set when an HTTP status was received (a redirect, for instance).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VendorUnreachableError(VendorCallError):
    """Nothing answered: the URL was refused, the connection failed or timed out."""


@dataclass(frozen=True, slots=True)
class VendorResponse:
    status: int
    headers: httpx.Headers
    body: bytes
    latency_ms: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            preview = self.body[:80].decode("utf-8", "replace")
            raise VendorCallError(
                f"the answer is not valid JSON ({exc}); it starts with {preview!r}",
                status=self.status,
            ) from None

    def error_summary(self) -> str:
        """``HTTP 500: <the vendor's error message>`` for a non-2xx answer."""
        message = ""
        try:
            data = json.loads(self.body)
            error = data.get("error") if isinstance(data, dict) else None
            if isinstance(error, dict):
                message = str(error.get("message") or "")
            elif isinstance(error, str):
                message = error
        except ValueError:
            message = self.body[:120].decode("utf-8", "replace")
        return truncate(f"HTTP {self.status}: {message}".rstrip(": "))


def truncate(text: str, limit: int = _ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def elapsed_ms(started: float) -> int:
    return max(0, round((time.monotonic() - started) * 1000))


def _pinned(url: str) -> tuple[list[str], str, dict[str, Any]]:
    """URLs with the host replaced by each vetted address, the Host header, extensions."""
    target = check_url(url)
    parts = urlsplit(url)  # check_url refused credentials, so netloc is host[:port]
    urls = []
    for address in target.addresses:
        literal = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
        netloc = literal if parts.port is None else f"{literal}:{target.port}"
        urls.append(urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")))
    extensions: dict[str, Any] = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host  # and the certificate is checked for it
    return urls, parts.netloc, extensions


class VendorClient:
    """A short-lived HTTP client for one endpoint (use as a context manager)."""

    def __init__(
        self,
        base_url: str,
        secret: str = "",
        *,
        read_timeout: float = READ_TIMEOUT,
        deadline: float = CALL_DEADLINE,
        max_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.deadline = deadline
        self.max_bytes = max_bytes
        # identity: the size cap then bounds what is parsed (no decompression bomb).
        headers = {"Accept-Encoding": "identity"}
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(
                connect=CONNECT_TIMEOUT, read=read_timeout, write=read_timeout, pool=CONNECT_TIMEOUT
            ),
            follow_redirects=False,
            trust_env=False,  # an HTTP(S)_PROXY in the environment must not see vendor calls
        )
        # No User-Agent: golden-set probes should not be told apart from routed traffic.
        del self._client.headers["User-Agent"]

    def __enter__(self) -> VendorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    @contextmanager
    def open(
        self, method: str, path: str, *, json_body: Any = None
    ) -> Iterator[tuple[httpx.Response, float]]:
        """Send a request and yield the response with its body unread, and the start time.

        Raises ``VendorCallError`` for a refused URL, a connection error, a timeout or a
        redirect.
        """
        url = self.url(path)
        try:
            candidates, host_header, extensions = _pinned(url)
        except UnsafeURLError as exc:
            raise VendorUnreachableError(f"the URL is refused: {exc}") from None
        started = time.monotonic()
        response = None
        for attempt, pinned in enumerate(candidates, start=1):
            request = self._client.build_request(
                method, pinned, json=json_body, headers={"Host": host_header}, extensions=extensions
            )
            try:
                response = self._client.send(request, stream=True)
                break
            except httpx.ConnectError as exc:
                if attempt == len(candidates):  # else: the name's next vetted address
                    raise VendorUnreachableError(
                        truncate(f"could not reach {url}: {exc}")
                    ) from None
            except httpx.TimeoutException:
                raise VendorUnreachableError(
                    f"no answer from {url} within the time limit"
                ) from None
            except httpx.HTTPError as exc:
                reason = str(exc) or type(exc).__name__
                raise VendorUnreachableError(truncate(f"could not reach {url}: {reason}")) from None
        assert response is not None
        try:
            if 300 <= response.status_code < 400:
                location = response.headers.get("location", "(no location)")
                raise VendorCallError(
                    truncate(
                        f"{url} answered with a redirect (HTTP {response.status_code} to "
                        f"{location}); redirects are not followed: register the final URL"
                    ),
                    status=response.status_code,
                )
            yield response, started
        finally:
            response.close()

    def iter_bytes(self, response: httpx.Response, started: float) -> Iterator[bytes]:
        """The body in pieces, stopping at the size cap and the deadline."""
        received = 0
        try:
            for piece in response.iter_raw():
                received += len(piece)
                if received > self.max_bytes:
                    raise VendorCallError(
                        f"the answer is larger than {self.max_bytes // 1024} KiB",
                        status=response.status_code,
                    )
                if time.monotonic() - started > self.deadline:
                    raise VendorCallError(
                        f"the answer took longer than {self.deadline:g} s",
                        status=response.status_code,
                    )
                yield piece
        except httpx.TimeoutException:
            raise VendorCallError(
                "the answer stopped arriving (read timeout)", status=response.status_code
            ) from None
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise VendorCallError(
                truncate(f"the connection broke while reading the answer: {reason}"),
                status=response.status_code,
            ) from None

    def call(self, method: str, path: str, *, json_body: Any = None) -> VendorResponse:
        """One request with its whole (capped) body read; any status is returned."""
        with self.open(method, path, json_body=json_body) as (response, started):
            body = b"".join(self.iter_bytes(response, started))
            return VendorResponse(
                status=response.status_code,
                headers=response.headers,
                body=body,
                latency_ms=elapsed_ms(started),
            )


def client_for(endpoint: Endpoint, **kwargs: Any) -> VendorClient:
    return VendorClient(endpoint.base_url, decrypt_secret(endpoint.secret_encrypted), **kwargs)


# --------------------------------------------------------------------------- health


def health_key(endpoint_id: int) -> str:
    """The Redis key holding an endpoint's latest health probe outcome (JSON)."""
    return f"{HEALTH_KEY_PREFIX}{endpoint_id}"


@dataclass(frozen=True, slots=True)
class HealthOutcome:
    ok: bool
    status: int | None
    latency_ms: int | None
    error: str = ""


def probe_health(endpoint: Endpoint) -> HealthOutcome:
    """A cheap call: ``GET /models``; if that is 404, a one-token chat (or embedding)."""
    started = time.monotonic()
    try:
        with client_for(
            endpoint, read_timeout=HEALTH_READ_TIMEOUT, deadline=HEALTH_DEADLINE
        ) as client:
            response = client.call("GET", "models")
            if response.status == 404:
                if endpoint.kind == Endpoint.Kind.EMBEDDINGS:
                    body: dict[str, Any] = {"model": endpoint.upstream_model, "input": "ping"}
                    response = client.call("POST", "embeddings", json_body=body)
                else:
                    body = {
                        "model": endpoint.upstream_model,
                        "messages": [{"role": "user", "content": "ping"}],
                        "max_tokens": 1,
                        "temperature": 0,
                    }
                    response = client.call("POST", "chat/completions", json_body=body)
    except VendorCallError as exc:
        return HealthOutcome(
            ok=False, status=exc.status, latency_ms=elapsed_ms(started), error=str(exc)
        )
    if response.ok:
        return HealthOutcome(ok=True, status=response.status, latency_ms=response.latency_ms)
    return HealthOutcome(
        ok=False,
        status=response.status,
        latency_ms=response.latency_ms,
        error=response.error_summary(),
    )


# --------------------------------------------------------------------------- golden sets


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    tag: str
    item_id: str
    passed: bool
    latency_ms: int | None
    error: str = ""
    answer: str = ""
    unreachable: bool = False


def chat_answer(data: Any) -> str:
    """``choices[0].message.content`` of a chat completion, or ``VendorCallError``."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise VendorCallError("the answer has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise VendorCallError("choices[0].message.content is not a string")
    return content


def _ask(client: VendorClient, endpoint: Endpoint, item: GoldenItem) -> ProbeOutcome:
    body = {
        "model": endpoint.upstream_model,
        "messages": item.messages(),
        "max_tokens": item.max_tokens,
        "temperature": 0,
    }
    started = time.monotonic()
    try:
        response = client.call("POST", "chat/completions", json_body=body)
        if not response.ok:
            raise VendorCallError(response.error_summary(), status=response.status)
        answer = chat_answer(response.json())
    except VendorCallError as exc:
        return ProbeOutcome(
            item.tag,
            item.id,
            False,
            elapsed_ms(started),
            truncate(str(exc)),
            unreachable=isinstance(exc, VendorUnreachableError),
        )
    return ProbeOutcome(
        item.tag, item.id, item.passes(answer), response.latency_ms, answer=answer[:500]
    )


def probe_quality(endpoint: Endpoint, tags: list[str]) -> list[ProbeOutcome]:
    """Send the golden items of ``tags`` to a chat endpoint, one at a time.

    A refused URL or an unreachable endpoint stops the run after the first such item
    (the remaining items would fail the same way and only add load).
    """
    outcomes: list[ProbeOutcome] = []
    with client_for(endpoint) as client:
        for tag in tags:
            for item in load_golden_set(tag):
                outcome = _ask(client, endpoint, item)
                outcomes.append(outcome)
                if outcome.unreachable:
                    return outcomes
    return outcomes
