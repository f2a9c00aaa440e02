"""One finding: what ``bastion doctor`` saw, how bad it is, and what to do about it.

Every check returns findings rather than raising, so a broken part of the setup is
reported next to the healthy ones instead of hiding them behind a traceback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Level = Literal["ok", "warning", "error"]
LEVELS: tuple[Level, ...] = ("ok", "warning", "error")


@dataclass(frozen=True)
class Finding:
    check: str  # the group: "config", "store", "ratelimit", "upstream NAME", "models", …
    level: Level
    title: str  # a few words
    detail: str  # what was found
    fix: str = ""  # a concrete action; empty for ``ok`` findings

    def as_json(self) -> dict[str, str]:
        return asdict(self)


def ok(check: str, title: str, detail: str) -> Finding:
    return Finding(check, "ok", title, detail)


def warning(check: str, title: str, detail: str, fix: str) -> Finding:
    return Finding(check, "warning", title, detail, fix)


def error(check: str, title: str, detail: str, fix: str) -> Finding:
    return Finding(check, "error", title, detail, fix)


def listed(items: list[str], limit: int = 5) -> str:
    """``a, b, c`` — at most ``limit`` of them, then how many more: long lists stay readable."""
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return f"{shown} and {more} more" if more > 0 else shown
