"""Operations pages for money (staff only): refunds, with a confirmation step, and
settlement runs with their results. Every action goes through an audited billing service."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from billing import selectors as billing_selectors
from billing.errors import BillingError
from billing.money import format_usd
from billing.services import (
    day_bounds,
    ops_refund_period,
    ops_refund_request,
    ops_settlement_enqueue,
)
from marketplace.console.access import AuthenticatedHttpRequest
from marketplace.ops.forms import PeriodRefundForm, RequestRefundForm, SettlementForm
from marketplace.ops.views import _message, staff_view
from vendors.selectors import vendor_names

QUIET_OUTCOMES = {"paid", "already_paid", "nothing_to_pay"}
PERIOD_IDS = "id_period_%s"  # both refund forms are on one page: distinct element ids


def _refunds_page(
    request: AuthenticatedHttpRequest,
    *,
    request_form: RequestRefundForm | None = None,
    period_form: PeriodRefundForm | None = None,
    status: int = 200,
) -> HttpResponse:
    return render(
        request,
        "ops/refunds.html",
        {
            "request_form": request_form or RequestRefundForm(),
            "period_form": period_form or PeriodRefundForm(auto_id=PERIOD_IDS),
            "refunds": billing_selectors.recent_refunds(),
        },
        status=status,
    )


@staff_view
def refunds(request: AuthenticatedHttpRequest) -> HttpResponse:
    return _refunds_page(request)


@require_POST
@staff_view
def refund_request(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Refund one request: the first post shows what would be refunded, the second does it."""
    form = RequestRefundForm(request.POST)
    if not form.is_valid():
        return _refunds_page(request, request_form=form)
    record = billing_selectors.usage_record_for_refund(request_id=form.cleaned_data["request_id"])
    if record is None:
        form.add_error("request_id", "No charged request has that id.")
        return _refunds_page(request, request_form=form)
    if "confirm" not in request.POST:
        return render(
            request, "ops/refund_confirm.html", {"form": form, "record": record, "kind": "request"}
        )
    try:
        refund = ops_refund_request(
            actor=request.user,
            request_id=record.request_id,
            reason=form.cleaned_data["reason"],
        )
    except BillingError as exc:
        messages.error(request, _message(exc))
    else:
        messages.success(
            request,
            f"Refunded {format_usd(refund.amount)} to {record.organization.name} "
            f"for {record.request_id}.",
        )
    return redirect("ops:refunds")


@require_POST
@staff_view
def refund_period(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Refund an organisation's period: confirm the count and amount first."""
    form = PeriodRefundForm(request.POST, auto_id=PERIOD_IDS)
    if not form.is_valid():
        return _refunds_page(request, period_form=form)
    data: dict[str, Any] = form.cleaned_data
    organization = data["organization"]
    if "confirm" not in request.POST:
        begin, finish = day_bounds(data["start"], data["end"])
        count, amount = billing_selectors.refundable_usage(
            organization=organization, start=begin, end=finish
        )
        return render(
            request,
            "ops/refund_confirm.html",
            {
                "form": form,
                "organization": organization,
                "count": count,
                "amount": amount,
                "kind": "period",
            },
        )
    try:
        summary = ops_refund_period(
            actor=request.user,
            organization=organization,
            start=data["start"],
            end=data["end"],
            reason=data["reason"],
        )
    except BillingError as exc:
        messages.error(request, _message(exc))
    else:
        if summary.refunds:
            messages.success(
                request,
                f"Refunded {summary.refunds} request{'s' if summary.refunds != 1 else ''} "
                f"of {organization.name}: {format_usd(summary.amount)} credited back.",
            )
        else:
            messages.info(request, f"{organization.name} had nothing left to refund then.")
    return redirect("ops:refunds")


@staff_view
def settlements(request: AuthenticatedHttpRequest) -> HttpResponse:
    return _settlements_page(request, SettlementForm())


def _settlements_page(
    request: AuthenticatedHttpRequest, form: SettlementForm, status: int = 200
) -> HttpResponse:
    page = Paginator(billing_selectors.settlement_runs(), 20).get_page(request.GET.get("page"))
    outcomes = [o for run in page for o in (run.report or {}).get("outcomes", [])]
    names = vendor_names(ids={o["vendor_id"] for o in outcomes})
    for run in page:
        # What did not end in a payment, for the run's summary line.
        run.problems = [  # type: ignore[attr-defined]
            {**o, "vendor": names.get(o["vendor_id"], f"vendor {o['vendor_id']}")}
            for o in (run.report or {}).get("outcomes", [])
            if o["outcome"] not in QUIET_OUTCOMES
        ]
    return render(request, "ops/settlements.html", {"form": form, "page": page}, status=status)


@require_POST
@staff_view
def settlement_run(request: AuthenticatedHttpRequest) -> HttpResponse:
    form = SettlementForm(request.POST)
    if not form.is_valid():
        return _settlements_page(request, form)
    start, end = form.cleaned_data["period_start"], form.cleaned_data["period_end"]
    try:
        ops_settlement_enqueue(actor=request.user, period_start=start, period_end=end)
    except BillingError as exc:
        form.add_error(None, _message(exc))
        return _settlements_page(request, form)
    messages.success(
        request,
        f"Settlement for {start.isoformat()}..{end.isoformat()} is queued; its result appears "
        "here when a worker has run it (reload the page).",
    )
    return redirect("ops:settlements")
