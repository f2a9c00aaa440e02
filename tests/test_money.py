from decimal import Decimal

import pytest

from bastion.money import MoneyError, cost_nanos, format_usd, parse_usd


def test_parse_and_format_round_trip_exactly():
    assert parse_usd("0.10") == 100_000_000
    assert parse_usd("-0.50") == -500_000_000
    assert parse_usd(Decimal("12.000000001")) == 12_000_000_001
    assert format_usd(parse_usd("10")) == "10.00"
    assert format_usd(1) == "0.000000001"
    assert format_usd(-500_000_000) == "-0.50"


@pytest.mark.parametrize("bad", ["abc", "1e400x", "0.0000000001", "NaN", "inf", ""])
def test_parse_refuses_inexact_or_garbage(bad):
    with pytest.raises(MoneyError):
        parse_usd(bad)


def test_parse_refuses_floats():
    with pytest.raises(MoneyError):
        parse_usd(0.1)  # type: ignore[arg-type]


def test_cost_is_integer_and_rounds_up_once():
    # 1000 tokens at $0.10/1M + 100 at $0.50/1M = $0.0001 + $0.00005
    assert cost_nanos(1000, 100, parse_usd("0.10"), parse_usd("0.50")) == 150_000
    # a third of a nano-dollar is charged as one whole nano-dollar
    assert cost_nanos(1, 0, parse_usd("0.000333"), 0) == 1
    assert cost_nanos(0, 0, parse_usd("9"), parse_usd("9")) == 0
