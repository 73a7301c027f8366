"""The gateway's ASGI application: the OpenAI-compatible ``/v1`` API.

One request: authenticate the key (in-process cache) -> read and validate the body ->
route over the in-memory snapshot and live numbers (no I/O) -> ``Proxy.run``: reserve in
Redis (one round trip), call the vendor over the process's HTTP/1.1 pool, fall back on
failure, settle (one round trip). No database query in steady state: the routing table
and keys are loaded once and refreshed through Redis pub/sub; live numbers are refreshed
in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings
from django.db import connection

from billing.credit import USAGE_STREAM
from billing.selectors import organization_balance_by_id, spend_since
from marketplace import invalidation
from marketplace.client_ip import client_ip
from marketplace.logs import accept_request_id, request_id_var
from routing import metrics, privacy
from routing.auto import Classification, TagClassifier, classifier_from_db, prompt_text
from routing.cache import (
    CacheHit,
    CacheKeys,
    CacheRequest,
    ResponseCache,
    cache_request,
    deterministic,
)
from routing.cascade import CascadeTrace, parse_cascade, plan_tiers, without_cascade
from routing.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    Unavailable,
)
from routing.gateway import openapi
from routing.gateway.auth import KeyCache, KeyInfo
from routing.gateway.auth_limit import AuthFailureLimiter
from routing.gateway.cached import AnswerTee, entry_from_answer, send_hit
from routing.gateway.conf import hot
from routing.gateway.db import off_loop
from routing.gateway.gcpause import GcFreezer
from routing.gateway.http import (
    ClientGone,
    Receive,
    Scope,
    Send,
    read_body,
    request_headers,
    send_json,
)
from routing.gateway.idempotency import Idempotency, Recorder, check_key, replay
from routing.gateway.mcp_server import McpToolServer
from routing.gateway.orchestrate import Orchestration
from routing.gateway.proxy import Job, Proxy, period_start
from routing.gateway.tools import TOOLS_PREFIX, run_tool, tool_call_fields
from routing.gateway.upstream import UpstreamPool
from routing.gateway.validate import (
    ChatRequest,
    chat_request,
    embeddings_request,
    parse_json,
)
from routing.live import (
    TRACE_STREAM,
    EndpointNumbers,
    LiveCache,
    LiveConfig,
    LiveState,
    affinity_key,
)
from routing.orchestrate import ORCHESTRATE, TIMEOUT_CEILING_SECONDS
from routing.policy import RoutePolicy, provider_trace, request_parameters, route_policy
from routing.resp import RespClient
from routing.router import (
    EXPLORE_SHARE,
    MAX_CANDIDATES,
    RouteDecision,
    plan_route,
    prepare_snapshot,
)
from routing.scoring import EndpointLive, LiveView
from routing.snapshot import Snapshot, load_snapshot
from routing.spool import Spool, SpoolReplayer
from routing.tools import ToolCatalog
from routing.traces import stored_trace

logger = logging.getLogger("switchyard.gateway")

# Chat templates add a few tokens per message around the content; the hold must cover them.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_BASE = 16
DECISION_CACHE_SIZE = 4096
# When the copy of the live numbers counts every endpoint full, this many of them are tried
# anyway (see ``run_job``): reserve counts their slots atomically.
CAPACITY_RECHECK = 2


class GatewayApp:
    def __init__(self) -> None:
        self.keys = KeyCache(ttl=settings.GATEWAY_KEY_CACHE_SECONDS)
        self.upstreams = UpstreamPool()
        self._snapshot: Snapshot | None = None
        self._snapshot_at = 0.0
        self._snapshot_lock: asyncio.Lock | None = None
        self._snapshot_reload: asyncio.Task[None] | None = None
        self._reload_again = False
        self._quality_reload: asyncio.Task[None] | None = None
        self._snapshot_announced = 0  # SNAPSHOT messages received (see _reload_snapshot)
        self._redis: aioredis.Redis | None = None
        self.live: LiveState | None = None
        self.live_cache: LiveCache | None = None
        self.proxy: Proxy | None = None
        self.idempotency: Idempotency | None = None
        self.cache: ResponseCache | None = None
        self.auth_limiter: AuthFailureLimiter | None = None
        self.live_view = LiveView()
        self._live_made: dict[int, tuple[EndpointNumbers, EndpointLive]] = {}
        self._live_timed: set[int] = set()  # endpoints whose circuit is open or half-open
        # Route decisions shared by identical requests within one live-numbers epoch.
        self._decisions: dict[Any, tuple[RouteDecision, dict[str, Any]]] = {}
        self._decisions_snapshot: Snapshot | None = None
        self._decisions_view: LiveView | None = None
        self._classifier: TagClassifier | None = None
        self._tools: tuple[Snapshot, ToolCatalog] | None = None
        self._mcp_server: McpToolServer | None = None
        self._classifier_lock = asyncio.Lock()
        self.spool = Spool(Path(settings.SWITCHYARD_SPOOL_DIR))
        self.spool_replayer: SpoolReplayer | None = None
        self._listener: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resp: RespClient | None = None
        self.gc = GcFreezer(
            enabled=settings.GATEWAY_GC_FREEZE,
            refreeze_after=settings.GATEWAY_GC_REFREEZE_AFTER,
            young_threshold=settings.GATEWAY_GC_YOUNG_THRESHOLD,
        )

    # --- lifecycle ------------------------------------------------------------------------

    def _ensure_loop_state(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop = loop
        self._mcp_server = None  # its session manager's task lived on the previous loop
        # A blocking pool: under a burst, requests wait for a connection rather than fail;
        # no socket_timeout, which would wrap every command in an extra task.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL,
            max_connections=settings.GATEWAY_REDIS_MAX_CONNECTIONS,
            timeout=5,
            socket_connect_timeout=2,
            health_check_interval=30,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._resp = RespClient(settings.REDIS_URL, connect_timeout=2)
        self.live = LiveState(
            self._redis,
            LiveConfig(
                circuit_threshold=settings.GATEWAY_CIRCUIT_FAILURES,
                circuit_cooldown=settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS,
                retry_budget_ratio=settings.GATEWAY_RETRY_BUDGET_RATIO,
                retry_budget_min=settings.GATEWAY_RETRY_BUDGET_MIN,
                lease_ttl=settings.GATEWAY_LEASE_SECONDS,
                trace_ttl=settings.GATEWAY_TRACE_TTL_SECONDS,
                trace_stream_maxlen=settings.GATEWAY_TRACE_STREAM_MAXLEN,
            ),
            fast=self._resp,
        )
        self.live_cache = LiveCache(
            self._redis,
            interval=settings.GATEWAY_LIVE_REFRESH_SECONDS,
            on_refresh=self._rebuild_live_view,
            full_every=settings.GATEWAY_LIVE_FULL_REFRESH_SECONDS,
            skew=settings.GATEWAY_LIVE_CLOCK_SKEW_SECONDS,
        )
        self.live_cache.start()
        self.proxy = Proxy(
            self.live,
            self.upstreams,
            load_balance=off_loop(organization_balance_by_id),
            load_key_spend=off_loop(_key_spend),
            load_org_spend=off_loop(_org_month_spend),
            spool=self.spool,
        )
        self.spool_replayer = SpoolReplayer(self.spool, self._redis, config=self.live.config)
        self.spool_replayer.start()
        self.idempotency = Idempotency(
            self._redis,
            running_ttl=max(settings.GATEWAY_LEASE_SECONDS, TIMEOUT_CEILING_SECONDS) + 60,
        )
        self.cache = ResponseCache(
            self._redis, semantic_entries=settings.GATEWAY_CACHE_SEMANTIC_ENTRIES
        )
        self.auth_limiter = AuthFailureLimiter(self._redis)
        self._snapshot_lock = asyncio.Lock()
        self._listener = loop.create_task(self._listen_for_invalidations())
        self._sweeper = loop.create_task(self._sweep_holds())

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._ensure_loop_state()
                except Exception as exc:  # pragma: no cover - reported to the server
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self.gc.at_startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        if self._mcp_server is not None:
            await self._mcp_server.stop()
            self._mcp_server = None
        for task in (self._listener, self._sweeper, self._snapshot_reload, self._quality_reload):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.live_cache is not None:
            await self.live_cache.stop()
        if self.spool_replayer is not None:
            await self.spool_replayer.stop()
        await self.upstreams.close()
        if self._redis is not None:
            await self._redis.aclose()
        if self._resp is not None:
            await self._resp.aclose()
        self._loop = None

    async def _listen_for_invalidations(self) -> None:
        """Drop cached keys and reload the routing table when the control plane says so."""
        assert self._redis is not None
        failing = False
        while True:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(invalidation.CHANNEL)
                failing = False
                # Anything published while we were not subscribed is lost: start afresh.
                self.keys.clear()
                self._snapshot_announced += 1
                self._snapshot_at = 0.0
                async for message in pubsub.listen():
                    data = message.get("data")
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    if text.startswith("key:"):
                        self.keys.forget(text[4:])
                    elif text == invalidation.QUALITY:
                        self._reload_in_background()
                    elif text == invalidation.SNAPSHOT:
                        self._snapshot_announced += 1
                        self._snapshot_at = 0.0
                        if self._classifier is not None:  # tag examples may have changed
                            self._classifier = await off_loop(classifier_from_db)(
                                previous=self._classifier
                            )
            except asyncio.CancelledError:
                raise
            except Exception:
                if not failing:
                    logger.warning("invalidation listener lost Redis; retrying", exc_info=True)
                failing = True
                await asyncio.sleep(0.5)

    def _rebuild_live_view(
        self, numbers: dict[int, EndpointNumbers], changed: frozenset[int] | None = None
    ) -> None:
        """Turn the live numbers into the router's view (once per refresh, not per request).

        ``changed``: the endpoints whose numbers were read (None: all of them). Only those,
        and the endpoints whose circuit is not closed (their view moves with the clock), are
        looked at again. An endpoint whose view did not move keeps its ``EndpointLive``, the
        router's arrays are patched for the others only, and when none moved the view stays
        the same object, so route decisions cached against it stay valid.
        """
        now = time.time()
        cooldown = settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS
        previous = self.live_view
        made = self._live_made
        if changed is None:
            table: dict[int, EndpointLive] = {}
            ids: Iterable[int] = numbers
            made = {}
            timed: set[int] = set()
        else:
            table = previous.as_dict()
            ids = changed | self._live_timed
            timed = self._live_timed - changed
        moved: set[int] = set()  # endpoints whose EndpointLive is not the previous one
        for endpoint_id in ids:
            n = numbers.get(endpoint_id)
            if n is None:
                if table.pop(endpoint_id, None) is not None:
                    moved.add(endpoint_id)
                made.pop(endpoint_id, None)
                timed.discard(endpoint_id)
                continue
            closed = n.circuit_opened_at is None and n.cooldown_until <= now
            if closed:
                kept = self._live_made.get(endpoint_id)
                if kept is not None and kept[0] == n:
                    table[endpoint_id] = kept[1]
                    made[endpoint_id] = kept
                    timed.discard(endpoint_id)
                    if previous.get(endpoint_id) is not kept[1]:
                        moved.add(endpoint_id)
                    continue
            circuit, trial = "closed", False
            if n.cooldown_until > now:
                circuit = "open"  # the vendor asked for quiet with Retry-After
            elif n.circuit_opened_at is not None:
                if now - n.circuit_opened_at < cooldown:
                    circuit = "open"
                else:
                    # The reserve script hands the single trial slot out atomically.
                    circuit, trial = "half_open", True
            live = EndpointLive(
                inflight=n.inflight,
                utilisation=n.utilisation,
                circuit=circuit,
                half_open_trial=trial,
                latency_ms=n.latency_ms,
                throughput_tps=n.throughput_tps,
                requests=n.requests,
                success_ratio=n.success_ratio,
            )
            old = previous.get(endpoint_id)
            if old is not None and old == live:
                live = old  # e.g. a circuit still open: same view, same object
            else:
                moved.add(endpoint_id)
            table[endpoint_id] = live
            if closed:  # only a closed circuit's view depends on the numbers alone
                made[endpoint_id] = (n, live)
                timed.discard(endpoint_id)
            else:
                made.pop(endpoint_id, None)
                timed.add(endpoint_id)
        if changed is None:
            moved.update(previous.keys() - table.keys())
        self._live_made = made
        self._live_timed = timed
        if moved:
            self.live_view = LiveView(table, since=previous, moved=moved)
        if self._snapshot is not None:
            self.live_view.prepare(self._snapshot)

    async def _sweep_holds(self) -> None:
        """Return the holds of requests whose gateway replica died (any replica may do it)."""
        assert self.live is not None
        while True:
            await asyncio.sleep(settings.GATEWAY_HOLD_SWEEP_SECONDS)
            try:
                returned = await self.live.sweep_holds()
                if returned:
                    logger.warning("returned %d expired hold(s) of a dead request", returned)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("hold sweep failed", exc_info=True)

    async def snapshot(self) -> Snapshot:
        refresh = hot.GATEWAY_SNAPSHOT_REFRESH_SECONDS
        if self._snapshot is not None and time.monotonic() - self._snapshot_at < refresh:
            return self._snapshot
        if self._snapshot is not None and self._snapshot_at:
            # Only the periodic refresh is due (an announced change zeroes _snapshot_at and
            # is loaded before answering): keep routing on this table while it reloads, so
            # no request waits for the database, nor for its timeout while it is away.
            if self._snapshot_reload is None or self._snapshot_reload.done():
                self._snapshot_reload = asyncio.get_running_loop().create_task(
                    self._reload_snapshot()
                )
            return self._snapshot
        await self._reload_snapshot()
        assert self._snapshot is not None
        return self._snapshot

    def _reload_in_background(self) -> None:
        """Reload the routing table without making any request wait (quality scores moved).

        Messages that arrive while a reload runs set ``_reload_again``: one more reload
        follows, however many arrived, so a burst of score changes costs two loads at most.
        """
        if self._snapshot is None:
            return  # nothing loaded yet: the next request loads the current table
        self._reload_again = True
        if self._quality_reload is None or self._quality_reload.done():
            self._quality_reload = asyncio.get_running_loop().create_task(
                self._reload_while_asked()
            )

    async def _reload_while_asked(self) -> None:
        while self._reload_again:
            self._reload_again = False
            await self._reload_snapshot(force=True)

    async def _reload_snapshot(self, *, force: bool = False) -> None:
        refresh = hot.GATEWAY_SNAPSHOT_REFRESH_SECONDS
        assert self._snapshot_lock is not None
        async with self._snapshot_lock:
            stale = time.monotonic() - self._snapshot_at >= refresh
            if force or self._snapshot is None or stale:
                announced = self._snapshot_announced
                try:
                    self._snapshot, catalog = await off_loop(_load_snapshot)()
                    self._tools = (self._snapshot, catalog)
                    if self.live_cache is not None:
                        self._rebuild_live_view(self.live_cache.numbers)
                except Exception:
                    if self._snapshot is None:
                        raise Unavailable("the routing table cannot be loaded") from None
                    # The database is away: keep serving the last routing table.
                    logger.warning("snapshot refresh failed; serving the cached one", exc_info=True)
                # A change announced while this load ran may be missing from what it read:
                # then the table stays due, and the next request loads it again.
                fresh = announced == self._snapshot_announced
                self._snapshot_at = time.monotonic() if fresh else 0.0

    async def authenticate(
        self, scope: Scope, headers: dict[str, str], api: str | None = None
    ) -> KeyInfo:
        """The caller's key, allowed to use ``api`` (its scopes); a client IP with too many
        failed authentications is refused (429) first."""
        assert self.auth_limiter is not None
        client = scope.get("client")
        ip = client_ip(client[0] if client else None, headers.get("x-forwarded-for"))
        self.auth_limiter.check(ip)
        try:
            return await self.keys.authenticate(headers.get("authorization"), scope=api)
        except Unauthorized:
            await self.auth_limiter.failed(ip)
            raise

    # --- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._ensure_loop_state()
        if self.gc.remaining:
            self.gc.request_served()
        # 128 random bits as 32 hex digits, the shape of uuid4().hex without building a UUID.
        request_id = f"gen-{os.urandom(16).hex()}"
        request_id_var.set(request_id)
        try:
            headers = request_headers(scope)
            # A trusted upstream id correlates our log lines with the caller's; the id we
            # bill and trace by stays ours, so a repeated header can never merge two requests.
            trusted = accept_request_id(
                headers.get("x-request-id"), trusted=hot.TRUST_REQUEST_ID_HEADER
            )
            if trusted:
                request_id_var.set(f"{trusted}/{request_id}")
            path = scope["path"]
            route_to = ROUTES.get(path)
            if route_to is None and path.startswith(TOOLS_PREFIX):
                route_to = ("POST", GatewayApp._tool_call)
            if route_to is None:
                raise NotFound(f"no such route: {path}", code="unknown_url")
            method, handler = route_to
            if method is not None and scope["method"] != method:
                raise MethodNotAllowed(f"use {method} for {scope['path']}")
            await handler(self, scope, receive, send, headers, request_id)
        except GatewayError as exc:
            metrics.REFUSED.labels(reason=exc.code).inc()
            await _send_error(send, exc.status, exc.body(), request_id, exc.headers)
        except ClientGone:
            return
        except aioredis.RedisError:
            # Redis went away between the checks (idempotency, a fallback's release...): the
            # request fails closed like any other that cannot reach the state store.
            logger.warning("state store error (request %s)", request_id, exc_info=True)
            unavailable = Unavailable(
                "the gateway cannot reach its state store; nothing was charged",
                code="state_unavailable",
            )
            metrics.REFUSED.labels(reason=unavailable.code).inc()
            await _send_error(
                send, unavailable.status, unavailable.body(), request_id, {"retry-after": "1"}
            )
        except Exception:
            logger.exception("unhandled gateway error (request %s)", request_id)
            err = GatewayError("an internal error occurred; the request was not charged")
            await _send_error(send, 500, err.body(), request_id)

    async def _models(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        key = await self.authenticate(scope, headers, api="models")
        snapshot = await self.snapshot()
        data: list[dict[str, Any]] = []
        tags: set[str] = set()
        for endpoint in snapshot.endpoints:
            if not endpoint.visible_to(key.organization_id):
                continue
            tags.update(endpoint.tags)
            data.append(
                {
                    "id": endpoint.full_slug,
                    "object": "model",
                    "created": 0,
                    "owned_by": endpoint.vendor_slug,
                    "kind": endpoint.kind,
                }
            )
        data.extend(
            {
                "id": f"tag:{t}",
                "object": "model",
                "created": 0,
                "owned_by": "switchyard",
                "kind": "tag",
            }
            for t in sorted(tags)
        )
        await send_json(send, 200, {"object": "list", "data": data}, request_id)

    async def _openapi(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        """``GET /v1/openapi.json``: the static document, serialised once per process."""
        payload = openapi.document_bytes()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"cache-control", b"public, max-age=300"),
                    (b"x-request-id", request_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _readyz(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        """Ready when PostgreSQL and Redis answer and the routing table is loaded."""
        checks: dict[str, str] = {}
        assert self._redis is not None
        try:
            await self._redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        try:
            await off_loop(_database_ping, probe=True)()
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            await self.snapshot()
            checks["routing_table"] = "ok"
        except GatewayError:
            checks["routing_table"] = "not loaded"
        ready = all(value == "ok" for value in checks.values())
        await send_json(send, 200 if ready else 503, {"ready": ready, "checks": checks}, request_id)

    async def _metrics(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        assert self._redis is not None and self.live_cache is not None
        extra = []
        snapshot = self._snapshot
        if snapshot is not None:
            from vendors.pricing import surge_multiplier

            numbers = self.live_cache.numbers
            names = {e.id: (e.full_slug, e.vendor_slug) for e in snapshot.endpoints}
            multipliers = {
                e.id: surge_multiplier(
                    e.surge_curve,
                    numbers[e.id].utilisation if e.id in numbers else 0.0,
                    e.surge_cap,
                )
                for e in snapshot.endpoints
            }
            extra += metrics.endpoint_gauges(numbers, names, multipliers)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xlen(USAGE_STREAM)
            pipe.xpending(USAGE_STREAM, "ingest")
            pipe.xlen(TRACE_STREAM)
            queues = settings.CELERY_QUEUES_ALL.split(",")
            for queue in queues:
                pipe.llen(queue)
            length, pending, traces, *depths = await pipe.execute(raise_on_error=False)
            depth = sum(d for d in depths if isinstance(d, int))
            extra += metrics.queue_gauges(
                int(length) if isinstance(length, int) else 0,
                int(pending["pending"]) if isinstance(pending, dict) else 0,
                int(depth) if isinstance(depth, int) else 0,
                int(traces) if isinstance(traces, int) else 0,
            )
        except Exception:
            logger.warning("metrics: Redis gauges unavailable", exc_info=True)
        body = metrics.render(extra)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", metrics.content_type().encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _generation(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        """``GET /v1/generation?id=...``: the route trace of one of the caller's requests."""
        key = await self.authenticate(scope, headers, api="generation")
        from urllib.parse import parse_qs

        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        wanted = (query.get("id") or [""])[0]
        if not wanted:
            raise BadRequest("pass the request id as ?id=", param="id", code="missing_id")
        trace = await self._any_trace(wanted)
        # Another organisation's request is indistinguishable from a missing one.
        if trace is None or trace.get("organization_id") != key.organization_id:
            raise NotFound("no generation with that id", code="generation_not_found")
        await send_json(send, 200, {"data": trace}, request_id)

    async def _any_trace(self, request_id: str) -> dict[str, Any] | None:
        """A request's trace: Redis's copy while it lasts, else PostgreSQL's (off the loop)."""
        assert self.live is not None
        trace = await self.live.trace(request_id)
        if trace is None:
            trace = await off_loop(stored_trace)(request_id)
        return trace

    async def _feedback(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        """``POST /v1/feedback`` ``{"id": <request id>, "score": 0..1, "comment": ...}``.

        Rates one of the caller's own answered requests; it feeds the serving endpoint's
        quality score. Rating again replaces the earlier rating.
        """
        key = await self.authenticate(scope, headers, api="feedback")
        _check_content_type(headers)
        body = parse_json(await read_body(receive, headers, 65_536))
        rated = body.get("id", body.get("request_id"))
        if not isinstance(rated, str) or not rated:
            raise BadRequest("`id` (the request id) is required", param="id", code="missing_id")
        score = body.get("score")
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            raise BadRequest(
                "`score` must be a number from 0 to 1", param="score", code="invalid_value"
            )
        comment = body.get("comment", "")
        if not isinstance(comment, str):
            raise BadRequest("`comment` must be a string", param="comment", code="invalid_type")
        trace = await self._any_trace(rated)
        if (
            trace is None
            or trace.get("organization_id") != key.organization_id
            or not trace.get("served_by")
        ):
            raise NotFound("no answered request of yours has that id", code="generation_not_found")
        try:
            await off_loop(_record_feedback)(key.organization_id, rated, trace, score, comment)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_feedback") from None
        await send_json(send, 200, {"id": rated, "score": score, "recorded": True}, request_id)

    async def _idempotent(
        self,
        key: KeyInfo,
        headers: dict[str, str],
        raw: bytes,
        send: Send,
        request_id: str,
        handle: Callable[[Send], Awaitable[None]],
    ) -> None:
        """Run ``handle`` once per Idempotency-Key (when the client sends one)."""
        header = headers.get("idempotency-key")
        if header is None:
            await handle(send)
            return
        assert self.idempotency is not None
        idem_key = check_key(header)
        stored = await self.idempotency.begin(key.organization_id, idem_key, raw)
        if stored is not None:
            await replay(send, stored)
            return
        recorder = Recorder(send)
        try:
            try:
                await handle(recorder)
            except GatewayError as exc:
                metrics.REFUSED.labels(reason=exc.code).inc()
                await send_json(recorder, exc.status, exc.body(), request_id, exc.headers)
        except BaseException:
            # Interrupted: keep a complete answer (it may have been charged), else forget.
            if recorder.complete:
                await asyncio.shield(
                    self.idempotency.finish(key.organization_id, idem_key, recorder)
                )
            else:
                await asyncio.shield(self.idempotency.abandon(key.organization_id, idem_key))
            raise
        await self.idempotency.finish(key.organization_id, idem_key, recorder)

    async def _post(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        request_id: str,
        body_handler: Callable[[KeyInfo, bytes, Send, str], Awaitable[None]],
        api: str,
    ) -> None:
        """Authenticate (``api``: the API called, for the key's scopes), read the JSON body,
        and run ``body_handler`` once per Idempotency-Key (chat completions and embeddings)."""
        key = await self.authenticate(scope, headers, api=api)
        _check_content_type(headers)
        raw = await read_body(receive, headers, hot.GATEWAY_MAX_BODY_BYTES)

        async def handle(out: Send) -> None:
            await body_handler(key, raw, out, request_id)

        await self._idempotent(key, headers, raw, send, request_id, handle)

    async def _chat(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        await self._post(scope, receive, send, headers, request_id, self._chat_body, api="chat")

    async def _chat_body(self, key: KeyInfo, raw: bytes, send: Send, request_id: str) -> None:
        body = parse_json(raw)
        request = chat_request(body, max_messages=hot.GATEWAY_MAX_MESSAGES)
        if request.model == ORCHESTRATE:
            await Orchestration(self, key, body, request_id).run(send)
            return
        job = Job(
            kind="chat",
            request_id=request_id,
            key=key,
            body=body,
            model=request.model,
            upstream_path="/chat/completions",
            prompt_bound=self.prompt_bound(request),
            max_tokens=request.max_tokens,
            stream=request.stream,
            include_usage=request.include_usage,
        )
        await self.run_job(job, send)

    @staticmethod
    def prompt_bound(request: ChatRequest) -> int:
        """An upper bound of a chat prompt's tokens (a token covers at least one byte)."""
        return (
            request.prompt_bytes
            + TEMPLATE_TOKENS_PER_MESSAGE * request.message_count
            + TEMPLATE_TOKENS_BASE
        )

    # --- tools (routing.tools, routing.gateway.tools) -------------------------------------

    async def tool_catalog(self) -> ToolCatalog:
        """The tools of the current routing table, built once per snapshot (with it, in the
        loader's thread; here only for a snapshot that came another way)."""
        snapshot = await self.snapshot()
        catalog = self._tools
        if catalog is None or catalog[0] is not snapshot:
            catalog = self._tools = (snapshot, ToolCatalog.build(snapshot))
        return catalog[1]

    async def _tools_list(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        """``GET /v1/tools``: one OpenAI function tool per capability the key may use."""
        key = await self.authenticate(scope, headers, api="tools")
        tools = (await self.tool_catalog()).for_organization(key.organization_id)
        await send_json(send, 200, {"object": "list", "data": tools.definitions()}, request_id)

    async def _tool_call(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        """``POST /v1/tools/<name>`` ``{"arguments": {...}, "provider": {...}}``."""
        key = await self.authenticate(scope, headers, api="tools")
        name = scope["path"][len(TOOLS_PREFIX) :]
        _check_content_type(headers)
        raw = await read_body(receive, headers, hot.GATEWAY_MAX_BODY_BYTES)

        async def handle(out: Send) -> None:
            arguments, provider = tool_call_fields(parse_json(raw))
            run = await run_tool(
                self, key, name, arguments, provider=provider, request_id=request_id
            )
            await send_json(out, 200, run.result, run.request_id, run.headers)

        # The tool is part of what an Idempotency-Key stands for, not only the body.
        fingerprint = b"tool:" + name.encode("utf-8", "replace") + b"\n" + raw
        await self._idempotent(key, headers, fingerprint, send, request_id, handle)

    async def _mcp(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        """``/mcp``: the same tools over MCP (streamable HTTP), for the same API keys."""
        try:
            key = await self.authenticate(scope, headers, api="tools")
        except Unauthorized as exc:
            exc.headers = {**exc.headers, "www-authenticate": 'Bearer realm="switchyard"'}
            raise
        if self._mcp_server is None:
            self._mcp_server = McpToolServer(self)
        await self._mcp_server.handle(scope, receive, send, key)

    async def _embeddings(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], request_id: str
    ) -> None:
        await self._post(
            scope, receive, send, headers, request_id, self._embeddings_body, api="embeddings"
        )

    async def _embeddings_body(self, key: KeyInfo, raw: bytes, send: Send, request_id: str) -> None:
        body = parse_json(raw)
        request = embeddings_request(body)
        job = Job(
            kind="embeddings",
            request_id=request_id,
            key=key,
            body=body,
            model=request.model,
            upstream_path="/embeddings",
            prompt_bound=request.token_bound,
        )
        await self.run_job(job, send)

    async def run_job(self, job: Job, send: Send) -> None:
        """Route ``job`` and serve it (chat, embeddings, tool calls): the request path."""
        snapshot = await self.snapshot()
        assert self.proxy is not None
        cascade = parse_cascade(job.body) if job.kind == "chat" else None
        policy = route_policy(
            without_cascade(job.body) if cascade else job.body,
            organization_default=job.key.provider_default,
        )
        cache_trace: dict[str, Any] | None = None
        cached = None
        vector = None
        if job.kind == "chat" and cascade is None:
            cached, cache_trace = self._cache_plan(job, policy)
        if cached is not None:
            hit, vector = await self._cache_lookup(*cached)
            if hit is not None:
                await self._answer_hit(job, hit, cached[0], send)
                return
            job.cache_status = "miss"
        if job.key.privacy != "off":
            policy = await self._guard(job, policy)
            if cached is not None and job.privacy is not None and job.privacy["found"]:
                # The answer to a prompt with personal data is not kept: the guard's promise
                # is that Switchyard keeps no such values (nor would it, without the cache).
                cached = None
                cache_trace = {"lookup": "miss", "stored": False, "reason": "personal data"}
                job.cache_status = None
        auto_trace = None
        if policy.auto:
            classification = await self._classify(job.body.get("messages"))
            policy = policy.with_auto_tags(classification.tag)
            auto_trace = classification.to_trace()
        decision, decision_trace = self._decide(snapshot, policy, job)
        if not decision.candidates and decision.filtered.get("at_capacity"):
            # The copy of the live numbers may be a refresh old, and a slot may have freed
            # since: with small capacities, refusing on the copy alone refused requests that
            # could be served. Let reserve, which counts the slots atomically, decide for a
            # few of the endpoints the copy counts full (it refuses them if they are).
            decision, decision_trace = self._decide(snapshot, policy, job, recheck=True)
        if not decision.candidates:
            raise decision.no_candidates_error()
        candidates = list(decision.candidates)
        session = job.body.get("session_id", job.body.get("user"))
        if isinstance(session, str) and session and job.kind == "chat":
            # Stick to the endpoint that served this session last, if it is still eligible
            # (not filtered: healthy, under capacity, within max_price).
            assert self.live is not None
            job.affinity_key = affinity_key(job.key.organization_id, session[:256])
            sticky = await self.live.affinity(job.affinity_key)
            for index, candidate in enumerate(candidates):
                if candidate.endpoint.id == sticky and index:
                    candidates.insert(0, candidates.pop(index))
                    break
        job.allow_fallbacks = policy.allow_fallbacks
        job.decision_trace = dict(decision_trace)
        if job.key.provider_default is not None:
            # "policy" above is the merge; this says what the organisation's part was.
            job.decision_trace["organization_policy"] = provider_trace(job.key.provider_default)
        if auto_trace is not None:
            job.decision_trace["auto"] = auto_trace
        if cache_trace is not None:
            job.decision_trace["cache"] = cache_trace
        if cascade is not None:
            tiers = plan_tiers(decision.candidates, cascade.max_tiers)
            if len(tiers) > 1:
                await self.proxy.run_cascade(job, tiers, CascadeTrace(cascade, tiers), send)
                return
        if cached is None:
            await self.proxy.run(job, candidates, send)
            return
        tee = AnswerTee(send, hot.GATEWAY_CACHE_MAX_ANSWER_BYTES)
        await self.proxy.run(job, candidates, tee)
        await self._cache_store(job, cached, tee, vector)

    # --- response cache and privacy guard ---------------------------------------------------

    def _cache_plan(
        self, job: Job, policy: RoutePolicy
    ) -> tuple[tuple[CacheKeys, CacheRequest] | None, dict[str, Any] | None]:
        """Whether and where this request's answer is cached (no I/O)."""
        request = cache_request(
            job.body,
            default_ttl=job.key.cache_ttl,
            default_similarity=job.key.cache_similarity,
            max_ttl=hot.GATEWAY_CACHE_MAX_TTL_SECONDS,
        )
        if request is None:
            return None, None
        if not deterministic(job.body, explicit=request.explicit):
            return None, {"lookup": "skipped", "reason": "not deterministic (temperature > 0)"}
        keys = CacheKeys.for_request(
            job.key.organization_id, policy, job.body, semantic=request.similarity is not None
        )
        trace = {"lookup": "miss", "ttl": request.ttl}
        if request.similarity is not None:
            trace["semantic_threshold"] = request.similarity / 1000
        return (keys, request), trace

    async def _cache_lookup(
        self, keys: CacheKeys, request: CacheRequest
    ) -> tuple[CacheHit | None, Any]:
        assert self.cache is not None
        try:
            return await self.cache.lookup(keys, request)
        except aioredis.RedisError:
            logger.warning("cache lookup failed; calling a vendor", exc_info=True)
            return None, None

    async def _cache_store(
        self, job: Job, cached: tuple[CacheKeys, CacheRequest], tee: AnswerTee, vector: Any
    ) -> None:
        served = job.served
        if served is None or served.outcome != "success":
            return
        entry = entry_from_answer(
            tee, stream=job.stream, cost=served.cost, request_id=job.request_id
        )
        if entry is None:
            return
        assert self.cache is not None
        try:
            await self.cache.store(cached[0], cached[1], entry, vector)
        except aioredis.RedisError:
            logger.warning("cache store failed", exc_info=True)

    async def _answer_hit(self, job: Job, hit: CacheHit, keys: CacheKeys, send: Send) -> None:
        """Answer from the cache: no vendor, no hold; metered (free) with what it saved."""
        assert self.live is not None
        entry = hit.entry
        saved = int(entry.get("cost") or 0)
        elapsed = int((time.monotonic() - job.started) * 1000)
        event = {
            "rid": job.request_id,
            "org": job.key.organization_id,
            "key": job.key.key_id,
            "ep": None,
            "vendor": None,
            "model": job.model,
            "kind": job.kind,
            "pt": int(entry.get("prompt_tokens") or 0),
            "ct": int(entry.get("completion_tokens") or 0),
            "pin": 0,
            "pout": 0,
            "cost": 0,
            "ms": elapsed,
            "att": 0,
            "out": "success",
            "stream": job.stream,
            "cache": hit.kind,
            "saved": saved,
            "at": time.time_ns() // 1_000_000,
        }
        cache_trace: dict[str, Any] = {
            "lookup": "hit",
            "kind": hit.kind,
            "source_request_id": entry.get("rid"),
            "saved_nanos": saved,
        }
        if hit.similarity is not None:
            cache_trace["similarity"] = hit.similarity / 1000
        trace = {
            "id": job.request_id,
            "organization_id": job.key.organization_id,
            "key_prefix": job.key.prefix,
            "kind": job.kind,
            "model": job.model,
            "tags": [],
            "stream": job.stream,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "routing": {"cache": cache_trace},
            "attempts": [],
            "outcome": "success",
            "served_by": None,
            "cache": cache_trace,
            "tokens": {"prompt": event["pt"], "completion": event["ct"]},
            "cost_nanos": 0,
            "latency_ms": elapsed,
        }
        with contextlib.suppress(aioredis.RedisError):
            await self.live.emit(event=event, request_id=job.request_id, trace=trace)
        metrics.CACHE_HITS.labels(kind=hit.kind).inc()
        await send_hit(
            send,
            request_id=job.request_id,
            entry=entry,
            kind=hit.kind,
            stream=job.stream,
            include_usage=job.include_usage,
            similarity=hit.similarity,
        )

    async def _guard(self, job: Job, policy: RoutePolicy) -> RoutePolicy:
        """The privacy guard (only for organisations that turned it on): find personal data
        in the prompt (chat messages, embeddings input) on the guard's thread; redact it, or
        keep the request on trusted endpoints."""
        scan: Callable[[Any], tuple[Any, privacy.Redaction]]
        if job.kind == "embeddings":
            field, scan = "input", privacy.scan_input
            if not privacy.readable_input(job.body.get(field)):
                raise BadRequest(
                    "this key's data policy has the privacy guard read every prompt, and it "
                    "cannot read token arrays: send `input` as text",
                    param="input",
                    code="privacy_unreadable_input",
                )
        else:
            field, scan = "messages", privacy.scan_messages
        try:
            redacted, redaction = await privacy.scan_async(job.body.get(field), scan)
        except Exception:
            # Fail closed: a prompt the guard could not read never leaves unguarded.
            logger.exception("the privacy guard failed (request %s)", job.request_id)
            raise Unavailable(
                "the privacy guard is unavailable; the request was not sent to any vendor",
                code="privacy_guard_unavailable",
            ) from None
        action = ""
        if redaction.total:
            if job.key.privacy == "redact":
                job.body = {**job.body, field: redacted}
                if job.kind == "chat":
                    job.redaction = redaction  # a vector has nothing to put back
                # A placeholder may be longer than the value it replaces: widen the hold.
                job.prompt_bound += 16 * redaction.total
                action = "redacted"
            else:
                regions, trusted = policy.regions, job.key.trusted_regions
                if trusted is not None:
                    regions = trusted if regions is None else regions & trusted
                policy = dataclasses.replace(policy, trusted_only=True, regions=regions)
                action = "trusted_only"
                if job.key.log_content:
                    # The vendor gets the values; Switchyard's own trace keeps this instead.
                    job.redacted_prompt = redacted
            metrics.PRIVACY.labels(action=action).inc()
        job.privacy = {"policy": job.key.privacy, "action": action, "found": dict(redaction.found)}
        return policy

    def _decide(
        self, snapshot: Snapshot, policy: RoutePolicy, job: Job, *, recheck: bool = False
    ) -> tuple[RouteDecision, dict[str, Any]]:
        """Route one request; identical requests share a decision until the live numbers or
        the routing table change (a few times a second).

        The router is pure, so the same inputs give the same order; only exploration draws
        differ, and a request that draws exploration is routed afresh and not cached.
        """
        draw = random.random()
        params = request_parameters(job.body)
        view = self.live_view
        cacheable = draw >= EXPLORE_SHARE
        key = (job.key.organization_id, job.kind, policy, params, recheck)
        if self._decisions_snapshot is not snapshot or self._decisions_view is not view:
            self._decisions = {}
            self._decisions_snapshot, self._decisions_view = snapshot, view
        elif cacheable and key in self._decisions:
            return self._decisions[key]
        decision = plan_route(
            snapshot,
            policy,
            organization_id=job.key.organization_id,
            kind=job.kind,
            live=view,
            explore_draw=draw,
            request_params=params,
            max_candidates=CAPACITY_RECHECK if recheck else MAX_CANDIDATES,
            check_capacity=not recheck,
        )
        trace = decision.to_trace()
        if recheck:
            trace["capacity_recheck"] = True  # counted full by this replica's copy
        entry = (decision, trace)
        if cacheable and len(self._decisions) < DECISION_CACHE_SIZE:
            self._decisions[key] = entry
        return entry

    async def _classify(self, messages: Any) -> Classification:
        """``model: auto``: the capability tag of the prompt (MiniLM, loaded on first use)."""
        if self._classifier is None:
            assert self._snapshot_lock is not None
            async with self._classifier_lock:
                if self._classifier is None:
                    self._classifier = await off_loop(classifier_from_db)()
        return await self._classifier.classify_async(prompt_text(messages))


Handler = Any
ROUTES: dict[str, tuple[str | None, Handler]] = {
    "/v1/chat/completions": ("POST", GatewayApp._chat),
    "/v1/embeddings": ("POST", GatewayApp._embeddings),
    "/v1/models": ("GET", GatewayApp._models),
    "/v1/generation": ("GET", GatewayApp._generation),
    "/v1/feedback": ("POST", GatewayApp._feedback),
    "/v1/tools": ("GET", GatewayApp._tools_list),
    # Prefix route, matched after the exact ones: "/v1/tools/<name>" -> GatewayApp._tool_call.
    "/mcp": (None, GatewayApp._mcp),  # the MCP transport answers POST, GET and DELETE
    "/v1/openapi.json": ("GET", GatewayApp._openapi),
    "/readyz": ("GET", GatewayApp._readyz),
    "/metrics": ("GET", GatewayApp._metrics),
}


async def _send_error(
    send: Send,
    status: int,
    body: dict[str, Any],
    request_id: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer an error, unless the answer had already begun (a stream that was cut, a
    settlement after the last byte): then the server closes the connection instead."""
    try:
        await send_json(send, status, body, request_id, headers)
    except RuntimeError:
        logger.info("error after the response began (request %s): connection closed", request_id)


def _check_content_type(headers: dict[str, str]) -> None:
    if "json" not in headers.get("content-type", "application/json"):
        raise BadRequest("send the body as application/json", code="invalid_content_type")


def _key_spend(key_id: int, period: str) -> int:
    """What a key spent so far this period, from ingested usage (its first request only)."""
    return spend_since(api_key_id=key_id, since=period_start(period))


def _org_month_spend(organization_id: int) -> int:
    """What an organisation spent this month (its first budgeted request of the month)."""
    return spend_since(organization_id=organization_id, since=period_start("monthly"))


def _record_feedback(
    organization_id: int, request_id: str, trace: dict[str, Any], score: float, comment: str
) -> None:
    from marketplace.models import Organization
    from vendors.models import Endpoint
    from vendors.services import FeedbackError, feedback_record

    vendor_slug, _, endpoint_slug = str(trace["served_by"]).partition("/")
    endpoint = Endpoint.objects.filter(vendor__slug=vendor_slug, slug=endpoint_slug).first()
    if endpoint is None:
        raise ValueError("the endpoint that served this request no longer exists")
    try:
        feedback_record(
            organization=Organization.objects.get(pk=organization_id),
            request_id=request_id,
            endpoint=endpoint,
            tags=trace.get("tags") or None,
            score=score,
            comment=comment,
        )
    except FeedbackError as exc:
        raise ValueError(str(exc)) from None


def _database_ping() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _load_snapshot() -> tuple[Snapshot, ToolCatalog]:
    snapshot = load_snapshot()
    prepare_snapshot(snapshot)  # the router's arrays, built here rather than per request
    return snapshot, ToolCatalog.build(snapshot)  # and the tools, off the loop too
