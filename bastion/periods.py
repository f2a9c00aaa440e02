"""Spend-limit periods: when a key's limit resets (UTC; weeks start on Monday).

A key's spend limit applies per period: ``never`` (one period for all time),
``daily``, ``weekly`` or ``monthly``, each starting at 00:00 UTC. Times are µs since
the epoch, as everywhere in the store.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

RESETS = ("never", "daily", "weekly", "monthly")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_US = 86_400_000_000


def _us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def period_start(reset: str, now_us: int) -> int:
    """Start of the period ``now_us`` falls in (0 for ``never``)."""
    if reset == "never":
        return 0
    day = now_us - now_us % _DAY_US
    if reset == "daily":
        return day
    moment = _EPOCH + timedelta(microseconds=day)
    if reset == "weekly":
        return day - moment.weekday() * _DAY_US
    if reset == "monthly":
        return _us(moment.replace(day=1))
    raise ValueError(f"unknown limit reset {reset!r}: use one of {', '.join(RESETS)}")


def period_end(reset: str, now_us: int) -> int | None:
    """When the period ``now_us`` falls in ends and the limit resets (None for ``never``)."""
    start = period_start(reset, now_us)
    if reset == "never":
        return None
    if reset == "daily":
        return start + _DAY_US
    if reset == "weekly":
        return start + 7 * _DAY_US
    moment = _EPOCH + timedelta(microseconds=start)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return _us(moment.replace(year=year, month=month))
