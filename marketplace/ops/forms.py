"""Forms of the operations pages: the shape of the input; the billing services decide."""

from __future__ import annotations

from datetime import date
from typing import Any

from django import forms

from marketplace.models import Organization

MAX_REFUND_DAYS = 366
MAX_SETTLEMENT_DAYS = 92


class RequestRefundForm(forms.Form):
    request_id = forms.CharField(
        label="Request id",
        max_length=64,
        help_text="The id the gateway answered with, e.g. gen-3f2a… (in the usage CSV too).",
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )
    reason = forms.CharField(
        label="Reason",
        max_length=500,
        help_text="Kept with the refund and in the audit log.",
    )


class PeriodRefundForm(forms.Form):
    organization = forms.SlugField(
        label="Organisation (slug)",
        max_length=64,
        help_text="The part after /console/ in its console address.",
    )
    start = forms.DateField(label="From (UTC)", widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(
        label="To (UTC, included)", widget=forms.DateInput(attrs={"type": "date"})
    )
    reason = forms.CharField(label="Reason", max_length=500)

    def clean_organization(self) -> Organization:
        slug = self.cleaned_data["organization"]
        organization = Organization.objects.filter(slug=slug).first()
        if organization is None:
            raise forms.ValidationError("No organisation has that slug.")
        return organization

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        _check_days(self, data, MAX_REFUND_DAYS)
        return data


class SettlementForm(forms.Form):
    period_start = forms.DateField(
        label="First day (UTC)", widget=forms.DateInput(attrs={"type": "date"})
    )
    period_end = forms.DateField(
        label="Last day (UTC, included)", widget=forms.DateInput(attrs={"type": "date"})
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        _check_days(self, data, MAX_SETTLEMENT_DAYS, start="period_start", end="period_end")
        return data


def _check_days(
    form: forms.Form, data: dict[str, Any], most: int, *, start: str = "start", end: str = "end"
) -> None:
    first: date | None = data.get(start)
    last: date | None = data.get(end)
    if first and last:
        if last < first:
            form.add_error(end, "The last day must not be before the first.")
        elif (last - first).days + 1 > most:
            form.add_error(start, f"Choose at most {most} days.")
