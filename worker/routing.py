"""Which provider answers: an explicit override, else the model's name, else a strategy over the configured
chain. The same strategy orders the fallback chain."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from enum import StrEnum

from worker.pricing import PriceTable

_BY_PREFIX = (
    ("claude-", "anthropic"),
    ("gpt-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("gemini-", "google"),
)


def provider_for_model(model: str) -> str | None:
    """The provider a model name belongs to, or None when the name says nothing."""
    if "/" in model:
        return "openrouter"  # vendor/model
    for prefix, provider in _BY_PREFIX:
        if model.startswith(prefix):
            return provider
    return None


class Strategy(StrEnum):
    PRIORITY = "priority"
    ROUND_ROBIN = "round_robin"
    LEAST_COST = "least_cost"
    LATENCY = "latency"


class Router:
    """Orders eligible (provider, model) candidates by the configured strategy.

    priority: as configured. round_robin: rotated by one per call. least_cost: by the price table's
    input+output rate, unknown prices last. latency: by an EWMA of observed latency, unobserved first so
    every provider gets measured; a failed call counts as FAILURE_PENALTY_S, so a provider that fails fast
    (a revoked key's 401, a 429) goes behind those that answer rather than first."""

    #: What a failed call counts as in the latency EWMA (seconds): slower than any answer worth waiting for.
    FAILURE_PENALTY_S = 30.0

    def __init__(self, strategy: Strategy, prices: PriceTable, ewma_alpha: float = 0.2) -> None:
        self.strategy = strategy
        self.prices = prices
        self.ewma_alpha = ewma_alpha
        self.latency_ewma_s: dict[str, float] = {}
        self._recent_s: dict[str, deque[float]] = {}
        self._turn = itertools.count()

    def order(self, candidates: Sequence[tuple[str, str]], rotate: bool = True) -> list[tuple[str, str]]:
        """`rotate`: round_robin takes its next turn (the first choice of a request); the fallback chain
        behind that choice keeps its configured order, so that one request takes one turn."""
        items = list(candidates)
        if len(items) < 2 or self.strategy is Strategy.PRIORITY:
            return items
        if self.strategy is Strategy.ROUND_ROBIN:
            if not rotate:
                return items
            k = next(self._turn) % len(items)
            return items[k:] + items[:k]
        if self.strategy is Strategy.LEAST_COST:
            return sorted(items, key=lambda c: self._rate(c[1]))
        return sorted(items, key=lambda c: self.latency_ewma_s.get(c[0], -1.0))

    def observe_latency(self, provider: str, latency_s: float) -> None:
        """An answered call's latency (the EWMA, and the recent latencies hedging reads its p95 from)."""
        self._ewma(provider, latency_s)
        recent = self._recent_s.get(provider)
        if recent is None:
            recent = self._recent_s[provider] = deque(maxlen=200)
        recent.append(latency_s)

    def observe_failure(self, provider: str) -> None:
        """A call the provider failed: FAILURE_PENALTY_S in the EWMA (not in the recent latencies)."""
        self._ewma(provider, self.FAILURE_PENALTY_S)

    def _ewma(self, provider: str, latency_s: float) -> None:
        previous = self.latency_ewma_s.get(provider)
        a = self.ewma_alpha
        self.latency_ewma_s[provider] = latency_s if previous is None else a * latency_s + (1 - a) * previous

    def latency_p95_s(self, provider: str, min_samples: int = 20) -> float | None:
        """p95 of the provider's last 200 call latencies; None until `min_samples` were seen."""
        recent = self._recent_s.get(provider)
        if recent is None or len(recent) < min_samples:
            return None
        ordered = sorted(recent)
        return ordered[int(0.95 * (len(ordered) - 1))]

    def _rate(self, model: str) -> float:
        price = self.prices.prices.get(model)
        return float("inf") if price is None else price.input + price.output
