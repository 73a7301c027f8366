"""The gateway's live numbers per endpoint, read from Redis (``routing.live``) for the
vendor and operations dashboards: utilisation, requests in flight, current price, circuit
state, latency, error rate and requests per second.

Requests per second come from the gateway's request counters: each push keeps the counters
it saw (``PREVIOUS``) and divides the difference by the time since.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson
import redis
from django.conf import settings

from marketplace.live.groups import OPS_GROUP, GroupMessage, vendor_group
from marketplace.redis_client import sync_client
from routing.live import EndpointNumbers, read_numbers_now
from vendors import selectors as vendor_selectors
from vendors.models import Endpoint
from vendors.pricing import quote, surge_multiplier

LIVE_NUMBERS = "live.numbers"  # the consumers' handler: ``live_numbers``
PREVIOUS = "sy:livepush:last"
PREVIOUS_TTL_SECONDS = 600
NOTHING_YET = EndpointNumbers()  # an endpoint that has served nothing since Redis started


def circuit_state(opened_at: float | None, now: float, cooldown: float) -> str:
    """``closed``, ``open`` (refusing traffic) or ``half-open`` (the next request decides)."""
    if opened_at is None:
        return "closed"
    return "open" if now - opened_at < cooldown else "half-open"


def endpoint_values(
    endpoint: Endpoint,
    numbers: EndpointNumbers,
    *,
    now: float,
    rps: float | None,
) -> dict[str, Any]:
    """The live figures of one endpoint, keyed ``ep.<id>.<figure>``."""
    ep = endpoint.pk
    utilisation = numbers.utilisation
    multiplier = surge_multiplier(endpoint.surge_curve, utilisation, endpoint.surge_cap)
    success = numbers.success_ratio
    latency = numbers.latency_ms
    cooldown = float(settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS)
    values: dict[str, Any] = {
        "utilisation": round(min(max(utilisation, 0.0), 1.0), 4),
        "inflight": numbers.inflight,
        "multiplier": f"{multiplier:.2f}\N{MULTIPLICATION SIGN}",
        "price_input": quote(endpoint.price_input, multiplier),
        "price_output": quote(endpoint.price_output, multiplier),
        "circuit": circuit_state(numbers.circuit_opened_at, now, cooldown),
        "latency": round(latency) if latency is not None else None,
        "error_rate": round(1.0 - success, 4) if success is not None else None,
        "rps": round(rps, 2) if rps is not None else None,
    }
    return {f"ep.{ep}.{name}": value for name, value in values.items()}


def _read(
    client: redis.Redis, endpoints: list[Endpoint]
) -> tuple[dict[int, EndpointNumbers], dict[str, Any]]:
    numbers = read_numbers_now(client, [endpoint.pk for endpoint in endpoints])
    previous = client.get(PREVIOUS)
    try:
        last = orjson.loads(previous) if previous else {}
    except orjson.JSONDecodeError:
        last = {}
    return numbers, last if isinstance(last, dict) else {}


def endpoints_live(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    """The live figures of ``endpoints`` now (for a page's first render): two Redis round
    trips; requests per second as of the last push."""
    endpoints = list(endpoints)
    numbers, last = _read(sync_client(), endpoints)
    rates = last.get("rps") or {}
    now = time.time()
    values: dict[str, Any] = {"live.rps": round(sum(rates.values()), 2) if rates else None}
    for endpoint in endpoints:
        values.update(
            endpoint_values(
                endpoint,
                numbers.get(endpoint.pk, NOTHING_YET),
                now=now,
                rps=rates.get(str(endpoint.pk)),
            )
        )
    return values


def live_numbers_messages() -> list[GroupMessage]:
    """One message per vendor with routable endpoints and one for the operations group,
    with every endpoint's live figures; remembers the counters for the next rate."""
    endpoints = list(
        vendor_selectors.routable_endpoints()
        .select_related(None)
        .prefetch_related(None)
        .only("pk", "vendor_id", "price_input", "price_output", "surge_curve", "surge_cap")
    )
    client = sync_client()
    numbers, last = _read(client, endpoints)
    now = time.time()
    counters = {str(ep.pk): numbers.get(ep.pk, NOTHING_YET).requests for ep in endpoints}
    elapsed = now - float(last.get("at") or 0)
    previous = last.get("req") or {}
    rates: dict[str, float] = {}
    for key, count in counters.items():
        before = previous.get(key)
        if isinstance(before, int) and 0 < elapsed < PREVIOUS_TTL_SECONDS and count >= before:
            rates[key] = (count - before) / elapsed
    client.set(
        PREVIOUS,
        orjson.dumps({"at": now, "req": counters, "rps": rates}),
        ex=PREVIOUS_TTL_SECONDS,
    )
    by_vendor: dict[int, dict[str, Any]] = {}
    everything: dict[str, Any] = {}
    for endpoint in endpoints:
        values = endpoint_values(
            endpoint,
            numbers.get(endpoint.pk, NOTHING_YET),
            now=now,
            rps=rates.get(str(endpoint.pk)),
        )
        by_vendor.setdefault(endpoint.vendor_id, {}).update(values)
        everything.update(values)
    everything["live.rps"] = round(sum(rates.values()), 2) if rates else None
    messages: list[GroupMessage] = [
        (vendor_group(vid), {"type": LIVE_NUMBERS, "values": values})
        for vid, values in sorted(by_vendor.items())
    ]
    messages.append((OPS_GROUP, {"type": LIVE_NUMBERS, "values": everything}))
    return messages
