"""Issue 5: cost arithmetic against hand-computed values, one per provider usage shape (list prices of the
shipped table, USD per 1M tokens), and the pre-call estimate used by budgets."""

from __future__ import annotations

import random

import pytest

from contracts import PromptBlock, TokenUsage
from worker.pricing import Cost, PriceTable
from worker.providers.base import ComparisonCall
from worker.spend import estimate_call_usd

PRICES = PriceTable.load()


def test_openai_cached_input_and_reasoning_output() -> None:
    # gpt-5: input 1.25, cached 0.125, output 10 (reasoning billed as output).
    # usage.prompt_tokens 10000 with prompt_tokens_details.cached_tokens 8000;
    # usage.completion_tokens 3000 with completion_tokens_details.reasoning_tokens 2500.
    usage = TokenUsage(
        prompt_tokens=10_000,
        completion_tokens=3_000,
        total_tokens=13_000,
        cached_tokens=8_000,
        reasoning_tokens=2_500,
    )
    # 2000 * 1.25 + 8000 * 0.125 + 3000 * 10 = 2500 + 1000 + 30000 = 33500 per 1M
    assert PRICES.cost("gpt-5", usage) == Cost(0.0335, price_known=True)


def test_anthropic_cache_reads_and_cache_writes() -> None:
    # claude-sonnet-4-5: input 3, cache read 0.30, cache write 3.75, output 15.
    # input_tokens 1000 (uncached), cache_creation_input_tokens 2000, cache_read_input_tokens 5000,
    # output_tokens 400; normalised: prompt 8000 (all input), cached 5000.
    usage = TokenUsage(prompt_tokens=8_000, completion_tokens=400, total_tokens=8_400, cached_tokens=5_000)
    # 1000 * 3 + 2000 * 3.75 + 5000 * 0.30 + 400 * 15 = 3000 + 7500 + 1500 + 6000 = 18000 per 1M
    assert PRICES.cost("claude-sonnet-4-5", usage, cache_write_tokens=2_000) == Cost(0.018, price_known=True)


def test_anthropic_cache_writes_without_a_count_are_billed_as_input() -> None:
    usage = TokenUsage(prompt_tokens=8_000, completion_tokens=400, total_tokens=8_400, cached_tokens=5_000)
    # 3000 * 3 + 5000 * 0.30 + 400 * 15 = 9000 + 1500 + 6000 = 16500 per 1M
    assert PRICES.cost("claude-sonnet-4-5", usage) == Cost(0.0165, price_known=True)


def test_gemini_cached_content_and_thoughts() -> None:
    # gemini-2.5-flash: input 0.30, cached 0.075, output 2.50 (thoughts billed as output).
    # promptTokenCount 4000 incl. cachedContentTokenCount 1000; candidatesTokenCount 200 +
    # thoughtsTokenCount 800 -> completion 1000, reasoning 800.
    usage = TokenUsage(
        prompt_tokens=4_000,
        completion_tokens=1_000,
        total_tokens=5_000,
        cached_tokens=1_000,
        reasoning_tokens=800,
    )
    # 3000 * 0.30 + 1000 * 0.075 + 1000 * 2.50 = 900 + 75 + 2500 = 3475 per 1M
    assert PRICES.cost("gemini-2.5-flash", usage) == Cost(0.003475, price_known=True)


def test_unknown_model_costs_nothing_and_says_so() -> None:
    usage = TokenUsage(prompt_tokens=1_000, completion_tokens=100, total_tokens=1_100)
    assert PRICES.cost("no-such-model", usage) == Cost(0.0, price_known=False)


def test_budget_estimate_counts_prompt_characters_and_the_output_cap() -> None:
    call = ComparisonCall(
        provider="openai",
        model="gpt-4.1-mini",
        system_prompt="s" * 400,
        user_prompt="u" * 3_600,
        prompt_blocks=(PromptBlock(target="user_content", content="b" * 4_000),),
        max_tokens=500,
    )
    # (8000 chars / 4) * 0.40 + 500 * 1.60 = 800 + 800 = 1600 per 1M
    assert estimate_call_usd(PRICES, call) == pytest.approx(0.0016)


def test_a_model_without_a_price_has_no_budget_estimate() -> None:
    call = ComparisonCall(provider="openai", model="no-such-model", system_prompt="s", user_prompt="u")
    assert estimate_call_usd(PRICES, call) is None


def test_the_common_case_costs_what_the_full_formula_gives() -> None:
    """Without cached, reasoning or cache-write tokens cost() takes a short path: the same bits as the
    full formula (written out here) for every priced model."""
    table = PriceTable.load()
    rng = random.Random(3)
    for _ in range(2000):
        prompt, completion = rng.randint(0, 2_000_000), rng.randint(0, 200_000)
        usage = TokenUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
        for model, p in table.prices.items():
            cached_rate = p.cached_input if p.cached_input is not None else p.input
            write_rate = p.cache_write if p.cache_write is not None else p.input
            reasoning_rate = p.reasoning if p.reasoning is not None else p.output
            full = (
                (prompt - 0 - 0) * p.input
                + 0 * cached_rate
                + 0 * write_rate
                + (completion - 0) * p.output
                + 0 * reasoning_rate
            ) / 1_000_000
            assert table.cost(model, usage).usd == round(full, 10)
