"""Surge curves: how an endpoint's price rises with its utilisation.

A curve is a list of ``[utilisation, multiplier]`` points with utilisation from 0 to 1
(in-flight requests / capacity), strictly increasing utilisation and non-decreasing
multipliers of at least 1. Between points the multiplier is interpolated linearly; past
the last point it stays at the last multiplier; the result never exceeds the endpoint's cap.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

# Each endpoint's live numbers are one Redis hash, ``sy:ep:<id>``, written by the gateway
# (routing.live); its smoothed utilisation (0..1) is the field ``u``, which the vendor API
# reads to show the price right now.
LIVE_KEY_PREFIX = "sy:ep:"
LIVE_UTILISATION_FIELD = "u"


def live_key(endpoint_id: int | str) -> str:
    return f"{LIVE_KEY_PREFIX}{endpoint_id}"


class SurgeCurveError(ValueError):
    pass


def validate_surge_curve(curve: Sequence[Sequence[float]]) -> None:
    if not isinstance(curve, list | tuple) or not curve:
        raise SurgeCurveError("the surge curve needs at least one [utilisation, multiplier] point")
    previous_u, previous_m = -1.0, 1.0
    for point in curve:
        if not isinstance(point, list | tuple) or len(point) != 2:
            raise SurgeCurveError("each point is [utilisation, multiplier]")
        u, m = point
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (u, m)):
            raise SurgeCurveError("utilisation and multiplier must be numbers")
        if not 0.0 <= u <= 1.0:
            raise SurgeCurveError("utilisation must lie between 0 and 1")
        if u <= previous_u:
            raise SurgeCurveError("utilisation points must increase")
        if m < 1.0 or m < previous_m:
            raise SurgeCurveError("multipliers start at 1 or more and never decrease")
        if m > 100:
            raise SurgeCurveError("a multiplier above 100 is not accepted")
        previous_u, previous_m = float(u), float(m)


def surge_multiplier(curve: Sequence[Sequence[float]], utilisation: float, cap: float) -> float:
    """The price multiplier at ``utilisation`` (monotone in utilisation, at most ``cap``)."""
    u = min(max(utilisation, 0.0), 1.0)
    multiplier = float(curve[0][1])
    for (u0, m0), (u1, m1) in itertools.pairwise(curve):
        if u <= u0:
            break
        if u >= u1:
            multiplier = float(m1)
            continue
        multiplier = m0 + (m1 - m0) * (u - u0) / (u1 - u0)
        break
    return max(1.0, min(multiplier, cap))


def quote(base_price: int, multiplier: float) -> int:
    """The quoted price in nanos per million tokens (rounded up to a whole nano)."""
    scaled = base_price * round(multiplier * 10_000)
    return -(-scaled // 10_000)
