"""Price table and cost arithmetic. Unknown model: cost 0.0 with price_known False, never a made-up rate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from contracts import TokenUsage

_DEFAULT_TABLE = Path(__file__).with_name("prices.json")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per 1M tokens."""

    input: float
    output: float
    cached_input: float | None = None
    reasoning: float | None = None
    cache_write: float | None = None
    #: Prompt-cache writes kept an hour (Anthropic: 2x input); cache_write's rate when not given.
    cache_write_1h: float | None = None


@dataclass(slots=True)  # not frozen: see providers/base.py, ComparisonCall
class Cost:
    usd: float
    price_known: bool


class PriceTable:
    def __init__(self, prices: dict[str, ModelPrice]) -> None:
        self.prices = prices

    @classmethod
    def load(cls, path: str | None = None) -> PriceTable:
        raw = json.loads(Path(path or _DEFAULT_TABLE).read_text())
        return cls({name: ModelPrice(**entry) for name, entry in raw["models"].items()})

    def cost(
        self, model: str, usage: TokenUsage, cache_write_tokens: int = 0, cache_write_1h_tokens: int = 0
    ) -> Cost:
        """prompt_tokens include cached reads and cache writes; completion_tokens include reasoning.
        cache_write_tokens (Anthropic cache_creation_input_tokens) are billed at cache_write when priced;
        cache_write_1h_tokens, the part of them written for an hour, at cache_write_1h."""
        price = self.prices.get(model)
        if price is None:
            return Cost(0.0, price_known=False)
        if not (usage.cached_tokens or usage.reasoning_tokens or cache_write_tokens):
            # The formula below with those three at 0 (adding zeros changes no bit): the common case.
            usd = (usage.prompt_tokens * price.input + usage.completion_tokens * price.output) / 1_000_000
            return Cost(round(usd, 10), price_known=True)
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_rate = price.cached_input if price.cached_input is not None else price.input
        written = min(cache_write_tokens, usage.prompt_tokens - cached)
        write_rate = price.cache_write if price.cache_write is not None else price.input
        written_1h = min(cache_write_1h_tokens, written)
        write_1h_rate = price.cache_write_1h if price.cache_write_1h is not None else write_rate
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        reasoning_rate = price.reasoning if price.reasoning is not None else price.output
        usd = (
            (usage.prompt_tokens - cached - written) * price.input
            + cached * cached_rate
            + (written - written_1h) * write_rate
            + written_1h * write_1h_rate
            + (usage.completion_tokens - reasoning) * price.output
            + reasoning * reasoning_rate
        ) / 1_000_000
        return Cost(round(usd, 10), price_known=True)
