"""Money conversions used by payouts and statements."""

from __future__ import annotations

import pytest

from billing.money import MoneyError, format_usd_plain, nanos_to_cents_floor


def test_payouts_round_down_to_a_cent():
    assert nanos_to_cents_floor(19_999_999) == 1
    assert nanos_to_cents_floor(20_000_000) == 2
    assert nanos_to_cents_floor(0) == 0
    with pytest.raises(MoneyError):
        nanos_to_cents_floor(-1)


def test_statements_show_every_nano():
    assert format_usd_plain(1) == "0.000000001"
    assert format_usd_plain(-1_250_000_000) == "-1.250000000"
    assert format_usd_plain(0) == "0.000000000"
