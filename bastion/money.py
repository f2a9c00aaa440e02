"""Exact money: integer nano-dollars (1e-9 USD) everywhere, Decimal only at the edges.

Prices are configured in USD per 1M tokens and held as nano-dollars per 1M tokens,
so a cost is one integer product rounded up once per request (never a float).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


class MoneyError(ValueError):
    """An amount that is not an exact USD decimal with at most 9 places."""


def parse_usd(text: str | int | Decimal) -> int:
    """'0.50' -> 500_000_000 nano-dollars; refuses floats and sub-nano precision."""
    if isinstance(text, float):
        raise MoneyError("amounts must be decimal strings, not floats")
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise MoneyError(f"not a decimal amount: {text!r}") from None
    if not value.is_finite():
        raise MoneyError(f"not a finite amount: {text!r}")
    nanos = value * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise MoneyError(f"more than 9 decimal places: {text!r}")
    return int(nanos)


def format_usd(nanos: int) -> str:
    """500_000_000 -> '0.50'; exact, at least two decimals, no trailing zeros beyond."""
    value = (Decimal(nanos) / NANOS_PER_USD).normalize()
    _, _, exponent = value.as_tuple()
    places = max(2, -exponent if isinstance(exponent, int) else 0)
    return f"{value:.{places}f}"


def cost_nanos(
    input_tokens: int,
    output_tokens: int,
    input_price: int,
    output_price: int,
    cached_tokens: int = 0,
    cached_price: int = 0,
) -> int:
    """Cost in nano-dollars of a request; prices in nano-dollars per 1M tokens; rounds up.

    ``cached_tokens`` are part of ``input_tokens``, priced at ``cached_price`` instead."""
    total = (
        (input_tokens - cached_tokens) * input_price
        + cached_tokens * cached_price
        + output_tokens * output_price
    )
    return -(-total // TOKENS_PER_PRICE_UNIT)
