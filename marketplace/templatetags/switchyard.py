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


# Formats of live figures; ``static/switchyard.js`` formats updates the same way.
LIVE_FORMATS = {
    "usd": lambda v: usd(v),
    "price": lambda v: usd(v, 4),
    "int": thousands,
    "percent": percent,
    "ms": ms,
    "rate": lambda v: f"{float(v):.1f}/s",
    "text": str,
}


@register.simple_tag
def live_figure(
    values: dict[str, Any], key: str, fmt: str = "int", testid: str = "", prefix: str = ""
) -> str:
    """A figure a live dashboard updates: ``<span data-live-key=…>formatted</span>``.

    ``values`` maps flat keys (``today.spend``, ``ep.3.circuit``) to numbers or text, as the
    WebSocket messages do (``marketplace.live``); ``prefix`` is put before ``key``
    (``ep.3.``)."""
    from django.utils.html import format_html

    key = prefix + key
    value = values.get(key)
    text = DASH if value is None else LIVE_FORMATS[fmt](value)
    raw = "" if value is None else str(value)
    extra = format_html(' data-testid="{}"', testid) if testid else ""
    return format_html(
        '<span data-live-key="{}" data-live-format="{}" data-live-value="{}"{}>{}</span>',
        key,
        fmt,
        raw,
        extra,
        text,
    )
