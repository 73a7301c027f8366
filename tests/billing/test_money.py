import pytest

from billing.money import (
    MoneyError,
    cents_to_nanos,
    format_usd,
    nanos_to_cents,
    request_cost,
    split_fee,
    token_cost,
    usd_to_nanos,
)


def test_it_parses_dollars_exactly():
    assert usd_to_nanos("12.50") == 12_500_000_000
    assert usd_to_nanos("0.000000001") == 1
    assert usd_to_nanos("9223372036.854775807") == 2**63 - 1  # the largest amount stored
    assert usd_to_nanos("1e3") == 1_000_000_000_000


@pytest.mark.parametrize(
    "bad",
    [
        "0.0000000001",
        "abc",
        "NaN",
        "Infinity",
        # Beyond PostgreSQL's bigint and Redis's integers, either way...
        "9223372036.854775808",
        "-9223372036.854775808",
        # ...and short strings whose integer would take seconds of CPU to build.
        "1e330000",
        "-1e330000",
        "1e999999999",  # beyond what a Decimal holds (decimal.Overflow)
        "1e-990000",
    ],
)
def test_it_refuses_amounts_it_cannot_represent(bad):
    with pytest.raises(MoneyError):
        usd_to_nanos(bad)


def test_it_rounds_token_costs_up_to_a_whole_nano():
    # 3 tokens at 1 nano per million tokens is 3e-6 nanos: charged as one nano.
    assert token_cost(3, 1) == 1
    assert token_cost(0, 1_000) == 0
    assert token_cost(1_000_000, 200_000_000) == 200_000_000


def test_it_prices_a_request_from_both_components():
    assert request_cost(1000, 500, usd_to_nanos("1"), usd_to_nanos("2")) == 1000 * 1000 + 500 * 2000


def test_it_splits_a_fee_without_losing_a_nano():
    for charge in (0, 1, 7, 999, 10**12 + 3):
        share, fee = split_fee(charge, 2000)
        assert share + fee == charge
        assert 0 <= fee <= charge // 5


def test_it_converts_stripe_cents_in_one_place():
    assert cents_to_nanos(1999) == usd_to_nanos("19.99")
    assert nanos_to_cents(usd_to_nanos("19.994")) == 1999
    assert nanos_to_cents(usd_to_nanos("19.995")) == 2000


def test_it_formats_for_display_only():
    assert format_usd(usd_to_nanos("1.5")) == "$1.500000"
    assert format_usd(-usd_to_nanos("0.25"), places=2) == "-$0.25"
