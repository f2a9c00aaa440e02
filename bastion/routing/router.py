"""The routing of one gateway process: a policy per model, the load signals they read.

Built once from the config. Only the replicas of load_aware and prefix_affinity models
are scraped; a gateway of least_outstanding models only starts no task at all.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Mapping

import aiohttp

from bastion.config import ModelConfig, RoutingConfig
from bastion.routing.parse import parse_load_header
from bastion.routing.policies import LeastOutstanding, Policy, make_policy
from bastion.routing.signals import Scraper, SignalBoard
from bastion.upstreams import UpstreamPool


class Router:
    def __init__(
        self, pool: UpstreamPool, models: Mapping[str, ModelConfig], config: RoutingConfig
    ) -> None:
        self.pool = pool
        self.config = config
        self.fallbacks: Tally[tuple[str, str, str]] = Tally()  # (model, policy, reason)
        self.spills: Tally[str] = Tally()  # model -> picks past the key's first choice
        scraped = {
            name
            for model in models.values()
            if model.routing != "least_outstanding"
            for name in model.upstreams
        }
        replicas = {name: r for name, r in pool.replicas.items() if name in scraped}
        self.board = SignalBoard(replicas, config.stale_after_s)
        self.scraper = Scraper(self.board, config)
        self.default = LeastOutstanding(pool)
        self.policies: dict[str, Policy] = {}
        for model in models.values():
            self.policies[model.id] = self._make(model)

    def _make(self, model: ModelConfig) -> Policy:
        return make_policy(model, self.pool, self.board, self.config, self.fallbacks, self.spills)

    def policy(self, model: ModelConfig) -> Policy:
        """``model``'s policy (one made on the spot for a model the config did not list)."""
        policy = self.policies.get(model.id)
        if policy is None:
            policy = self.policies[model.id] = self._make(model)
        return policy

    def load_header(self, upstream: str, value: str) -> bool:
        """Refresh ``upstream``'s reading from vLLM's ``endpoint-load-metrics`` header
        (between scrapes); False if the header carried nothing usable or the upstream is
        not scraped."""
        values = parse_load_header(value)
        return bool(values) and self.board.update(upstream, values, time.monotonic())

    def start(self, session: aiohttp.ClientSession) -> None:
        self.scraper.start(session)

    async def close(self) -> None:
        await self.scraper.close()
