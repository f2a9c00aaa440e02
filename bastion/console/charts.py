"""Charts drawn on the server as SVG: no chart library, no script, readable anywhere.

Values are integers (nano-dollars, tokens, requests) and stay so: axis steps are round
integers chosen here, and labels go through the same formatting as the tables beneath
each chart. Only pixel positions are fractions. Colours come from CSS classes
(``tone-0``…), so the Content-Security-Policy needs no inline style.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from markupsafe import Markup, escape

WIDTH = 640
STEPS = 4  # horizontal grid lines above zero


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[int]  # one per label, ≥ 0


def nice_top(peak: int, steps: int = STEPS) -> int:
    """The smallest 1/2/5 × 10^k step whose ``steps`` multiples reach ``peak``, times steps."""
    if peak <= 0:
        return steps
    raw = -(-peak // steps)
    magnitude = 10 ** (len(str(raw)) - 1)
    for multiple in (1, 2, 5, 10):
        if multiple * magnitude >= raw:
            return multiple * magnitude * steps
    raise AssertionError("unreachable: 10 × magnitude ≥ raw")


def compact(n: int) -> str:
    """12_500_000 -> '12.5M': short axis labels (the tables show the exact numbers)."""
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= size:
            value = (Decimal(n) / size).quantize(Decimal("0.1")).normalize()
            return f"{value:f}{suffix}"
    return str(n)


def columns(
    title: str, labels: Sequence[str], series: Sequence[Series], fmt: Callable[[int], str]
) -> Markup:
    """Stacked columns, one per label (a day), over a y axis of round steps."""
    height, left, bottom, top = 240, 92, 26, 10
    plot_w, plot_h = WIDTH - left - 8, height - top - bottom
    totals = [sum(s.values[i] for s in series) for i in range(len(labels))]
    scale = nice_top(max(totals, default=0))
    out = _open(title, height)
    for step in range(STEPS + 1):
        value = scale * step // STEPS
        y = top + plot_h - plot_h * value / scale
        out.append(f'<line class="grid" x1="{left}" x2="{WIDTH - 8}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{escape(fmt(value))}</text>")  # fmt: skip
    slot = plot_w / max(len(labels), 1)
    every = -(-len(labels) // 6) or 1  # at most 6 x labels
    for i, label in enumerate(labels):
        x = left + slot * i + slot * 0.15
        base = top + plot_h
        for tone, s in enumerate(series):
            h = plot_h * s.values[i] / scale
            base -= h
            out.append(_rect(tone, x, base, slot * 0.7, h, f"{label} · {s.name}", s.values[i], fmt))
        if i % every == 0:
            out.append(f'<text class="axis" x="{x + slot * 0.35:.1f}" y="{height - 6}" '
                       f'text-anchor="middle">{escape(label)}</text>')  # fmt: skip
    return _close(out)


def bars(
    title: str, labels: Sequence[str], series: Sequence[Series], fmt: Callable[[int], str]
) -> Markup:
    """Stacked horizontal bars, one per label (a model), each under its label at full
    width, so a long model id never crowds the bars, even on a phone."""
    row, left, top = 46, 8, 4
    rows_h = row * max(len(labels), 1)
    height = top + rows_h + 24
    plot_w = WIDTH - 2 * left
    totals = [sum(s.values[i] for s in series) for i in range(len(labels))]
    scale = nice_top(max(totals, default=0))
    out = _open(title, height)
    anchors = ["start"] + ["middle"] * (STEPS - 1) + ["end"]
    for step in range(STEPS + 1):
        value = scale * step // STEPS
        x = left + plot_w * value / scale
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + rows_h}"/>')
        out.append(f'<text class="axis" x="{x:.1f}" y="{top + rows_h + 18}" '
                   f'text-anchor="{anchors[step]}">{escape(fmt(value))}</text>')  # fmt: skip
    for i, label in enumerate(labels):
        y = top + row * i
        out.append(f'<text class="label" x="{left}" y="{y + 16}">{escape(label)}</text>')
        start = float(left)
        for tone, s in enumerate(series):
            w = plot_w * s.values[i] / scale
            out.append(_rect(tone, start, y + 22, w, 18, f"{label} · {s.name}", s.values[i], fmt))
            start += w
    return _close(out)


def _rect(
    tone: int, x: float, y: float, w: float, h: float, what: str, value: int,
    fmt: Callable[[int], str],
) -> str:  # fmt: skip
    """One segment of a stacked column or bar, its exact value in the tooltip."""
    return (f'<rect class="tone-{tone}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}">'
            f"<title>{escape(f'{what}: {fmt(value)}')}</title></rect>")  # fmt: skip


def _open(title: str, height: int) -> list[str]:
    return [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
    ]


def _close(parts: list[str]) -> Markup:
    parts.append("</svg>")
    return Markup("".join(parts))  # every text inserted above was escaped
