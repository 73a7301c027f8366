"""Running one routed request: reserve, call the vendor, fall back, settle.

For each candidate in the router's order: reserve (one Redis round trip: rate limit,
circuit, capacity slot, credit hold, key limit), call the vendor, and either settle (one
round trip: charge at the quoted price, free the slot, usage event, trace) or release and
try the next candidate. Connect errors, timeouts before the first byte, 5xx, 429 and
broken answers move on; a vendor's 4xx refusal of the request itself does not. A stream
that broke after bytes reached the client is never retried or silently truncated: the
client gets an error event and pays only for what it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis.asyncio as aioredis

from billing.money import NANOS_PER_USD, request_cost
from routing import metrics
from routing.cascade import (
    CascadeTier,
    CascadeTrace,
    confidence_from_response,
    strip_logprobs,
)
from routing.cascade import upstream_body as cascade_upstream_body
from routing.errors import (
    BadRequest,
    GatewayError,
    InsufficientCredit,
    NoCapacity,
    RateLimited,
    Unavailable,
    UpstreamFailed,
)
from routing.gateway.auth import KeyInfo
from routing.gateway.conf import hot
from routing.gateway.h1 import Response, UpstreamError, UpstreamProtocolError
from routing.gateway.http import Send, send_json, send_sse, start_sse
from routing.gateway.upstream import UpstreamPool, check_literal, upstream_headers
from routing.live import LiveState, Reservation, Verdict
from routing.privacy import Redaction, StreamRestorer, restore_answer
from routing.router import Candidate
from routing.spool import Spool, settlement_record
from vendors.ssrf import UnsafeURLError

logger = logging.getLogger("switchyard.gateway")

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
VENDOR_AUTH_STATUS = frozenset({401, 403})


@dataclass
class Job:
    """One client request on its way through the gateway."""

    kind: str  # "chat" | "embeddings"
    request_id: str
    key: KeyInfo
    body: dict[str, Any]
    model: str
    upstream_path: str
    prompt_bound: int  # upper bound of the prompt's tokens
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    allow_fallbacks: bool = True
    affinity_key: str | None = None  # session affinity: where the serving endpoint is kept
    budget_lease: str = ""  # a leg of an orchestrated request draws on this budget hold first
    started: float = field(default_factory=time.monotonic)
    decision_trace: dict[str, Any] = field(default_factory=dict)
    tool: str | None = None  # the tool this request runs (POST /v1/tools/<name>, MCP)
    trace: dict[str, Any] | None = None  # the route trace, once the request is settled
    # Privacy guard: the placeholders to put back in the answer, and what to record.
    redaction: Redaction | None = None
    privacy: dict[str, Any] | None = None  # {"action": ..., "found": {kind: count}}
    # Under trusted_only, for a key that keeps content: the prompt in the guard's redacted
    # form, which the trace keeps instead of the one the vendor got.
    redacted_prompt: Any = None
    served: Served | None = None  # set once an answer was delivered and settled
    cache_status: str | None = None  # "miss" when the answer may be cached (a header)

    def event_extras(self) -> dict[str, Any]:
        """The usage event's privacy fields (kinds and counts only, never values)."""
        if not self.privacy:
            return {}
        found = self.privacy.get("found") or {}
        return {
            "priv": self.privacy.get("action", ""),
            "pfound": sum(found.values()),
            "pkinds": ",".join(sorted(found)),
        }


@dataclass
class Attempt:
    endpoint: str
    outcome: str
    status: int | None = None
    latency_ms: int = 0
    detail: str = ""
    price_input: int = 0
    price_output: int = 0
    endpoint_id: int | None = None
    vendor_fault: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "outcome": self.outcome,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "detail": self.detail,
            "quote": {"input": self.price_input, "output": self.price_output},
        }


@dataclass
class Served:
    candidate: Candidate
    reservation: Reservation
    prompt_tokens: int = 0
    completion_tokens: int = 0
    outcome: str = "success"
    cost: int = 0
    # The answer's last bytes, sent only after the settlement is recorded: a client never
    # sees a complete answer that was not charged (a crash in between loses the answer).
    final: Callable[[], Awaitable[None]] | None = None
    ttfb_ms: int | None = None
    # The completion's text, kept only for a key that opted in to storing content.
    completion: list[str] | None = None

    def charge(self) -> int:
        """The charge at the quoted price, never more than the hold the customer agreed to."""
        c = self.candidate
        full = request_cost(
            self.prompt_tokens, self.completion_tokens, c.price_input, c.price_output
        )
        self.cost = min(full, self.reservation.hold)
        return self.cost


class Retryable(Exception):
    def __init__(
        self, attempt: Attempt, *, vendor_fault: bool = True, retry_after: int = 0
    ) -> None:
        super().__init__(attempt.detail)
        self.attempt = attempt
        self.vendor_fault = vendor_fault
        self.retry_after = retry_after


class VendorRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_PERIOD_DAYS = {"daily": 1, "weekly": 7}


def period_start(period: str, now: datetime | None = None) -> datetime | None:
    """The start (UTC) of the current daily, weekly or monthly period; None for ``never``."""
    now = now or datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return midnight
    if period == "weekly":
        return midnight - timedelta(days=now.weekday())
    if period == "monthly":
        return midnight.replace(day=1)
    return None


_FOREVER_TTL = 400 * 24 * 3600  # a limit that never resets: its counter outlives any key


def period_bounds(period: str, now: datetime) -> tuple[str, datetime | None, datetime | None]:
    """The id of the period that holds ``now``, its start and its end (None: ``never``)."""
    start = period_start(period, now)
    if start is None:
        return "all", None, None
    if period == "monthly":
        end = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    else:
        end = start + timedelta(days=_PERIOD_DAYS[period])
    return f"{period[0]}{start:%Y%m%d}", start, end


class CurrentPeriods:
    """The id of the current credit-limit period and the seconds until it ends (+1 h, the
    TTL of its spend counter), each period's bounds kept until it ends.

    Every request asks twice (its key's credit-limit period and its organisation's month);
    the calendar arithmetic behind a fresh answer was 5 % of the gateway's CPU per request.
    A clock that steps outside the kept bounds (either way) recomputes them.
    """

    def __init__(self) -> None:
        self._bounds: dict[str, tuple[float, float, str]] = {}

    def __call__(self, period: str, now: float | None = None) -> tuple[str, int]:
        moment = time.time() if now is None else now
        kept = self._bounds.get(period)
        if kept is None or not kept[0] <= moment < kept[1]:
            ident, start, end = period_bounds(period, datetime.fromtimestamp(moment, UTC))
            if start is None or end is None:
                kept = (-math.inf, math.inf, ident)
            else:
                kept = (start.timestamp(), end.timestamp(), ident)
            self._bounds[period] = kept
        if kept[1] == math.inf:
            return kept[2], _FOREVER_TTL
        return kept[2], int(kept[1] - moment) + 3600


current_period = CurrentPeriods()


class Proxy:
    def __init__(
        self,
        live: LiveState,
        upstreams: UpstreamPool,
        *,
        load_balance: Any,
        load_key_spend: Any,
        spool: Spool | None = None,
        load_org_spend: Any = None,
    ) -> None:
        self._load_org_spend = load_org_spend
        self.spool = spool
        self.live = live
        self.upstreams = upstreams
        self._load_balance = load_balance
        self._load_key_spend = load_key_spend

    # --- reservation -----------------------------------------------------------------------

    async def _reserve(
        self, job: Job, candidate: Candidate, hold: int, attempt: int = 0
    ) -> tuple[Verdict, Reservation | None, int]:
        key = job.key
        period, ttl = current_period(key.credit_limit_period)
        org_period, org_ttl = current_period("monthly")
        for _ in range(4):
            result = await self.live.reserve(
                organization_id=key.organization_id,
                key_id=key.key_id,
                endpoint_id=candidate.endpoint.id,
                capacity=candidate.endpoint.capacity,
                hold=hold,
                lease=f"{job.request_id}:{os.urandom(4).hex()}",
                rate_limit_rpm=key.rate_limit_rpm,
                rate_limit_tpm=key.rate_limit_tpm,
                attempt=attempt,
                org_budget=key.org_budget,
                org_period=org_period,
                org_period_ttl=org_ttl,
                key_credit_limit=key.credit_limit,
                key_period=period,
                key_period_ttl=ttl,
                budget_lease=job.budget_lease,
            )
            if result.verdict is Verdict.CREDIT_UNKNOWN:
                version = await self.live.credit_version(key.organization_id)
                balance = await self._load_balance(key.organization_id)
                await self.live.init_credit(key.organization_id, balance, version)
                continue
            if result.verdict is Verdict.ORG_SPEND_UNKNOWN:
                spent = await self._load_org_spend(key.organization_id)
                await self.live.init_orgspend(key.organization_id, org_period, spent, org_ttl)
                continue
            if result.verdict is Verdict.KEY_SPEND_UNKNOWN:
                spent = await self._load_key_spend(key.key_id, key.credit_limit_period)
                await self.live.init_keyspend(key.key_id, period, spent, ttl)
                continue
            return result.verdict, result.reservation, result.retry_after
        raise Unavailable("the gateway could not initialise its credit state; nothing was charged")

    # --- the request ----------------------------------------------------------------------

    async def run(self, job: Job, candidates: list[Candidate], send: Send) -> None:
        attempts: list[Attempt] = []
        deadline = job.started + hot.GATEWAY_TOTAL_TIMEOUT
        last_error: GatewayError | None = None
        tried = 0
        for candidate in candidates:
            if tried and not job.allow_fallbacks:
                break
            if time.monotonic() >= deadline:
                last_error = UpstreamFailed(
                    "the request ran out of time across vendors", code="deadline_exceeded"
                )
                break
            hold = self._hold(job, candidate)
            try:
                verdict, reservation, retry_after = await self._reserve(
                    job, candidate, hold, attempt=tried
                )
            except aioredis.RedisError:
                raise Unavailable(
                    "the gateway cannot reach its state store; nothing was charged",
                    code="state_unavailable",
                ) from None
            refusal = _refusal(verdict, job, hold, retry_after)
            if refusal is not None:
                if tried:
                    # A vendor was called and failed before this hop was refused: the request
                    # is on record (its trace, the vendor's failure) like any other that failed.
                    attempts.append(
                        Attempt(
                            candidate.endpoint.full_slug,
                            f"skipped:{refusal.code}",
                            detail=refusal.message,
                            price_input=candidate.price_input,
                            price_output=candidate.price_output,
                        )
                    )
                    await self._record_failure(job, attempts, outcome=refusal.code)
                    refusal.headers["x-switchyard-attempts"] = str(tried)
                raise refusal
            if verdict is Verdict.RETRY_BUDGET:
                last_error = UpstreamFailed(
                    f"{last_error.message if last_error else 'the vendor failed'}; no retry: "
                    "the gateway's retry budget is spent (too many retries in flight)",
                    code="retry_budget_exhausted",
                )
                break
            if reservation is None:
                reason = {Verdict.FULL: "at_capacity", Verdict.CIRCUIT_OPEN: "circuit_open"}.get(
                    verdict, "cooling_down"
                )
                attempts.append(Attempt(candidate.endpoint.full_slug, f"skipped:{reason}"))
                continue
            tried += 1
            served = Served(candidate=candidate, reservation=reservation)
            try:
                await self._attempt(job, served, send, attempts)
            except Retryable as exc:
                metrics.FALLBACKS.labels(reason=exc.attempt.outcome).inc()
                exc.attempt.endpoint_id = candidate.endpoint.id
                exc.attempt.vendor_fault = exc.vendor_fault
                attempts.append(exc.attempt)
                retry_until = time.time() + exc.retry_after if exc.retry_after else 0.0
                await self.live.release(
                    reservation, vendor_failed=exc.vendor_fault, retry_until=retry_until
                )
                last_error = UpstreamFailed(f"the vendor failed: {exc.attempt.detail}")
                continue
            except VendorRefused as exc:
                # The vendor's words go to the client; the trace keeps them only for a key
                # opted in to content (a validation error may quote the prompt).
                detail = (
                    exc.message
                    if job.key.log_content
                    else f"HTTP {exc.status}: the vendor refused the request (its message went "
                    "to the client; traces keep it only for keys that keep content)"
                )
                attempts.append(
                    Attempt(candidate.endpoint.full_slug, "refused", exc.status, detail=detail)
                )
                await self.live.release(reservation, vendor_failed=None)
                await self._record_failure(job, attempts, outcome="rejected")
                raise BadRequest(
                    f"the vendor refused the request: {exc.message}",
                    code="upstream_rejected",
                    headers={"x-switchyard-attempts": str(tried)},
                ) from None
            except BaseException:
                # The client went away (or a bug): charge only what was delivered.
                await asyncio.shield(self._finish(job, served, attempts, vendor_failed=False))
                raise
            # The settlement is written to Redis before the answer's last bytes go to the
            # client (a client never holds a complete answer Redis was not sent), and its
            # reply is awaited after them: the answer does not wait for a Redis round trip.
            settlement = self._settle_now(
                job, served, attempts, vendor_failed=served.outcome != "success"
            )
            job.served = served
            try:
                if served.final is not None:
                    await served.final()
            except BaseException:
                await asyncio.shield(self._settled(job, served, settlement))
                raise
            await self._settled(job, served, settlement)
            endpoint = candidate.endpoint
            metrics.REQUESTS.labels(
                job.kind, endpoint.full_slug, endpoint.vendor_slug, served.outcome
            ).inc()
            metrics.LATENCY.labels(job.kind).observe(time.monotonic() - job.started)
            if served.ttfb_ms is not None:
                metrics.TTFT.labels(job.kind).observe(served.ttfb_ms / 1000)
            return
        await self._record_failure(job, attempts, outcome="failed")
        if last_error is None:
            last_error = NoCapacity(
                "every endpoint that serves this model is busy or unavailable right now; "
                "retry shortly",
                headers={"retry-after": "1"},
            )
        last_error.headers["x-switchyard-attempts"] = str(tried)  # vendors called, all failed
        raise last_error

    async def run_cascade(
        self,
        job: Job,
        tiers: tuple[CascadeTier, ...],
        cascade: CascadeTrace,
        send: Send,
    ) -> None:
        """Try tiers cheapest first; a tier's answer with low confidence escalates.

        Every tier that was called is a real, billed request (id ``<request id>-t<n>``);
        the answer the client gets carries the id of the leg that served it, whose trace
        shows the whole cascade. Non-final tiers run without streaming (their answer must be
        judged before anything reaches the client); an accepted answer is sent as one chunk
        when the client asked for a stream.
        """
        base = dict(job.decision_trace)
        # The last answer judged too unsure (an escalated leg, billed): served after all if
        # no later tier answers, rather than a paid-for answer thrown away and an error.
        kept: _Leg | None = None
        for tier in tiers:
            leg = replace(job, request_id=f"{job.request_id}-t{tier.index}")
            leg.decision_trace = {**base, "cascade": cascade.to_trace()}
            if tier.final:
                cascade.judge(tier, tier.primary.endpoint, None)  # records "final"
                leg.decision_trace = {**base, "cascade": cascade.to_trace()}
                started = _Started(send)
                try:
                    await self.run(leg, list(tier.candidates), started)
                except GatewayError as exc:
                    if kept is None or started.started:
                        raise
                    cascade.fell_back(tier, kept.tier, kept.endpoint, exc.code)
                    await self._serve_leg(job, kept, base, cascade, send)
                return
            leg.body = cascade_upstream_body(job.body)
            leg.body["stream"] = False  # judged whole before anything reaches the client
            leg.body.pop("stream_options", None)
            leg.stream, leg.include_usage = False, False
            capture = Capture()
            try:
                await self.run(leg, list(tier.candidates), capture)
            except (InsufficientCredit, RateLimited, Unavailable) as exc:
                if kept is None:
                    raise
                cascade.fell_back(tier, kept.tier, kept.endpoint, exc.code)
                await self._serve_leg(job, kept, base, cascade, send)
                return
            except GatewayError:
                cascade.failed(tier)
                continue
            answer = orjson.loads(capture.body)
            endpoint = next(
                (
                    c.endpoint
                    for c in tier.candidates
                    if c.endpoint.full_slug == answer.get("switchyard", {}).get("endpoint")
                ),
                tier.primary.endpoint,
            )
            done = _Leg(leg, tier, endpoint, answer, capture)
            if cascade.judge(tier, endpoint, confidence_from_response(answer)):
                kept = done
                continue  # escalate: this leg stays billed, the next tier answers
            await self._serve_leg(job, done, base, cascade, send)
            return
        raise UpstreamFailed("every tier of the cascade failed")  # the last tier is final

    async def _serve_leg(
        self,
        job: Job,
        done: _Leg,
        base: dict[str, Any],
        cascade: CascadeTrace,
        send: Send,
    ) -> None:
        """Send a judged cascade leg's answer to the client; its trace gets the whole cascade."""
        leg, answer = done.leg, done.answer
        try:
            leg_trace = await self.live.trace(leg.request_id)
            if leg_trace is not None:
                leg_trace["routing"] = {**base, "cascade": cascade.to_trace()}
                await self.live.store_trace(leg.request_id, leg_trace)
        except aioredis.RedisError:
            # The leg is billed (its settlement is in Redis or the spool): the customer gets
            # the answer paid for; its trace keeps the cascade as it stood when it settled.
            logger.warning("cascade trace not rewritten for %s: Redis is away", leg.request_id)
        if not job.body.get("logprobs"):
            strip_logprobs(answer)
        answer["switchyard"]["cascade"] = cascade.to_trace()
        if job.stream:
            await start_sse(send, leg.request_id, done.capture.route_headers())
            await send_sse(send, b"data: " + orjson.dumps(_as_chunk(answer)) + b"\n\n")
            tail = (
                b"data: " + orjson.dumps(_usage_chunk(answer)) + b"\n\n"
                if job.include_usage
                else b""
            )
            await send_sse(send, tail + b"data: [DONE]\n\n", more=False)
        else:
            await send_json(send, 200, answer, leg.request_id, done.capture.route_headers())

    def _hold(self, job: Job, candidate: Candidate) -> int:
        if job.kind == "embeddings":
            return request_cost(job.prompt_bound, 0, candidate.price_input, candidate.price_output)
        max_tokens = job.max_tokens or min(
            hot.GATEWAY_DEFAULT_MAX_TOKENS, candidate.endpoint.context_length
        )
        return request_cost(
            job.prompt_bound, max_tokens, candidate.price_input, candidate.price_output
        )

    # --- settlement -----------------------------------------------------------------------

    def _trace(
        self, job: Job, attempts: list[Attempt], served: Served | None, outcome: str
    ) -> dict[str, Any]:
        trace = {
            "id": job.request_id,
            "organization_id": job.key.organization_id,
            "key_prefix": job.key.prefix,
            "kind": job.kind,
            "model": job.model,
            "tags": _requested_tags(job.model),
            "stream": job.stream,
            "created": datetime.now(UTC).isoformat(),
            "routing": job.decision_trace,
            "attempts": [a.as_dict() for a in attempts],
            "outcome": outcome,
            "served_by": served.candidate.endpoint.full_slug if served else None,
            "tokens": {
                "prompt": served.prompt_tokens if served else 0,
                "completion": served.completion_tokens if served else 0,
            },
            "cost_nanos": served.cost if served else 0,
            "latency_ms": int((time.monotonic() - job.started) * 1000),
            "privacy": job.privacy,
        }
        if job.tool is not None:
            trace["tool"] = job.tool
        if job.key.log_content:
            trace["content"] = _content_trace(job, served)
        job.trace = trace
        return trace

    async def _finish(
        self, job: Job, served: Served, attempts: list[Attempt], *, vendor_failed: bool
    ) -> None:
        await self._settled(job, served, self._settle_now(job, served, attempts, vendor_failed))

    def _settle_now(
        self, job: Job, served: Served, attempts: list[Attempt], vendor_failed: bool
    ) -> tuple[Awaitable[Any] | None, dict[str, Any] | None]:
        """Write the settlement to Redis now; ``_settled`` awaits it (the answer goes between).

        Returns the pending result (None: Redis refused it at once) and the usage event.
        """
        delivered = served.outcome in ("success", "partial")
        cost = served.cost if delivered else 0
        served.cost = cost
        candidate = served.candidate
        event = None
        if delivered:
            event = {
                "rid": job.request_id,
                "org": job.key.organization_id,
                "key": job.key.key_id,
                "ep": candidate.endpoint.id,
                "vendor": candidate.endpoint.vendor_id,
                "model": job.model,
                "kind": job.kind,
                "pt": served.prompt_tokens,
                "ct": served.completion_tokens,
                "pin": candidate.price_input,
                "pout": candidate.price_output,
                "cost": cost,
                "ms": int((time.monotonic() - job.started) * 1000),
                "att": len([a for a in attempts if not a.outcome.startswith("skipped")]),
                "out": served.outcome,
                "stream": job.stream,
                "tag": _first_tag(job.model),
                "fail_eps": _failed_endpoints(attempts),
                "at": time.time_ns() // 1_000_000,  # epoch milliseconds, an integer
                **job.event_extras(),
            }
        last = attempts[-1] if attempts else None
        try:
            pending = self.live.settle_now(
                served.reservation,
                cost=cost,
                vendor_failed=vendor_failed,
                latency_ms=(
                    served.ttfb_ms
                    if served.ttfb_ms is not None
                    else (last.latency_ms if last else None)
                ),
                event=event,
                request_id=job.request_id,
                trace=self._trace(job, attempts, served, served.outcome),
                tokens=served.prompt_tokens + served.completion_tokens if delivered else 0,
                completion_tokens=served.completion_tokens if delivered else 0,
                affinity_key=job.affinity_key,
            )
        except aioredis.RedisError:
            pending = None
        return pending, event

    async def _settled(
        self,
        job: Job,
        served: Served,
        settlement: tuple[Awaitable[Any] | None, dict[str, Any] | None],
    ) -> None:
        pending, event = settlement
        try:
            if pending is None:
                raise aioredis.ConnectionError("Redis refused the settlement")
            await pending
        except aioredis.RedisError:
            # The customer was served; Redis is away. Keep the settlement on local disk
            # (the replayer applies it when Redis is back), never lose the usage.
            if self.spool is None:
                raise
            reservation = served.reservation
            self.spool.append(
                settlement_record(job.request_id, reservation, served.cost, event, job.trace)
            )

    async def _record_failure(self, job: Job, attempts: list[Attempt], *, outcome: str) -> None:
        """A request no vendor answered: no charge, but the customer sees it on dashboards."""
        event = {
            "rid": job.request_id,
            "org": job.key.organization_id,
            "key": job.key.key_id,
            "ep": None,
            "vendor": None,
            "model": job.model,
            "kind": job.kind,
            "pt": 0,
            "ct": 0,
            "pin": 0,
            "pout": 0,
            "cost": 0,
            "ms": int((time.monotonic() - job.started) * 1000),
            "att": len([a for a in attempts if not a.outcome.startswith("skipped")]),
            "out": "failed",
            "stream": job.stream,
            "tag": _first_tag(job.model),
            "fail_eps": _failed_endpoints(attempts),
            "at": time.time_ns() // 1_000_000,  # epoch milliseconds, an integer
            **job.event_extras(),
        }
        with contextlib.suppress(aioredis.RedisError):
            # Nothing was charged; losing a failure record is acceptable.
            await self.live.emit(
                event=event,
                request_id=job.request_id,
                trace=self._trace(job, attempts, None, outcome),
            )

    # --- one attempt ----------------------------------------------------------------------

    async def _attempt(self, job: Job, served: Served, send: Send, attempts: list[Attempt]) -> None:
        endpoint = served.candidate.endpoint
        body = dict(job.body)
        body["model"] = endpoint.upstream_model
        for routing_only in ("provider", "models", "route", "cascade", "session_id", "cache"):
            body.pop(routing_only, None)
        if job.kind == "chat":
            body.pop("max_completion_tokens", None)
            body["max_tokens"] = job.max_tokens or min(
                hot.GATEWAY_DEFAULT_MAX_TOKENS, endpoint.context_length
            )
            if job.stream:
                body["stream_options"] = {"include_usage": True}
        url = f"{endpoint.base_url}{job.upstream_path}"
        t0 = time.monotonic()
        attempt = Attempt(
            endpoint.full_slug,
            "error",
            price_input=served.candidate.price_input,
            price_output=served.candidate.price_output,
        )
        remaining = job.started + hot.GATEWAY_TOTAL_TIMEOUT - t0
        try:
            check_literal(url)
            # asyncio.timeout, not wait_for: no extra task per request on the hot path.
            async with asyncio.timeout(min(hot.GATEWAY_FIRST_BYTE_TIMEOUT, max(remaining, 0.01))):
                response = await self.upstreams.post(
                    url, orjson.dumps(body), upstream_headers(endpoint.secret, job.request_id)
                )
        except UnsafeURLError as exc:
            attempt.outcome, attempt.detail = "refused", f"refused by the outbound guard: {exc}"
            raise Retryable(attempt) from None
        except TimeoutError:
            attempt.outcome, attempt.detail = "timeout", "no answer before the first-byte deadline"
            raise Retryable(attempt) from None
        except UpstreamError as exc:
            attempt.outcome = "connect_error"
            attempt.detail = f"cannot reach the vendor ({type(exc).__name__})"
            raise Retryable(attempt) from None
        attempt.status = response.status
        served.ttfb_ms = int((time.monotonic() - t0) * 1000)
        try:
            if response.status != 200:
                text = (await response.read(4096)).decode("utf-8", "replace")
                attempt.latency_ms = int((time.monotonic() - t0) * 1000)
                if response.status in RETRYABLE_STATUS or response.status >= 500:
                    attempt.outcome, attempt.detail = "http_error", f"HTTP {response.status}"
                    retry_after = _retry_after(response.headers.get("retry-after"))
                    raise Retryable(attempt, retry_after=retry_after)
                if response.status in VENDOR_AUTH_STATUS or 300 <= response.status < 400:
                    attempt.outcome, attempt.detail = (
                        "http_error",
                        f"HTTP {response.status} (vendor misconfigured)",
                    )
                    raise Retryable(attempt)
                raise VendorRefused(response.status, _vendor_error_message(text))
            if job.stream:
                await self._relay_stream(job, response, served, send, attempt, attempts, t0)
            else:
                await self._relay_json(job, response, served, send, attempt, attempts, t0)
        finally:
            response.release()

    async def _relay_json(
        self,
        job: Job,
        response: Response,
        served: Served,
        send: Send,
        attempt: Attempt,
        attempts: list[Attempt],
        t0: float,
    ) -> None:
        limit = hot.GATEWAY_MAX_UPSTREAM_BODY_BYTES
        remaining = max(job.started + hot.GATEWAY_TOTAL_TIMEOUT - time.monotonic(), 0.01)
        try:
            async with asyncio.timeout(remaining):
                raw = await response.read(limit + 1)
        except (TimeoutError, UpstreamError) as exc:
            attempt.outcome, attempt.detail = (
                "read_error",
                f"the answer broke off ({type(exc).__name__})",
            )
            raise Retryable(attempt) from None
        if len(raw) > limit:
            attempt.outcome, attempt.detail = "invalid", "the answer is larger than the limit"
            raise Retryable(attempt)
        try:
            body = orjson.loads(raw)
            usage = body["usage"]
            prompt_tokens = int(usage["prompt_tokens"])
            completion_tokens = int(usage.get("completion_tokens") or 0)
            items = body["choices"] if job.kind == "chat" else body["data"]
            if not isinstance(items, list) or prompt_tokens < 0 or completion_tokens < 0:
                raise ValueError("bad shape")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            attempt.outcome, attempt.detail = (
                "invalid",
                "the vendor's answer is not valid for the API",
            )
            raise Retryable(attempt) from None
        attempt.outcome = "success"
        attempt.latency_ms = int((time.monotonic() - t0) * 1000)
        attempts.append(attempt)
        if job.key.log_content and job.kind == "chat":
            served.completion = [_message_text(items)]  # as the vendor wrote it
        if job.redaction is not None and job.kind == "chat" and job.privacy is not None:
            job.privacy["restored"] = restore_answer(body, job.redaction)
        served.prompt_tokens, served.completion_tokens = prompt_tokens, completion_tokens
        cost = served.charge()
        endpoint = served.candidate.endpoint
        if job.kind == "chat":
            body["id"] = job.request_id
        body["model"] = endpoint.full_slug
        body.pop("timings", None)
        usage["cost"] = cost / NANOS_PER_USD
        usage["cost_nanos"] = cost
        body["switchyard"] = {
            "request_id": job.request_id,
            "vendor": endpoint.vendor_slug,
            "endpoint": endpoint.full_slug,
            "attempts": len([a for a in attempts if not a.outcome.startswith("skipped")]),
        }
        headers = route_headers(job, served, attempts)

        async def final() -> None:
            await send_json(send, 200, body, job.request_id, headers)

        served.final = final

    async def _relay_stream(
        self,
        job: Job,
        response: Response,
        served: Served,
        send: Send,
        attempt: Attempt,
        attempts: list[Attempt],
        t0: float,
    ) -> None:
        started_client = False
        id_from, id_to = b"", b""
        usage_chunk: dict[str, Any] | None = None
        chunks_sent = 0
        deadline = job.started + hot.GATEWAY_TOTAL_TIMEOUT
        line_limit = hot.GATEWAY_MAX_UPSTREAM_BODY_BYTES
        received = 0
        restorer = job.redaction.stream() if job.redaction is not None else None
        last_chunk: dict[str, Any] | None = None
        completion = served.completion = [] if job.key.log_content else None
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                while True:
                    line = await response.readline()
                    if not line:
                        raise UpstreamProtocolError("the stream ended without [DONE]")
                    received += len(line)
                    if received > line_limit:
                        raise ValueError("the stream is larger than the limit")
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        # What may follow is the chunked body's closing chunk: the connection
                        # waits for it and is reused (h1's drain), not closed.
                        response.end_seen = True
                        break
                    chunk = None
                    # Upstreams send "usage":null on every chunk once usage is asked for: parse
                    # only the chunk that carries an object.
                    if b'"usage":{' in data or b'"usage": {' in data:
                        chunk = orjson.loads(data)
                        if isinstance(chunk.get("usage"), dict) and not chunk.get("choices"):
                            usage_chunk = chunk
                            continue
                    if completion is not None:  # opted in: keep the text as the vendor wrote it
                        # A chunk that is not JSON is relayed as it came, as without logging:
                        # keeping the text must not change the outcome or the charge.
                        with contextlib.suppress(orjson.JSONDecodeError):
                            chunk = chunk or orjson.loads(data)
                            completion.append(_delta_text(chunk))
                    if restorer is not None:
                        chunk = chunk or orjson.loads(data)
                        data, last_chunk = _restore_chunk(chunk, restorer), chunk
                    if not started_client:
                        if chunk is None:  # the first chunk must be JSON before we commit
                            chunk = orjson.loads(data)
                        # Chunks carry our request id, not the vendor's: the vendor's id is
                        # replaced as bytes (one search per chunk, no JSON round trip).
                        vendor_id = chunk.get("id") if isinstance(chunk, dict) else None
                        if isinstance(vendor_id, str) and vendor_id:
                            id_from = orjson.dumps(vendor_id)
                            id_to = orjson.dumps(job.request_id)
                        await start_sse(
                            send, job.request_id, route_headers(job, served, [*attempts, attempt])
                        )
                        started_client = True
                    if id_from:
                        data = data.replace(id_from, id_to, 1)
                    await send_sse(send, b"data: " + data + b"\n\n")
                    chunks_sent += 1
        except (TimeoutError, UpstreamError, orjson.JSONDecodeError, ValueError) as exc:
            attempt.outcome = "stream_broken"
            attempt.detail = f"the stream broke off ({type(exc).__name__})"
            attempt.latency_ms = int((time.monotonic() - t0) * 1000)
            if not started_client:
                raise Retryable(attempt) from None
            attempts.append(attempt)
            served.outcome = "partial"
            served.prompt_tokens = job.prompt_bound
            served.completion_tokens = chunks_sent
            served.charge()
            error = {
                "error": {
                    "message": "the vendor's stream broke off; you are charged only for the "
                    "tokens you received",
                    "type": "upstream_error",
                    "code": "stream_interrupted",
                }
            }
            await send_sse(send, b"data: " + orjson.dumps(error) + b"\n\n", more=False)
            return
        attempt.outcome = "success"
        attempt.latency_ms = int((time.monotonic() - t0) * 1000)
        attempts.append(attempt)
        if usage_chunk is not None:
            u = usage_chunk["usage"]
            served.prompt_tokens = int(u.get("prompt_tokens", job.prompt_bound))
            served.completion_tokens = int(u.get("completion_tokens", chunks_sent))
        else:
            served.prompt_tokens, served.completion_tokens = job.prompt_bound, chunks_sent
        cost = served.charge()
        if not started_client:
            await start_sse(send, job.request_id, route_headers(job, served, attempts))
        tail = b""
        if restorer is not None and restorer.pending:
            # A held-back tail that never became a placeholder: send it as it was.
            rest = {
                **(last_chunk or {"object": "chat.completion.chunk"}),
                "choices": [{"index": 0, "delta": {"content": restorer.flush()}}],
            }
            tail += b"data: " + orjson.dumps(rest) + b"\n\n"
        if job.include_usage:
            endpoint = served.candidate.endpoint
            final = usage_chunk or {"object": "chat.completion.chunk", "choices": [], "usage": {}}
            final["id"] = job.request_id
            final["model"] = endpoint.full_slug
            final["usage"].update(
                prompt_tokens=served.prompt_tokens,
                completion_tokens=served.completion_tokens,
                total_tokens=served.prompt_tokens + served.completion_tokens,
                cost=cost / NANOS_PER_USD,
                cost_nanos=cost,
            )
            final["switchyard"] = {
                "request_id": job.request_id,
                "vendor": endpoint.vendor_slug,
                "endpoint": endpoint.full_slug,
            }
            tail += b"data: " + orjson.dumps(final) + b"\n\n"

        async def send_tail() -> None:
            await send_sse(send, tail + b"data: [DONE]\n\n", more=False)

        served.final = send_tail


@dataclass
class _Leg:
    """A cascade leg that answered: its job, tier, serving endpoint and captured answer."""

    leg: Job
    tier: CascadeTier
    endpoint: Any
    answer: dict[str, Any]
    capture: Capture


class _Started:
    """A ``send`` that remembers whether the response has begun (then nothing else may)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: dict[str, Any]) -> None:
        self.started = True
        await self._send(message)


@dataclass
class Capture:
    """A ``send`` that keeps a JSON answer instead of sending it (cascade legs)."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def route_headers(self) -> dict[str, str]:
        return {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in self.headers
            if k.startswith(b"x-switchyard-") or k.startswith(b"x-ratelimit-")
        }


def _as_chunk(answer: dict[str, Any]) -> dict[str, Any]:
    choice = answer["choices"][0] if answer.get("choices") else {}
    return {
        "id": answer.get("id"),
        "object": "chat.completion.chunk",
        "created": answer.get("created", int(time.time())),
        "model": answer.get("model"),
        "choices": [
            {
                "index": 0,
                "delta": {
                    "role": "assistant",
                    "content": (choice.get("message") or {}).get("content"),
                },
                "finish_reason": choice.get("finish_reason"),
            }
        ],
    }


def _usage_chunk(answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": answer.get("id"),
        "object": "chat.completion.chunk",
        "model": answer.get("model"),
        "choices": [],
        "usage": answer.get("usage"),
        "switchyard": answer.get("switchyard"),
    }


def _restore_chunk(chunk: dict[str, Any], restorer: StreamRestorer) -> bytes:
    """A stream chunk with the redacted values put back in its text."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            delta["content"] = restorer.feed(delta["content"])
    return orjson.dumps(chunk)


#: Characters of a prompt or completion kept in a trace (a key opted in to content).
CONTENT_LIMIT = 32_768


def _message_text(choices: Any) -> str:
    """The first choice's message text of a chat answer ("" when it has none)."""
    try:
        content = choices[0]["message"]["content"]
    except (IndexError, KeyError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def _delta_text(chunk: Any) -> str:
    """The first choice's text delta of a stream chunk ("" when it has none)."""
    try:
        content = chunk["choices"][0]["delta"].get("content")
    except (IndexError, KeyError, TypeError, AttributeError):
        return ""
    return content if isinstance(content, str) else ""


def _clipped(text: str) -> dict[str, Any]:
    return {"text": text[:CONTENT_LIMIT], "truncated": len(text) > CONTENT_LIMIT}


def _content_trace(job: Job, served: Served | None) -> dict[str, Any]:
    """What a key that opted in keeps: the prompt as sent to the vendor (after the privacy
    guard's redaction) and the completion as the vendor wrote it, each clipped.

    Under ``trusted_only``, when the guard found personal data, the vendor got the values
    but Switchyard keeps none of them: the prompt in the guard's redacted form, and no
    completion (a vendor that saw the values may repeat them in any form)."""
    if job.privacy is not None and job.privacy.get("action") == "trusted_only":
        redacted = job.redacted_prompt
        return {
            "prompt": _clipped(orjson.dumps(redacted).decode()) if redacted is not None else None,
            "completion": None,
            "note": "personal data went to a trusted endpoint only (trusted_only): the prompt "
            "is kept redacted, the completion is not kept",
        }
    prompt = job.body.get("messages", job.body.get("input"))
    completion = "".join(served.completion) if served and served.completion else ""
    return {
        "prompt": _clipped(orjson.dumps(prompt).decode()),
        "completion": _clipped(completion) if served is not None else None,
    }


def _refusal(verdict: Verdict, job: Job, hold: int, retry_after: int) -> GatewayError | None:
    """The error that ends a request whose reservation the customer's limits refused."""
    if verdict is Verdict.NO_CREDIT:
        return InsufficientCredit(
            "your organisation's credit does not cover this request (up to "
            f"${hold / NANOS_PER_USD:.6f} at the quoted price); top up or lower max_tokens"
        )
    if verdict is Verdict.ORG_BUDGET:
        return InsufficientCredit(
            "your organisation has reached its monthly budget; an owner or billing "
            "member can raise it in the console",
            code="organization_budget",
        )
    if verdict is Verdict.KEY_LIMIT:
        return InsufficientCredit(
            "this API key has reached its credit limit for the period",
            code="key_credit_limit",
        )
    if verdict is Verdict.RATE_LIMITED:
        return RateLimited(
            "rate limit reached for this API key; retry after the window resets",
            headers={
                "retry-after": str(retry_after),
                "x-ratelimit-limit-requests": str(job.key.rate_limit_rpm or 0),
                "x-ratelimit-limit-tokens": str(job.key.rate_limit_tpm or 0),
            },
        )
    return None


def _first_tag(model: str) -> str | None:
    tags = _requested_tags(model)
    return tags[0] if tags else None


def _failed_endpoints(attempts: list[Attempt]) -> list[int]:
    """Endpoints whose attempt failed through the vendor's fault (observed quality)."""
    return [a.endpoint_id for a in attempts if a.vendor_fault and a.endpoint_id is not None]


def _requested_tags(model: str) -> list[str]:
    if model.startswith("tag:"):
        return [t for t in model[4:].split(":")[0].split("+") if t]
    return []


def _retry_after(value: str | None) -> int:
    """Retry-After in whole seconds (its HTTP form), at most 300; 0 when absent or a date."""
    value = (value or "").strip()
    return min(int(value), 300) if value.isdigit() else 0


def _vendor_error_message(text: str) -> str:
    try:
        parsed = orjson.loads(text)
        message = parsed.get("error", {}).get("message")
        if isinstance(message, str):
            return message[:500]
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return text[:200] or "no details"


def route_headers(job: Job, served: Served, attempts: list[Attempt]) -> dict[str, str]:
    candidate = served.candidate
    headers = {
        "x-switchyard-vendor": candidate.endpoint.vendor_slug,
        "x-switchyard-endpoint": candidate.endpoint.full_slug,
        "x-switchyard-price": (
            f"input={candidate.price_input};output={candidate.price_output};unit=nano-usd-per-1m"
        ),
        "x-switchyard-attempts": str(
            len([a for a in attempts if not a.outcome.startswith("skipped")])
        ),
    }
    if job.cache_status is not None:
        headers["x-switchyard-cache"] = job.cache_status
    if job.key.rate_limit_rpm:
        headers["x-ratelimit-limit-requests"] = str(job.key.rate_limit_rpm)
        headers["x-ratelimit-remaining-requests"] = str(
            max(served.reservation.ratelimit_remaining, 0)
        )
    if job.key.rate_limit_tpm:
        headers["x-ratelimit-limit-tokens"] = str(job.key.rate_limit_tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(served.reservation.tokens_remaining, 0))
    return headers
