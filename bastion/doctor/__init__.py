"""``bastion doctor``: what is misconfigured, and how to fix it (docs/cli.md).

The checks only look: nothing is created, migrated or changed. The config is loaded
first (a refusal is the one finding then, since nothing else can be checked without
it); the store, the rate limiter and every upstream are then checked at once, each
with a bounded timeout, so the whole run takes about as long as the slowest single
check. Modules: findings (the result type), config_checks, store_checks,
ratelimit_checks, upstream_checks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.config import Config
from bastion.doctor.config_checks import load, setting_findings
from bastion.doctor.findings import Finding
from bastion.doctor.ratelimit_checks import check_ratelimit
from bastion.doctor.store_checks import check_store
from bastion.doctor.upstream_checks import check_upstreams

__all__ = ["Diagnosis", "Finding", "diagnose"]


@dataclass(frozen=True)
class Diagnosis:
    config: Config | None  # None: the config was refused
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        """Warnings alone leave it ok: the gateway runs, if perhaps not as meant."""
        return all(f.level != "error" for f in self.findings)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "findings": [f.as_json() for f in self.findings]}


def diagnose(config_path: Path | None) -> Diagnosis:
    """Run every check against the config at ``config_path`` (else $BASTION_CONFIG)."""
    config, findings = load(config_path)
    if config is None:
        return Diagnosis(None, findings)
    return Diagnosis(config, findings + asyncio.run(_live(config)))


async def _live(config: Config) -> list[Finding]:
    """The checks that reach out, concurrently, in the order they are reported."""
    store, ratelimit, upstreams = await asyncio.gather(
        check_store(config), check_ratelimit(config), check_upstreams(config)
    )
    return [*store, *ratelimit, *upstreams, *setting_findings(config)]
