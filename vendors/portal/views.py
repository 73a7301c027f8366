"""Vendor portal pages: registration, endpoints, conformance checks, the pricing editor and
revenue statements (payouts and members are in ``payouts.py`` and ``members.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing.money import format_usd
from billing.selectors import vendor_payout_account, vendor_payouts
from billing.statements import month_bounds, vendor_revenue_periods, vendor_statement_csv
from marketplace.console.access import AuthenticatedHttpRequest
from marketplace.live.figures import vendor_today
from marketplace.live.numbers import endpoints_live
from vendors import selectors
from vendors.models import Endpoint, Vendor, VendorMembership
from vendors.portal.forms import EndpointForm, PricingForm, VendorRegisterForm
from vendors.pricing import quote, surge_multiplier
from vendors.services import (
    VendorError,
    portal_endpoint_check_conformance,
    portal_endpoint_register,
    portal_endpoint_update_pricing,
    portal_vendor_register,
)

REGIONS = ("eu", "us", "uk", "ch", "ca", "asia", "global")
PREVIEW_UTILISATIONS = (0.0, 0.5, 0.8, 1.0)


def _message(exc: Exception) -> str:
    text = str(exc).strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else f"{text}."


@dataclass(frozen=True)
class VendorContext:
    membership: VendorMembership
    can: dict[str, bool]

    @property
    def vendor(self) -> Vendor:
        return self.membership.vendor


def vendor_view(permission: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., Any]]:
    """Resolve ``vendor_slug`` to the user's vendor membership (404 for strangers) and
    require ``permission`` (403)."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., Any]:
        @login_required
        @wraps(view)
        def wrapper(
            request: AuthenticatedHttpRequest, vendor_slug: str, *args: Any, **kwargs: Any
        ) -> HttpResponse:
            membership = selectors.vendor_membership_for(user=request.user, slug=vendor_slug)
            if membership is None:
                raise Http404("No such vendor")
            if not selectors.vendor_role_allows(membership.role, permission):
                raise PermissionDenied(
                    f"Your role ({membership.get_role_display()}) does not allow this."
                )
            ctx = VendorContext(membership, selectors.vendor_role_permissions(membership.role))
            return view(request, ctx, *args, **kwargs)

        return wrapper

    return decorator


def _context(ctx: VendorContext, **extra: Any) -> dict[str, Any]:
    return {"vendor": ctx.vendor, "vendor_membership": ctx.membership, "can": ctx.can, **extra}


def _endpoint_or_404(ctx: VendorContext, slug: str) -> Endpoint:
    endpoint = selectors.vendor_endpoint(vendor=ctx.vendor, slug=slug)
    if endpoint is None:
        raise Http404("No such endpoint")
    return endpoint


def _tag_examples(endpoint: Endpoint) -> list[tuple[str, list[str]]]:
    """The endpoint's declared example prompts, by tag, for display (malformed ones left out)."""
    declared = endpoint.tag_examples if isinstance(endpoint.tag_examples, dict) else {}
    return [
        (tag, [p for p in prompts if isinstance(p, str)])
        for tag, prompts in sorted(declared.items())
        if isinstance(prompts, list) and prompts
    ]


@login_required
def index(request: AuthenticatedHttpRequest) -> HttpResponse:
    memberships = selectors.vendor_memberships(user=request.user)
    invitations = selectors.vendor_invitations_for_user(user=request.user)
    if len(memberships) == 1 and not invitations and "all" not in request.GET:
        return redirect("portal:dashboard", memberships[0].vendor.slug)
    return render(
        request,
        "portal/index.html",
        {"memberships": memberships, "invitations": invitations, "form": VendorRegisterForm()},
    )


@login_required
def register(request: AuthenticatedHttpRequest) -> HttpResponse:
    form = VendorRegisterForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            vendor = portal_vendor_register(actor=request.user, name=form.cleaned_data["name"])
        except VendorError as exc:
            form.add_error("name", _message(exc))
        else:
            messages.success(
                request,
                f"{vendor.name} is registered and awaits approval. "
                "Register your first endpoint meanwhile.",
            )
            return redirect("portal:dashboard", vendor.slug)
    return render(request, "portal/register.html", {"form": form})


@vendor_view("vendor.view")
def dashboard(request: AuthenticatedHttpRequest, ctx: VendorContext) -> HttpResponse:
    return render(
        request,
        "portal/dashboard.html",
        _context(
            ctx,
            endpoints=selectors.vendor_endpoints(vendor=ctx.vendor),
            payout_account=vendor_payout_account(vendor_id=ctx.vendor.pk),
        ),
    )


@vendor_view("endpoints.manage")
def endpoint_create(request: AuthenticatedHttpRequest, ctx: VendorContext) -> HttpResponse:
    form = EndpointForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            endpoint = portal_endpoint_register(
                actor=request.user, vendor=ctx.vendor, **form.service_arguments()
            )
        except VendorError as exc:
            form.add_service_error(_message(exc))
        else:
            messages.success(
                request,
                f"{endpoint.full_slug} is registered. Run the conformance check: an "
                "administrator approves endpoints that pass it.",
            )
            return redirect("portal:endpoint", ctx.vendor.slug, endpoint.slug)
    return render(
        request,
        "portal/endpoint_form.html",
        _context(ctx, form=form, known_tags=selectors.tag_slugs(), regions=REGIONS),
    )


@vendor_view("vendor.view")
def endpoint_detail(
    request: AuthenticatedHttpRequest, ctx: VendorContext, endpoint_slug: str
) -> HttpResponse:
    endpoint = _endpoint_or_404(ctx, endpoint_slug)
    return render(
        request,
        "portal/endpoint.html",
        _context(
            ctx,
            endpoint=endpoint,
            report=selectors.conformance_latest(endpoint),
            uptime=selectors.uptime(endpoint),
            live={**vendor_today(ctx.vendor.pk), **endpoints_live([endpoint])},
            ep=f"ep.{endpoint.pk}.",
            tag_examples=_tag_examples(endpoint),
        ),
    )


@require_POST
@vendor_view("endpoints.check")
def endpoint_conformance(
    request: AuthenticatedHttpRequest, ctx: VendorContext, endpoint_slug: str
) -> HttpResponse:
    """Run the check now; htmx swaps in the report, a plain form post redirects back."""
    endpoint = _endpoint_or_404(ctx, endpoint_slug)
    report = portal_endpoint_check_conformance(actor=request.user, endpoint=endpoint)
    if request.headers.get("HX-Request"):
        return render(
            request,
            "includes/conformance_report.html",
            {"report": report, "just_ran": True},
        )
    if report.passed:
        messages.success(request, "The conformance check passed.")
    else:
        messages.error(request, "The conformance check failed; see the details below.")
    return redirect("portal:endpoint", ctx.vendor.slug, endpoint.slug)


def _preview(endpoint: Endpoint, form: PricingForm) -> dict[str, Any] | None:
    """Server-side quotes at a few utilisations (the same formula the gateway uses)."""
    if not form.is_valid():
        return None
    args = form.service_arguments()
    rows = []
    for utilisation in PREVIEW_UTILISATIONS:
        multiplier = surge_multiplier(args["surge_curve"], utilisation, args["surge_cap"])
        rows.append(
            {
                "utilisation": utilisation,
                "multiplier": multiplier,
                "input": format_usd(quote(args["price_input"], multiplier), places=4),
                "output": format_usd(quote(args["price_output"], multiplier), places=4),
            }
        )
    return {"rows": rows}


@vendor_view("pricing.manage")
def endpoint_pricing(
    request: AuthenticatedHttpRequest, ctx: VendorContext, endpoint_slug: str
) -> HttpResponse:
    endpoint = _endpoint_or_404(ctx, endpoint_slug)
    if request.method == "POST":
        form = PricingForm(request.POST)
        if form.is_valid():
            try:
                portal_endpoint_update_pricing(
                    actor=request.user, endpoint=endpoint, **form.service_arguments()
                )
            except VendorError as exc:
                form.add_error(None, _message(exc))
            else:
                messages.success(
                    request, "Prices saved. The gateway quotes them from the next request."
                )
                return redirect("portal:pricing", ctx.vendor.slug, endpoint.slug)
    else:
        form = PricingForm(initial=PricingForm.initial_for(endpoint))
    return render(
        request,
        "portal/pricing.html",
        _context(ctx, endpoint=endpoint, form=form, preview=None),
    )


@require_POST
@vendor_view("pricing.manage")
def endpoint_pricing_check(
    request: AuthenticatedHttpRequest, ctx: VendorContext, endpoint_slug: str
) -> HttpResponse:
    """The server's verdict on the edited prices and curve (an htmx fragment; saves nothing)."""
    endpoint = _endpoint_or_404(ctx, endpoint_slug)
    form = PricingForm(request.POST)
    preview = _preview(endpoint, form)
    problems = [
        f"{form[name].label}: {message}" if name != "__all__" else message
        for name, messages_ in form.errors.items()
        for message in messages_
    ]
    return render(request, "portal/pricing_check.html", {"problems": problems, "preview": preview})


@vendor_view("revenue.view")
def revenue(request: AuthenticatedHttpRequest, ctx: VendorContext) -> HttpResponse:
    """Revenue and payout statements per calendar month, from the ledger."""
    periods = vendor_revenue_periods(vendor=ctx.vendor, today=timezone.now().date())
    return render(
        request,
        "portal/revenue.html",
        _context(
            ctx,
            periods=periods,
            payouts=vendor_payouts(vendor_id=ctx.vendor.pk)[:24],
            payout_account=vendor_payout_account(vendor_id=ctx.vendor.pk),
        ),
    )


@vendor_view("revenue.view")
def revenue_csv(request: AuthenticatedHttpRequest, ctx: VendorContext, month: str) -> HttpResponse:
    """One month's statement as CSV (``YYYY-MM``)."""
    try:
        start, end = month_bounds(datetime.strptime(month, "%Y-%m").date())
    except ValueError:
        raise Http404("Not a month (YYYY-MM)") from None
    body = vendor_statement_csv(vendor=ctx.vendor, start=start, end=end)
    response = HttpResponse(body, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = (
        f'attachment; filename="{ctx.vendor.slug}-statement-{month}.csv"'
    )
    return response
