"""Display filters for the pages: money, percentages, latencies, counts."""

from __future__ import annotations

from typing import Any

from django import template

from billing.money import format_usd

register = template.Library()

DASH = "—"


@register.filter
def usd(nanos: int | None, places: int = 6) -> str:
    """``$0.000123`` from nano-USD (``billing.money.format_usd``)."""
    if nanos is None or nanos == "":
        return DASH
    return format_usd(int(nanos), places=int(places))


@register.filter
def signed_usd(nanos: int | None, places: int = 6) -> str:
    """``+$1.000000`` / ``-$0.000123``: a ledger movement."""
    if nanos is None:
        return DASH
    text = format_usd(int(nanos), places=int(places))
    return text if text.startswith("-") else f"+{text}"


@register.filter
def percent(value: float | None, places: int = 1) -> str:
    if value is None or value == "":
        return DASH
    return f"{float(value) * 100:.{int(places)}f} %"


@register.filter
def ms(value: float | None) -> str:
    if value is None or value == "":
        return DASH
    return f"{float(value):,.0f} ms"


@register.filter
def thousands(value: Any) -> str:
    if value is None or value == "":
        return DASH
    return f"{int(value):,}"


@register.filter
def score(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{float(value):.2f}"
