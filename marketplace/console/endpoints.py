"""Console pages for the organisation's private endpoints: list, register (then the
conformance check runs and, when it passes, the endpoint goes live), check again, disable,
delete. The writes are ``vendors.private``'s services; the reads ``vendors.selectors``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from marketplace.console.access import (
    AuthenticatedHttpRequest,
    OrgContext,
    org_template_context,
    org_view,
)
from marketplace.console.forms import PrivateEndpointForm
from marketplace.console.views import service_message
from marketplace.models import Organization
from marketplace.services import ServiceError
from vendors import selectors
from vendors.models import Endpoint, Vendor
from vendors.private import (
    PRIVATE_VENDOR_PREFIX,
    private_endpoint_check,
    private_endpoint_delete,
    private_endpoint_disable,
    private_endpoint_register,
)
from vendors.services import VendorError


def _host(endpoint: Endpoint) -> str:
    return urlsplit(endpoint.base_url).hostname or endpoint.base_url


def _vendor_slug(organization: Organization) -> str:
    vendor = Vendor.objects.filter(private_to=organization).only("slug").first()
    return vendor.slug if vendor else f"{PRIVATE_VENDOR_PREFIX}{organization.slug}"


def _endpoint_or_404(ctx: OrgContext, pk: int) -> Endpoint:
    endpoint = selectors.private_endpoint(organization=ctx.organization, pk=pk)
    if endpoint is None:
        raise Http404("No such endpoint")
    return endpoint


def _report_message(request: AuthenticatedHttpRequest, endpoint: Endpoint, passed: bool) -> None:
    if passed:
        messages.success(
            request,
            f"The conformance check passed: {endpoint.full_slug} is live for your "
            "organisation's keys.",
        )
    else:
        messages.error(
            request,
            f"The conformance check failed, so {endpoint.full_slug} does not receive "
            "traffic; see the report below, fix your server and run the check again.",
        )


@org_view("endpoints.view")
def endpoint_list(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    endpoints = selectors.private_endpoints(organization=ctx.organization)
    rows = [{"endpoint": e, "host": _host(e)} for e in endpoints]
    return render(
        request,
        "console/endpoints.html",
        org_template_context(ctx, rows=rows, vendor_slug=_vendor_slug(ctx.organization)),
    )


@org_view("endpoints.manage")
def endpoint_create(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    vendor_slug = _vendor_slug(ctx.organization)
    form = PrivateEndpointForm(request.POST or None, vendor_slug=vendor_slug)
    if request.method == "POST" and form.is_valid():
        try:
            endpoint = private_endpoint_register(
                actor=request.user, organization=ctx.organization, **form.service_arguments()
            )
        except VendorError as exc:
            form.add_service_error(service_message(exc))
        except ServiceError as exc:
            form.add_error(None, service_message(exc))
        else:
            report = private_endpoint_check(actor=request.user, endpoint=endpoint)
            _report_message(request, endpoint, report.passed)
            return redirect("console:endpoint", ctx.organization.slug, endpoint.pk)
    return render(
        request,
        "console/endpoint_form.html",
        org_template_context(
            ctx, form=form, known_tags=selectors.tag_slugs(), vendor_slug=vendor_slug
        ),
    )


@org_view("endpoints.view")
def endpoint_detail(request: AuthenticatedHttpRequest, ctx: OrgContext, pk: int) -> HttpResponse:
    endpoint = _endpoint_or_404(ctx, pk)
    context: dict[str, Any] = {
        "endpoint": endpoint,
        "host": _host(endpoint),
        "report": endpoint.latest_report,  # type: ignore[attr-defined]
    }
    return render(request, "console/endpoint.html", org_template_context(ctx, **context))


@require_POST
@org_view("endpoints.manage")
def endpoint_check(request: AuthenticatedHttpRequest, ctx: OrgContext, pk: int) -> HttpResponse:
    """Run the conformance check again; a pass puts a pending or disabled endpoint live."""
    endpoint = _endpoint_or_404(ctx, pk)
    report = private_endpoint_check(actor=request.user, endpoint=endpoint)
    _report_message(request, endpoint, report.passed)
    return redirect("console:endpoint", ctx.organization.slug, endpoint.pk)


@require_POST
@org_view("endpoints.manage")
def endpoint_disable(request: AuthenticatedHttpRequest, ctx: OrgContext, pk: int) -> HttpResponse:
    endpoint = _endpoint_or_404(ctx, pk)
    try:
        private_endpoint_disable(actor=request.user, endpoint=endpoint)
    except (VendorError, ServiceError) as exc:
        messages.error(request, service_message(exc))
    else:
        messages.success(
            request,
            f"{endpoint.full_slug} is disabled: the gateway routes nothing to it from now on. "
            "Run the conformance check to enable it again.",
        )
    return redirect("console:endpoint", ctx.organization.slug, endpoint.pk)


@org_view("endpoints.manage")
def endpoint_delete(request: AuthenticatedHttpRequest, ctx: OrgContext, pk: int) -> HttpResponse:
    endpoint = _endpoint_or_404(ctx, pk)
    if request.method == "POST":
        try:
            private_endpoint_delete(actor=request.user, endpoint=endpoint)
        except (VendorError, ServiceError) as exc:
            messages.error(request, service_message(exc))
            return redirect("console:endpoint", ctx.organization.slug, endpoint.pk)
        messages.success(request, f"{endpoint.full_slug} is deleted.")
        return redirect("console:endpoints", ctx.organization.slug)
    return render(
        request, "console/endpoint_delete.html", org_template_context(ctx, endpoint=endpoint)
    )
