"""The usage page's numbers: per UTC day and per model, over a period of whole days.

Sums come from the store's grouped totals (``usage_totals``: the database does the
grouping, as for ``bastion usage --group-by``); refusals are kept per hour, so a day's
count is one query over its 24 hours. Every day of the period gets a row, zero or
not, so a chart's columns are evenly spaced in time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from bastion.console.charts import Series, bars, columns, compact
from bastion.money import format_usd
from bastion.store import Store, UsageTotal
from bastion.store.usage import DAY_US

DEFAULT_DAYS = 30
MAX_DAYS = 366
_EPOCH = date(1970, 1, 1)
_SUMS = ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "cost", "uncharged")


@dataclass(frozen=True)
class Period:
    """Whole UTC days, ``first`` to ``last`` inclusive."""

    first: date
    last: date

    @property
    def since_us(self) -> int:
        return (self.first - _EPOCH).days * DAY_US

    @property
    def until_us(self) -> int:
        return ((self.last - _EPOCH).days + 1) * DAY_US

    @property
    def days(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range((self.last - self.first).days + 1)]


@dataclass
class Row:
    """One day's or one model's sums (``label``: 2026-01-31 or a model id)."""

    label: str
    requests: int = 0
    refused: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0  # nano-dollars
    uncharged: int = 0

    def add(self, t: UsageTotal | Row) -> None:
        for name in _SUMS:
            setattr(self, name, getattr(self, name) + getattr(t, name))


def today() -> date:
    return datetime.now(UTC).date()


def last_days(n: int, end: date | None = None) -> Period:
    end = end or today()
    return Period(end - timedelta(days=n - 1), end)


def parse_period(query: Mapping[str, str], now: date | None = None) -> Period:
    """``since``/``until`` as YYYY-MM-DD (inclusive); absent: the last 30 days.
    ValueError says what is wrong, for the page to show."""
    default = last_days(DEFAULT_DAYS, now)
    try:
        first = date.fromisoformat(query["since"]) if query.get("since") else default.first
        last = date.fromisoformat(query["until"]) if query.get("until") else default.last
    except ValueError:
        raise ValueError("dates are YYYY-MM-DD, e.g. 2026-01-31") from None
    if last < first:
        raise ValueError("the period ends before it starts")
    if (last - first).days + 1 > MAX_DAYS:
        raise ValueError(f"a period is at most {MAX_DAYS} days")
    return Period(first, last)


async def per_day(store: Store, account: str | None, period: Period) -> list[Row]:
    """A row for every day of the period, with its requests, tokens, spend and refusals."""
    rows = {d: Row(d.isoformat()) for d in period.days}
    for t in await store.usage_totals(["day"], account, None, period.since_us, period.until_us):
        rows[_EPOCH + timedelta(microseconds=t.day or 0)].add(t)
    for d, row in rows.items():
        since = (d - _EPOCH).days * DAY_US
        found = await store.refusals(account, since, since + DAY_US)
        row.refused = sum(r.count for r in found)
    return list(rows.values())


async def per_model(store: Store, account: str | None, period: Period) -> list[Row]:
    """A row per model that served requests in the period, largest spend first."""
    found = await store.usage_totals(["model"], account, None, period.since_us, period.until_us)
    rows = []
    for t in found:
        row = Row(t.model or "")
        row.add(t)
        rows.append(row)
    return sorted(rows, key=lambda r: (-r.cost, r.label))


def total(rows: list[Row]) -> Row:
    """The sums of the rows (the tables' last line)."""
    out = Row("total")
    for r in rows:
        out.add(r)
        out.refused += r.refused
    return out


def day_charts(days: list[Row]) -> dict[str, object]:
    """Spend, tokens, and requests with refusals per day: SVG, labelled MM-DD."""
    labels = [r.label[5:] for r in days]
    traffic = [Series("requests", [r.requests for r in days]),
               Series("refused", [r.refused for r in days])]  # fmt: skip
    return {
        "spend": columns("Spend per day (USD)", labels, _spend(days), format_usd),
        "tokens": columns("Tokens per day", labels, _tokens(days), compact),
        "traffic": columns("Requests and refusals per day", labels, traffic, compact),
    }


def model_charts(models: list[Row]) -> dict[str, object]:
    """Spend and tokens per model: horizontal bars, the model ids readable at the left."""
    labels = [r.label for r in models]
    return {
        "spend": bars("Spend per model (USD)", labels, _spend(models), format_usd),
        "tokens": bars("Tokens per model", labels, _tokens(models), compact),
    }


def _spend(rows: list[Row]) -> list[Series]:
    return [Series("spend", [r.cost for r in rows])]


def _tokens(rows: list[Row]) -> list[Series]:
    return [Series("input", [r.input_tokens for r in rows]),
            Series("output", [r.output_tokens for r in rows])]  # fmt: skip
