"""``bastion doctor``: what is misconfigured, and how to fix it.

The checks live in bastion.doctor; this is the command and its human rendering:
findings grouped by check, one mark each (✓ ok, ! warning, ✗ error), the fix under
each problem, wrapped to 80 columns, and the verdict on the last line, where a
reader (or a cron mail) ends. Exit 1 on any error; warnings alone exit 0.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import typer
from rich.text import Text

from bastion.cli.options import ConfigOpt, JsonOpt, VerboseOpt, emit
from bastion.cli.render import out, plural
from bastion.cli.storeopen import announce

if TYPE_CHECKING:  # the checks (aiohttp, redis, asyncpg) load only when doctor runs
    from bastion.doctor import Diagnosis, Finding

MARKS = {"ok": ("✓", "green"), "warning": ("!", "yellow"), "error": ("✗", "red")}
MAX_WIDTH = 80


def doctor(config: ConfigOpt = None, as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """Check the config, store, rate limiter and upstreams; say how to fix what is wrong."""
    from bastion.doctor import diagnose

    result = diagnose(config)
    if verbose and result.config is not None:
        announce(result.config, verbose)
    emit(as_json, result.as_json(), lambda: show(result))
    if not result.ok:
        raise typer.Exit(1)


def show(result: Diagnosis) -> None:
    width = min(out.width, MAX_WIDTH)
    groups: dict[str, list[Finding]] = {}
    for finding in result.findings:
        groups.setdefault(finding.check, []).append(finding)
    for check, findings in groups.items():
        out.print(Text(check, style="bold"), soft_wrap=True)
        for finding in findings:
            for line in lines(finding, width):
                out.print(line, soft_wrap=True)
    out.print(summary(result), soft_wrap=True)


def lines(finding: Finding, width: int) -> list[Text]:
    """``  ✗ title: detail`` then ``    fix: …``, each wrapped with a hanging indent."""
    mark, style = MARKS[finding.level]
    head = _wrap(f"{finding.title}: {finding.detail}", width, "  ", "    ", mark=(mark, style))
    fix = _wrap(finding.fix, width, "    fix: ", "         ") if finding.fix else []
    return head + fix


def _wrap(
    text: str, width: int, first: str, rest: str, mark: tuple[str, str] | None = None
) -> list[Text]:
    """Words never break (a URL stays whole, even if longer than the line)."""
    lead = first + ("x " if mark else "")
    wrapped = textwrap.wrap(
        text,
        width,
        initial_indent=lead,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )
    result = [Text(line) for line in wrapped]
    if mark and result:
        result[0] = Text.assemble(first, mark, wrapped[0][len(first) + 1 :])
    return result


def summary(result: Diagnosis) -> Text:
    errors = sum(f.level == "error" for f in result.findings)
    warnings = sum(f.level == "warning" for f in result.findings)
    if errors:
        counts = plural(errors, "error") + (f", {plural(warnings, 'warning')}" if warnings else "")
        return Text.assemble(("✗ ", "red"), f"{counts}: fix the errors above")
    if warnings:
        return Text.assemble(("! ", "yellow"), f"{plural(warnings, 'warning')}, no errors")
    return Text.assemble(("✓ ", "green"), "no problems found")
