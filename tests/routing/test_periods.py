"""Credit-limit periods: the id and TTL of a key's (and an organisation's) spend counter."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from routing.gateway.proxy import CurrentPeriods


def _at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("period", "before", "after", "ids", "ttl_after"),
    [
        # The last half second of January, then the first instant of February.
        (
            "monthly",
            (2026, 1, 31, 23, 59, 59, 500_000),
            (2026, 2, 1),
            ("m20260101", "m20260201"),
            28 * 86400 + 3600,
        ),
        # Sunday night, then Monday: weeks start on Monday.
        (
            "weekly",
            (2026, 11, 29, 23, 59, 59, 500_000),
            (2026, 11, 30),
            ("w20261123", "w20261130"),
            7 * 86400 + 3600,
        ),
        (
            "daily",
            (2026, 11, 28, 23, 59, 59, 500_000),
            (2026, 11, 29),
            ("d20261128", "d20261129"),
            86400 + 3600,
        ),
    ],
)
def test_a_kept_period_ends_exactly_at_its_boundary(period, before, after, ids, ttl_after):
    periods = CurrentPeriods()
    first = periods(period, _at(*before))
    assert first == (ids[0], 3600)  # under a second left, and the counter outlives it by 1 h
    assert periods(period, _at(*before) + 0.25) == (ids[0], 3600)  # kept, same answer
    assert periods(period, _at(*after)) == (ids[1], ttl_after)


def test_the_ttl_counts_down_within_a_kept_period():
    periods = CurrentPeriods()
    assert periods("monthly", _at(2026, 2, 1)) == ("m20260201", 28 * 86400 + 3600)
    assert periods("monthly", _at(2026, 2, 27)) == ("m20260201", 2 * 86400 + 3600)
    assert periods("monthly", _at(2028, 2, 1)) == ("m20280201", 29 * 86400 + 3600)  # leap


def test_a_clock_stepping_back_gets_the_earlier_period():
    periods = CurrentPeriods()
    assert periods("daily", _at(2026, 11, 29, 0, 0, 1))[0] == "d20261129"
    assert periods("daily", _at(2026, 11, 28, 23, 59, 59))[0] == "d20261128"


def test_a_limit_that_never_resets_has_one_period():
    periods = CurrentPeriods()
    assert periods("never", _at(2026, 1, 1)) == ("all", 400 * 24 * 3600)
    assert periods("never", _at(2036, 1, 1)) == ("all", 400 * 24 * 3600)


def test_the_present_moment_is_the_default():
    ident, ttl = CurrentPeriods()("monthly")
    assert ident == f"m{datetime.now(UTC):%Y%m}01"
    assert 3600 < ttl <= 31 * 86400 + 3600
