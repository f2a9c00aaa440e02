"""Spend-limit periods start at 00:00 UTC; weeks on Monday; months on the 1st."""

from datetime import UTC, datetime, timedelta

import pytest

from bastion.periods import period_end, period_start

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def us(text: str) -> int:
    text = text.replace("T00Z", "T00:00:00Z")
    return (datetime.fromisoformat(text) - EPOCH) // timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("reset", "now", "start", "end"),
    [
        ("daily", "2026-12-05T23:59:59.999999Z", "2026-12-05T00Z", "2026-12-06T00Z"),
        ("daily", "2026-12-06T00Z", "2026-12-06T00Z", "2026-12-07T00Z"),
        ("weekly", "2026-12-05T12:00:00Z", "2026-11-30T00Z", "2026-12-07T00Z"),
        ("weekly", "2026-11-30T00Z", "2026-11-30T00Z", "2026-12-07T00Z"),
        ("monthly", "2026-12-31T23:00:00Z", "2026-12-01T00Z", "2027-01-01T00Z"),
        ("monthly", "2028-02-29T08:00:00Z", "2028-02-01T00Z", "2028-03-01T00Z"),
        ("daily", "2026-12-05T23:30:00-02:00", "2026-12-06T00Z", "2026-12-07T00Z"),
    ],
)  # fmt: skip
def test_periods(reset, now, start, end):
    assert period_start(reset, us(now)) == us(start)
    assert period_end(reset, us(now)) == us(end)


def test_never_is_one_period_and_unknown_is_refused():
    assert period_start("never", us("2026-12-05T12:00:00Z")) == 0
    assert period_end("never", 123) is None
    with pytest.raises(ValueError, match="unknown limit reset"):
        period_start("hourly", 0)
