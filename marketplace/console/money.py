"""Console pages about money: credits (balance and ledger) and usage (with CSV export)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from urllib.parse import quote

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse

from billing.errors import BillingError, PaymentProviderError
from billing.models import TopUp
from billing.money import format_usd_plain
from billing.selectors import cost_savings, organization_balance_by_id
from billing.topups import topup_checkout_create
from marketplace import selectors
from marketplace.console.access import (
    AuthenticatedHttpRequest,
    OrgContext,
    org_template_context,
    org_view,
)
from marketplace.console.forms import BudgetForm, TopUpForm, UsageRangeForm
from marketplace.console.views import service_message
from marketplace.live.figures import organization_today
from marketplace.services import ServiceError, organization_budget_update

LEDGER_PAGE_SIZE = 25


RECENT_TOPUPS = 10


def _topup_form(data: object = None) -> TopUpForm:
    return TopUpForm(
        data,
        min_cents=int(settings.TOPUP_MIN_CENTS),
        max_cents=int(settings.TOPUP_MAX_CENTS),
    )


def _site_base(request: AuthenticatedHttpRequest) -> str:
    """Where Stripe sends the customer back to: ``SITE_URL``, else this request's host."""
    configured = str(getattr(settings, "SITE_URL", "") or "").rstrip("/")
    return configured or request.build_absolute_uri("/").rstrip("/")


def _topup_start(
    request: AuthenticatedHttpRequest, ctx: OrgContext, form: TopUpForm
) -> HttpResponse | None:
    """Create the Checkout session and redirect to it (303), or put the error on ``form``."""
    credits_path = reverse("console:credits", args=[ctx.organization.slug])
    base = _site_base(request)
    success_url = (
        base
        + reverse("billing:topup-return")
        + "?session_id={CHECKOUT_SESSION_ID}&next="
        + quote(credits_path, safe="/")
    )
    try:
        started = topup_checkout_create(
            organization=ctx.organization,
            amount_cents=form.cleaned_data["amount_usd"],
            success_url=success_url,
            cancel_url=base + credits_path,
            created_by=request.user,
        )
    except PaymentProviderError:
        form.add_error(
            None,
            "Our payment provider could not start the checkout, so nothing was charged. "
            "Please try again in a few minutes.",
        )
        return None
    except BillingError as exc:
        form.add_error(None, f"The top-up could not be started: {exc}.")
        return None
    if not started.url:
        form.add_error(
            None, "Our payment provider did not return a checkout page. Please try again."
        )
        return None
    response = HttpResponseRedirect(started.url)
    response.status_code = 303
    return response


@org_view("billing.view")
def credits(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    """Balance, ledger, recent top-ups and (``billing.manage``) a card top-up form."""
    can_topup = ctx.can.get("billing_manage", False)
    form = None
    if request.method == "POST":
        if not can_topup:
            raise PermissionDenied("Your role does not allow buying credit.")
        form = _topup_form(request.POST)
        if form.is_valid():
            response = _topup_start(request, ctx, form)
            if response is not None:
                return response
    ledger = selectors.organization_ledger(organization=ctx.organization)
    page = Paginator(ledger, LEDGER_PAGE_SIZE).get_page(request.GET.get("page"))
    topups = TopUp.objects.filter(organization=ctx.organization).order_by("-created_at", "-pk")[
        :RECENT_TOPUPS
    ]
    return render(
        request,
        "console/credits.html",
        org_template_context(
            ctx,
            balance=organization_balance_by_id(ctx.organization.pk),
            page=page,
            can_topup=can_topup,
            topup_form=(form or _topup_form()) if can_topup else None,
            topups=list(topups),
        ),
    )


@org_view("usage.view")
def usage(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    form = UsageRangeForm.from_query(request.GET)
    start, end = form.range()
    report = selectors.usage_report(organization=ctx.organization, start=start, end=end)
    return render(
        request,
        "console/usage.html",
        org_template_context(
            ctx,
            form=form,
            report=report,
            chart=report.chart_data(),
            savings=cost_savings(ctx.organization, *selectors.usage_window(start, end)),
            live=organization_today(ctx.organization.pk),
        ),
    )


class _Echo:
    """A file-like object whose ``write`` returns the line (for streaming csv.writer)."""

    def write(self, value: str) -> str:
        return value


CSV_COLUMNS = [
    "request_id",
    "occurred_at",
    "api_key_prefix",
    "api_key_name",
    "model_requested",
    "endpoint",
    "vendor",
    "outcome",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "latency_ms",
    "attempts",
    "cache",
    "cache_saved_usd",
    "privacy_action",
    "privacy_found",
]


@org_view("usage.view")
def usage_csv(request: AuthenticatedHttpRequest, ctx: OrgContext) -> StreamingHttpResponse:
    """Every request of the range, one row each (cost exact to the nano-dollar)."""
    start, end = UsageRangeForm.from_query(request.GET).range()
    records = selectors.usage_records_export(organization=ctx.organization, start=start, end=end)
    writer = csv.writer(_Echo())

    def rows() -> Iterator[str]:
        yield writer.writerow(CSV_COLUMNS)
        for r in records:
            yield writer.writerow(
                [
                    r.request_id,
                    r.occurred_at.isoformat(),
                    r.api_key.prefix if r.api_key else "",
                    r.api_key.name if r.api_key else "",
                    r.model_requested,
                    r.endpoint.full_slug if r.endpoint else "",
                    r.vendor.slug if r.vendor else "",
                    r.outcome,
                    "true" if r.stream else "false",
                    r.prompt_tokens,
                    r.completion_tokens,
                    format_usd_plain(r.cost),
                    r.latency_ms,
                    r.attempts,
                    r.cache,
                    format_usd_plain(r.cache_saved),
                    r.privacy_action,
                    r.privacy_found,
                ]
            )

    response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
    filename = f"usage-{ctx.organization.slug}-{start.isoformat()}-{end.isoformat()}.csv"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@org_view("billing.manage")
def budget(request: AuthenticatedHttpRequest, ctx: OrgContext) -> HttpResponse:
    """Monthly budget, alert levels and reference prices (owners and billing members)."""
    form = BudgetForm(request.POST) if request.method == "POST" else None
    if form is not None and form.is_valid():
        try:
            organization_budget_update(
                actor=request.user, organization=ctx.organization, **form.service_arguments()
            )
        except ServiceError as exc:
            form.add_error(None, service_message(exc))
        else:
            messages.success(request, "Budget settings saved.")
            return redirect("console:budget", ctx.organization.slug)
    return render(
        request,
        "console/budget.html",
        org_template_context(ctx, form=form or BudgetForm.for_organization(ctx.organization)),
    )
