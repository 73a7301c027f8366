"""Operations pages (staff only): approve, suspend and resume vendors and endpoints after
reading their conformance reports, and read the audit log."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from marketplace.console.access import AuthenticatedHttpRequest
from marketplace.live.figures import ops_today
from marketplace.live.numbers import endpoints_live
from marketplace.selectors import audit_entries
from vendors import selectors as vendor_selectors
from vendors.models import Endpoint, Vendor
from vendors.services import (
    OPS_ENDPOINT_ACTIONS,
    OPS_VENDOR_ACTIONS,
    VendorError,
    ops_endpoint_set_status,
    ops_vendor_set_status,
    portal_endpoint_check_conformance,
)


def staff_view(view: Callable[..., HttpResponse]) -> Callable[..., Any]:
    """Signed-in staff only: others are sent to log in, or refused (403)."""

    @login_required
    @wraps(view)
    def wrapper(request: AuthenticatedHttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_staff:
            raise PermissionDenied("The operations pages are for platform staff.")
        return view(request, *args, **kwargs)

    return wrapper


def _message(exc: Exception) -> str:
    text = str(exc).strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _back(request: AuthenticatedHttpRequest, default: str) -> HttpResponse:
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()}):
        return redirect(target)
    return redirect(default)


@staff_view
def queue(request: AuthenticatedHttpRequest) -> HttpResponse:
    return render(
        request,
        "ops/queue.html",
        {
            "vendors": [
                v for v in vendor_selectors.ops_vendors() if v.status == Vendor.Status.PENDING
            ],
            # Private endpoints go live on a passing conformance check, without staff.
            "endpoints": vendor_selectors.ops_endpoints(
                status=Endpoint.Status.PENDING, include_private=False
            ),
        },
    )


@staff_view
def live(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Requests per second, error rate, circuit state and current prices per endpoint, and
    today's revenue; updated live over a WebSocket."""
    endpoints = list(vendor_selectors.routable_endpoints())
    return render(
        request,
        "ops/live.html",
        {
            "endpoints": [(endpoint, f"ep.{endpoint.pk}.") for endpoint in endpoints],
            "live": {**ops_today(), **endpoints_live(endpoints)},
        },
    )


@staff_view
def vendors(request: AuthenticatedHttpRequest) -> HttpResponse:
    return render(request, "ops/vendors.html", {"vendors": vendor_selectors.ops_vendors()})


@staff_view
def endpoints(request: AuthenticatedHttpRequest) -> HttpResponse:
    return render(request, "ops/endpoints.html", {"endpoints": vendor_selectors.ops_endpoints()})


@staff_view
def endpoint_detail(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    endpoint = vendor_selectors.ops_endpoint(pk)
    if endpoint is None:
        raise Http404("No such endpoint")
    return render(
        request,
        "ops/endpoint.html",
        {"endpoint": endpoint, "report": endpoint.latest_report},  # type: ignore[attr-defined]
    )


@require_POST
@staff_view
def vendor_action(request: AuthenticatedHttpRequest, pk: int, action: str) -> HttpResponse:
    vendor = Vendor.objects.filter(pk=pk).first()
    if vendor is None or action not in OPS_VENDOR_ACTIONS:
        raise Http404("No such vendor or action")
    try:
        updated = ops_vendor_set_status(actor=request.user, vendor=vendor, action=action)
    except VendorError as exc:
        messages.error(request, _message(exc))
    else:
        messages.success(request, f"{updated.name}: {updated.get_status_display().lower()}.")
    return _back(request, "ops:index")


@require_POST
@staff_view
def endpoint_action(request: AuthenticatedHttpRequest, pk: int, action: str) -> HttpResponse:
    endpoint = Endpoint.objects.select_related("vendor").filter(pk=pk).first()
    if endpoint is None or action not in OPS_ENDPOINT_ACTIONS:
        raise Http404("No such endpoint or action")
    try:
        updated = ops_endpoint_set_status(actor=request.user, endpoint=endpoint, action=action)
    except VendorError as exc:
        messages.error(request, _message(exc))
    else:
        messages.success(request, f"{updated.full_slug}: {updated.get_status_display().lower()}.")
    return _back(request, "ops:index")


@require_POST
@staff_view
def endpoint_conformance(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    endpoint = Endpoint.objects.select_related("vendor").filter(pk=pk).first()
    if endpoint is None:
        raise Http404("No such endpoint")
    report = portal_endpoint_check_conformance(actor=request.user, endpoint=endpoint)
    if request.headers.get("HX-Request"):
        return render(
            request, "includes/conformance_report.html", {"report": report, "just_ran": True}
        )
    if report.passed:
        messages.success(request, f"{endpoint.full_slug} passed the conformance check.")
    else:
        messages.error(request, f"{endpoint.full_slug} failed the conformance check.")
    return redirect("ops:endpoint", endpoint.pk)


@staff_view
def audit(request: AuthenticatedHttpRequest) -> HttpResponse:
    page = Paginator(audit_entries(), 50).get_page(request.GET.get("page"))
    return render(request, "ops/audit.html", {"page": page})
