"""The console's playground: send a prompt through the gateway and see how it was routed.

``playground`` renders the page. ``playground_run`` (async, session + CSRF) calls the gateway
server-side with the organisation's playground key and streams the SSE through to the page;
``playground_trace`` fetches the route trace from ``GET /v1/generation`` and renders it.
The browser never sees an API key.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    JsonResponse,
    StreamingHttpResponse,
)
from django.http.response import HttpResponseBase
from django.shortcuts import render

from marketplace import selectors
from marketplace.console.access import (
    AuthenticatedHttpRequest,
    OrgContext,
    org_template_context,
    org_view,
)
from marketplace.console.forms import PlaygroundForm
from marketplace.models import Membership, Organization
from marketplace.playground import PLAYGROUND_PERMISSION, gateway_base_url, playground_key_ensure
from vendors.selectors import private_endpoints

REQUEST_ID = re.compile(r"^gen-[0-9a-f]{32}(-t[0-9]+)?$")
BROKEN_STREAM = (
    b'data: {"error": {"message": "the connection to the gateway broke",'
    b' "code": "stream_interrupted"}}\n\n'
)


def _form(organization: Organization, data: Any = None) -> PlaygroundForm:
    """The form with the public chat endpoints and the organisation's own live private ones."""
    entries, tags = selectors.catalog()
    endpoints = [
        (e.endpoint.full_slug, f"{e.endpoint.full_slug} ({e.endpoint.vendor.name})")
        for e in entries
        if e.endpoint.kind == "chat"
    ]
    private = [
        e
        for e in private_endpoints(organization=organization, kind="chat")
        if e.status == "approved"
    ]
    endpoints += [(e.full_slug, f"{e.full_slug} (private)") for e in private]
    tag_slugs = [t.slug for t in tags]
    tag_slugs += sorted({t.slug for e in private for t in e.tags.all()} - set(tag_slugs))
    return PlaygroundForm(data, tags=tag_slugs, endpoints=endpoints)


@org_view(PLAYGROUND_PERMISSION)
def playground(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    return render(
        request, "console/playground.html", org_template_context(ctx, form=_form(ctx.organization))
    )


def _membership(user: Any, slug: str) -> Membership | None:
    return selectors.membership_for(user=user, slug=slug)


def _error(message: str, status: int, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": message, "status": status, **extra})


def _timeout() -> httpx.Timeout:
    return httpx.Timeout(5.0, read=settings.GATEWAY_TOTAL_TIMEOUT + 5.0)


async def playground_run(request: HttpRequest, org_slug: str) -> HttpResponseBase:
    """Stream one playground answer: the gateway's SSE, passed through as it arrives.

    A refusal is JSON ``{"error": ..., "errors": {field: [...]}, "status": ...}`` with the
    gateway's status and code (402 for credit, 429 for the key's rate limit...), answered
    with HTTP 200 like a re-rendered form, so the page's console stays free of errors."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    user = await request.auser()
    if not user.is_authenticated:
        return JsonResponse({"error": "Your session has ended; log in again."}, status=401)
    membership = await sync_to_async(_membership)(user, org_slug)
    if membership is None:
        raise Http404("No such organisation")
    if not selectors.role_allows(membership.role, PLAYGROUND_PERMISSION):
        raise PermissionDenied(
            f"Your role ({membership.get_role_display()}) does not allow spending credit."
        )
    form = await sync_to_async(_form)(membership.organization, request.POST)
    if not await sync_to_async(form.is_valid)():
        errors = {
            field: [e["message"] for e in items]
            for field, items in form.errors.get_json_data().items()
        }
        return _error("Check the highlighted fields.", 400, errors=errors)
    key = await sync_to_async(playground_key_ensure)(
        actor=user, organization=membership.organization
    )
    client = httpx.AsyncClient(base_url=gateway_base_url(request), timeout=_timeout())
    outgoing = client.build_request(
        "POST",
        "/v1/chat/completions",
        json=form.run().gateway_body(),
        headers={"Authorization": f"Bearer {key}"},
    )
    try:
        upstream = await client.send(outgoing, stream=True)
    except httpx.HTTPError:
        await client.aclose()
        return _error("The gateway cannot be reached right now; try again shortly.", 502)
    if upstream.status_code != 200:
        try:
            raw = await upstream.aread()
        finally:
            await upstream.aclose()
            await client.aclose()
        return _gateway_refusal(upstream.status_code, raw)

    async def relay() -> Any:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError:
            yield BROKEN_STREAM
        finally:
            await upstream.aclose()
            await client.aclose()

    response = StreamingHttpResponse(relay(), content_type="text/event-stream")
    response["Cache-Control"] = "no-store"
    response["X-Accel-Buffering"] = "no"
    response["X-Switchyard-Request-Id"] = upstream.headers.get("x-request-id", "")
    if upstream.headers.get("x-switchyard-orchestration"):
        response["X-Switchyard-Orchestration"] = upstream.headers["x-switchyard-orchestration"]
    return response


def _gateway_refusal(status: int, raw: bytes) -> JsonResponse:
    try:
        error = httpx.Response(status, content=raw).json().get("error") or {}
    except ValueError:
        error = {}
    message = str(error.get("message") or "The gateway refused the request.")
    return _error(message[:1].upper() + message[1:], status, code=error.get("code"))


@org_view(PLAYGROUND_PERMISSION)
def playground_trace(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    """The route trace of one playground run, as an HTML fragment for the page."""
    request_id = request.GET.get("id", "")
    if not REQUEST_ID.match(request_id):
        return HttpResponse("Not a request id.", status=400)
    key = playground_key_ensure(actor=request.user, organization=ctx.organization)
    try:
        answer = httpx.get(
            f"{gateway_base_url(request)}/v1/generation",
            params={"id": request_id},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10.0,
        )
    except httpx.HTTPError:
        answer = None
    trace = answer.json().get("data") if answer is not None and answer.status_code == 200 else None
    return render(
        request,
        "console/_playground_trace.html",
        org_template_context(
            ctx,
            trace=trace_view(trace) if trace else None,
            raw_json=json.dumps(trace, indent=2) if trace else "",
            request_id=request_id,
            retention_days=settings.TRACE_RETENTION_DAYS,
        ),
    )


def trace_view(trace: dict[str, Any]) -> dict[str, Any]:
    """The trace with the parts the template lays out pulled to the top."""
    routing = trace.get("routing") or {}
    cascade = routing.get("cascade")
    served_tier = None
    if cascade:
        served_tier = next(
            (t for t in cascade.get("tiers", []) if t.get("tier") == cascade.get("served_tier")),
            None,
        )
    auto = routing.get("auto")
    confidence = None
    if served_tier is not None and served_tier.get("confidence") is not None:
        confidence = ("cascade", served_tier["confidence"])
    elif auto:
        confidence = ("auto classification", auto.get("confidence"))
    return {
        **trace,
        "confidence": confidence,
        "strategy": routing.get("strategy"),
        "auto": auto,
        "cascade": cascade,
        "served_tier": served_tier,
        "endpoints": routing.get("endpoints") or routing.get("candidates") or [],
        "filtered": routing.get("filtered") or {},
        "considered": routing.get("considered"),
        "eligible": routing.get("eligible"),
        "timeline": orchestration_timeline(trace["orchestration"])
        if trace.get("orchestration")
        else None,
    }


def orchestration_timeline(plan: dict[str, Any]) -> dict[str, Any]:
    """An orchestrated request's legs as a timeline: steps run one after another; in a
    step the generalist's turn comes first, then its tool calls side by side. Each row has
    its bar's offset and width in percent of the whole run."""
    rows: list[dict[str, Any]] = []
    clock = 0
    for step in plan.get("steps") or []:
        generalist = step["generalist"]
        rows.append({**generalist, "step": step["step"], "start": clock})
        clock += int(generalist.get("latency_ms") or 0)
        longest = 0
        for tool in step.get("tools") or []:
            rows.append({**tool, "step": step["step"], "start": clock})
            longest = max(longest, int(tool.get("latency_ms") or 0))
        clock += longest
    total = max(clock, 1)
    for row in rows:
        row["offset_pct"] = round(100 * row["start"] / total, 1)
        row["width_pct"] = max(round(100 * int(row.get("latency_ms") or 0) / total, 1), 0.5)
    return {
        "rows": rows,
        "total_ms": clock,
        "stopped": plan.get("stopped"),
        "cost_nanos": plan.get("cost_nanos", 0),
        "legs": plan.get("legs", len(rows)),
        "billed_legs": plan.get("billed_legs", 0),
        "generalist": (plan.get("orchestrator") or {}).get("model"),
    }
