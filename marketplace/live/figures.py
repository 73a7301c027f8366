"""The figures of the live dashboards: a usage batch's sums per audience, and today's totals
for a page that (re)connects.

Keys are flat strings (``today.spend``, ``ep.12.today.requests``): the consumers forward the
values unchanged and the pages name the same keys in ``data-live-key``. Money is integer
nano-USD; the browser formats it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, time
from typing import Any

from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from billing.models import UsageRecord
from marketplace.live.groups import (
    OPS_GROUP,
    GroupMessage,
    organization_group,
    vendor_group,
)
from vendors.models import Endpoint
from vendors.selectors import routable_endpoints

USAGE_BATCH = "usage.batch"  # the consumers' handler: ``usage_batch``
SUCCESS = UsageRecord.Outcome.SUCCESS.value

# Usage figure -> how a row contributes to it.
ORGANIZATION_FIGURES = ("requests", "errors", "tokens", "spend")
VENDOR_FIGURES = ("requests", "errors", "tokens", "earnings")
OPS_FIGURES = ("requests", "errors", "spend", "revenue")


def today_start(now: datetime | None = None) -> datetime:
    """Midnight UTC of today: the dashboards' "today"."""
    day = (now or timezone.now()).astimezone(UTC).date()
    return datetime.combine(day, time.min, tzinfo=UTC)


def _contribution(row: Mapping[str, Any]) -> dict[str, int]:
    return {
        "requests": 1,
        "errors": 0 if row["outcome"] == SUCCESS else 1,
        "tokens": int(row["prompt_tokens"]) + int(row["completion_tokens"]),
        "spend": int(row["cost"]),
        "earnings": int(row["vendor_share"]),
        "revenue": int(row["platform_fee"]),
    }


def _add(into: dict[str, int], prefix: str, figures: Iterable[str], part: dict[str, int]) -> None:
    for name in figures:
        key = f"{prefix}today.{name}"
        into[key] = into.get(key, 0) + part[name]


def usage_batch_messages(
    rows: Iterable[Mapping[str, Any]], *, since: datetime | None = None
) -> list[GroupMessage]:
    """One message per organisation and per vendor in ``rows`` (recorded usage rows), and
    one for the operations group, each with the sums of the batch (rows of today only: the
    pages show today's figures)."""
    since = since or today_start()
    organizations: dict[int, dict[str, int]] = {}
    vendors: dict[int, dict[str, int]] = {}
    ops: dict[str, int] = {}
    for row in rows:
        if row["occurred_at"] < since:
            continue
        part = _contribution(row)
        _add(
            organizations.setdefault(int(row["organization_id"]), {}),
            "",
            ORGANIZATION_FIGURES,
            part,
        )
        _add(ops, "", OPS_FIGURES, part)
        endpoint_id, vendor_id = row.get("endpoint_id"), row.get("vendor_id")
        if endpoint_id is not None:
            _add(ops, f"ep.{endpoint_id}.", ("requests", "errors"), part)
        if vendor_id is not None:
            figures = vendors.setdefault(int(vendor_id), {})
            _add(figures, "", VENDOR_FIGURES, part)
            if endpoint_id is not None:
                _add(figures, f"ep.{endpoint_id}.", VENDOR_FIGURES, part)
    messages: list[GroupMessage] = [
        (organization_group(oid), {"type": USAGE_BATCH, "values": values})
        for oid, values in sorted(organizations.items())
    ]
    messages += [
        (vendor_group(vid), {"type": USAGE_BATCH, "values": values})
        for vid, values in sorted(vendors.items())
    ]
    if ops:
        messages.append((OPS_GROUP, {"type": USAGE_BATCH, "values": ops}))
    return messages


# --- today's totals (a page that connects or reconnects starts from these) ------------------


def _metrics() -> dict[str, Any]:
    return {
        "requests": Count("id"),
        "errors": Count("id", filter=~Q(outcome=SUCCESS)),
        "prompt": Coalesce(Sum("prompt_tokens"), 0),
        "completion": Coalesce(Sum("completion_tokens"), 0),
        "spend": Coalesce(Sum("cost"), 0),
        "earnings": Coalesce(Sum("vendor_share"), 0),
        "revenue": Coalesce(Sum("platform_fee"), 0),
    }


def _figures(prefix: str, names: Iterable[str], values: Mapping[str, Any]) -> dict[str, int]:
    values = {**values, "tokens": int(values["prompt"]) + int(values["completion"])}
    return {f"{prefix}today.{name}": int(values[name]) for name in names}


def organization_today(organization_id: int) -> dict[str, int]:
    """Today's usage figures of one organisation (one indexed aggregate)."""
    records = UsageRecord.objects.filter(
        organization_id=organization_id, occurred_at__gte=today_start()
    )
    return _figures("", ORGANIZATION_FIGURES, records.aggregate(**_metrics()))


def _zeros(endpoint_ids: Iterable[int], names: Iterable[str]) -> dict[str, int]:
    return {f"ep.{ep}.today.{name}": 0 for ep in endpoint_ids for name in names}


def vendor_today(vendor_id: int) -> dict[str, int]:
    """Today's usage figures of one vendor, in total and per endpoint (every endpoint)."""
    records = UsageRecord.objects.filter(vendor_id=vendor_id, occurred_at__gte=today_start())
    figures = _figures("", VENDOR_FIGURES, records.aggregate(**_metrics()))
    endpoint_ids = Endpoint.objects.filter(vendor_id=vendor_id).values_list("pk", flat=True)
    figures.update(_zeros(endpoint_ids, VENDOR_FIGURES))
    for row in records.values("endpoint_id").annotate(**_metrics()).order_by():
        if row["endpoint_id"] is not None:
            figures.update(_figures(f"ep.{row['endpoint_id']}.", VENDOR_FIGURES, row))
    return figures


def ops_today() -> dict[str, int]:
    """Today's usage figures of the whole platform, in total and per endpoint (every
    endpoint in rotation)."""
    records = UsageRecord.objects.filter(occurred_at__gte=today_start())
    figures = _figures("", OPS_FIGURES, records.aggregate(**_metrics()))
    in_rotation = routable_endpoints().values_list("pk", flat=True)
    figures.update(_zeros(in_rotation, ("requests", "errors")))
    for row in records.values("endpoint_id").annotate(**_metrics()).order_by():
        if row["endpoint_id"] is not None:
            figures.update(_figures(f"ep.{row['endpoint_id']}.", ("requests", "errors"), row))
    return figures
