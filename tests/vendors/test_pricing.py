"""Property tests of surge pricing (hypothesis): over any valid curve and cap the
multiplier is monotone in utilisation, at least 1 and at most the cap, and the quote never
falls below the base price; the gateway's vectorised curve agrees with it."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from routing.scoring import surge_multipliers
from vendors.pricing import quote, surge_multiplier, validate_surge_curve


# Valid curves: increasing utilisations in [0, 1], non-decreasing multipliers from 1 to 100.
def _curve(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    xs, ys = sorted(u for u, _ in points), sorted(m for _, m in points)
    return list(zip(xs, ys, strict=True))


curves = st.lists(
    st.tuples(st.floats(0, 1), st.floats(1, 100)), min_size=1, max_size=6, unique_by=lambda p: p[0]
).map(_curve)
caps = st.floats(1, 100)
utilisations = st.floats(-1, 3, allow_nan=False)
SETTINGS = settings(max_examples=300, deadline=None)


@SETTINGS
@given(curve=curves, cap=caps, u1=utilisations, u2=utilisations)
def test_the_multiplier_is_monotone_in_utilisation_and_capped(curve, cap, u1, u2):
    validate_surge_curve(curve)
    low, high = sorted((u1, u2))
    m_low, m_high = surge_multiplier(curve, low, cap), surge_multiplier(curve, high, cap)
    assert 1.0 <= m_low <= m_high <= cap
    assert m_high <= max(m for _, m in curve)
    # Past full load the price stops rising; below no load it does not fall.
    assert surge_multiplier(curve, 1.0, cap) == surge_multiplier(curve, max(high, 1.0), cap)
    assert surge_multiplier(curve, 0.0, cap) == surge_multiplier(curve, min(low, 0.0), cap)


@SETTINGS
@given(
    curve=curves,
    cap=caps,
    u1=utilisations,
    u2=utilisations,
    base=st.integers(0, 10**13),
)
def test_the_quote_rises_with_load_from_the_base_price_to_the_capped_price(
    curve, cap, u1, u2, base
):
    low, high = sorted((u1, u2))
    q_low = quote(base, surge_multiplier(curve, low, cap))
    q_high = quote(base, surge_multiplier(curve, high, cap))
    assert base <= q_low <= q_high <= quote(base, cap)
    assert isinstance(q_high, int)


@SETTINGS
@given(curve=curves, cap=caps, u=st.lists(utilisations, min_size=1, max_size=8))
def test_the_gateways_vectorised_curve_is_the_same_function(curve, cap, u):
    padding = 6 - len(curve)
    x = np.array([[p[0] for p in curve] + [2.0 + k for k in range(padding)]] * len(u))
    y = np.array([[p[1] for p in curve] + [curve[-1][1]] * padding] * len(u))
    vectorised = surge_multipliers(x, y, np.array([cap] * len(u)), np.array(u))
    assert list(vectorised) == [surge_multiplier(curve, value, cap) for value in u]
