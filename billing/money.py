"""Money: integers of one nano-US-dollar (1e-9 USD), everywhere.

Per-token prices of small models are tiny (a price of $0.02 per million tokens is 20 nano-USD
per token), so a sub-cent unit keeps every amount an exact integer that PostgreSQL
(``bigint``: up to 9.2 billion USD) and Redis (``INCRBY``: signed 64-bit) add without
rounding. Prices are quoted per million tokens, in nano-USD. Conversions to other units
(Stripe's integer cents, display strings) happen here and nowhere else.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
NANOS_PER_CENT = 10_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
# The largest amount PostgreSQL's bigint and Redis's integers hold (about 9.2 billion USD).
MAX_NANOS = 2**63 - 1

Nanos = int


class MoneyError(ValueError):
    """An amount that cannot be represented exactly (too precise, not a number)."""


def usd_to_nanos(amount: str | Decimal | int) -> Nanos:
    """Parse a US-dollar amount (``"12.50"``) into nanos, refusing sub-nano precision and
    amounts beyond ``MAX_NANOS`` either way.

    The size is checked on the Decimal, before any integer is made: ``"1e330000"`` is eight
    bytes, and turning it into an int took seconds of CPU.
    """
    try:
        value = Decimal(str(amount)) * NANOS_PER_USD
    except InvalidOperation:
        raise MoneyError(f"not an amount: {amount!r}") from None
    except ArithmeticError:  # decimal.Overflow: beyond what a Decimal holds
        raise MoneyError(f"{amount!r} is too large an amount") from None
    if not value.is_finite():
        raise MoneyError(f"not an amount: {amount!r}")
    if abs(value) > MAX_NANOS:
        raise MoneyError(f"{amount!r} is too large an amount")
    if value != value.to_integral_value():
        raise MoneyError(f"{amount!r} has more precision than one nano-dollar")
    return int(value)


def cents_to_nanos(cents: int) -> Nanos:
    """Stripe's integer cents (USD) to nanos."""
    return cents * NANOS_PER_CENT


def nanos_to_cents(nanos: Nanos) -> int:
    """Nanos to whole cents, rounding half up (only for Stripe amounts we send)."""
    return int((Decimal(nanos) / NANOS_PER_CENT).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def nanos_to_cents_floor(nanos: Nanos) -> int:
    """Nanos to whole cents, rounding down (money we pay out: never more than we owe).

    The sub-cent remainder stays where it was (a vendor's payable) for the next payout.
    """
    if nanos < 0:
        raise MoneyError("a payout amount is never negative")
    return nanos // NANOS_PER_CENT


def nanos_to_usd(nanos: Nanos) -> Decimal:
    return Decimal(nanos) / NANOS_PER_USD


def format_usd(nanos: Nanos, places: int = 6) -> str:
    """A display string such as ``$0.000123``; never used for arithmetic."""
    quantum = Decimal(1).scaleb(-places)
    value = (Decimal(nanos) / NANOS_PER_USD).quantize(quantum, rounding=ROUND_HALF_UP)
    return f"-${-value}" if value < 0 else f"${value}"


def format_usd_plain(nanos: Nanos) -> str:
    """A fixed nine-place decimal string (``-1.250000000``) for exports such as CSV statements."""
    value = (Decimal(nanos) / NANOS_PER_USD).quantize(Decimal(1).scaleb(-9))
    return f"{value:f}"


def token_cost(tokens: int, price_per_million: Nanos) -> Nanos:
    """The cost of ``tokens`` at ``price_per_million`` nanos, rounded up to a whole nano.

    Rounding up (at most one nano per price component and request) keeps the ledger exact
    in integers; the customer is never charged less than the quoted price.
    """
    if tokens < 0 or price_per_million < 0:
        raise MoneyError("tokens and prices are never negative")
    return -(-tokens * price_per_million // TOKENS_PER_PRICE_UNIT)


def request_cost(
    prompt_tokens: int, completion_tokens: int, price_in: Nanos, price_out: Nanos
) -> Nanos:
    """The charge for one request at its quoted input and output prices."""
    return token_cost(prompt_tokens, price_in) + token_cost(completion_tokens, price_out)


def split_fee(charge: Nanos, fee_bps: int) -> tuple[Nanos, Nanos]:
    """Split a charge into (vendor share, platform fee); the two always add up to it."""
    fee = charge * fee_bps // 10_000
    return charge - fee, fee
