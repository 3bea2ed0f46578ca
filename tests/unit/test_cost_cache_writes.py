"""Anthropic prompt-cache writes are billed at the cache-write rate (5 minutes or 1 hour), on answers and
billed failures; cache reads do not count against its per-minute token limit."""

from __future__ import annotations

import json

import pytest

from contracts import ErrorCode, ProviderName
from worker.errors import ProviderError
from worker.orchestrate import Orchestrator
from worker.pricing import ModelPrice, PriceTable
from worker.providers.anthropic import AnthropicProvider
from worker.providers.base import ComparisonCall

MODEL = "claude-sonnet-4-5"  # input 3.00, output 15.00, cache read 0.30, cache write 3.75 USD / 1M
USAGE = {
    "input_tokens": 100,
    "cache_creation_input_tokens": 1000,
    "cache_read_input_tokens": 2000,
    "output_tokens": 50,
}
# (3100 - 2000 read - 1000 written) * 3.00 + 2000 * 0.30 + 1000 * 3.75 + 50 * 15.00 = 5400 -> per 1M
EXPECTED_USD = 0.0054


def _body(stop_reason: str, with_tool: bool, usage: dict[str, object] = USAGE) -> bytes:
    content = [
        {
            "type": "tool_use",
            "id": "t1",
            "name": "record_comparison",
            "input": {"winner": "Essay B", "justification": "B is clearer.", "confidence": 4},
        }
    ]
    return json.dumps(
        {"model": MODEL, "content": content if with_tool else [], "stop_reason": stop_reason, "usage": usage}
    ).encode()


class Canned:
    """An Anthropic provider whose HTTP call returns a fixed body (the parsing path is the real one)."""

    name = "anthropic"
    default_model = MODEL

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.real = AnthropicProvider(MODEL, http=None)  # type: ignore[arg-type]

    async def compare(self, call: ComparisonCall):  # type: ignore[no-untyped-def]
        return self.real.read_answer(self.body, call.model)

    async def aclose(self) -> None:
        return None


CALL = ComparisonCall(provider="anthropic", model=MODEL, system_prompt="s", user_prompt="u")


def test_anthropic_answer_reports_its_cache_writes() -> None:
    answer = AnthropicProvider(MODEL, http=None).read_answer(_body("tool_use", True), MODEL)  # type: ignore[arg-type]
    assert answer.cache_write_tokens == 1000
    assert answer.usage.prompt_tokens == 3100
    assert answer.usage.cached_tokens == 2000


@pytest.mark.parametrize(("stop_reason", "with_tool"), [("tool_use", True), ("max_tokens", False)])
async def test_cache_writes_are_billed_at_the_cache_write_rate(stop_reason: str, with_tool: bool) -> None:
    orchestrator = Orchestrator(
        {"anthropic": Canned(_body(stop_reason, with_tool))}, PriceTable.load(), ProviderName.ANTHROPIC
    )
    outcome = await orchestrator.run(CALL, None)
    [attempt] = outcome.attempts
    assert attempt.cost is not None
    assert attempt.cost.usd == pytest.approx(EXPECTED_USD)
    if stop_reason == "max_tokens":
        assert isinstance(outcome.error, ProviderError)
        assert outcome.error.code is ErrorCode.PARSING_ERROR


# Of the 1000 written, 600 for an hour (ttl "1h", billed at 2x input: 6.00 / 1M) and 400 for 5 minutes:
# (3100 - 2000 - 1000) * 3.00 + 2000 * 0.30 + 400 * 3.75 + 600 * 6.00 + 50 * 15.00 = 6750 -> per 1M
USAGE_1H = {
    **USAGE,
    "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
}


@pytest.mark.parametrize(("stop_reason", "with_tool"), [("tool_use", True), ("max_tokens", False)])
async def test_cache_writes_kept_an_hour_are_billed_at_the_1h_rate(stop_reason: str, with_tool: bool) -> None:
    orchestrator = Orchestrator(
        {"anthropic": Canned(_body(stop_reason, with_tool, USAGE_1H))},
        PriceTable.load(),
        ProviderName.ANTHROPIC,
    )
    outcome = await orchestrator.run(CALL, None)
    [attempt] = outcome.attempts
    assert attempt.cost is not None
    assert attempt.cost.usd == pytest.approx(0.00675)
    if stop_reason == "max_tokens":  # a billed failure carries the counts (internal: not emitted)
        assert isinstance(outcome.error, ProviderError)
        assert outcome.error.details["cache_write_1h_tokens"] == 600
    else:
        assert outcome.error is None and outcome.answer is not None


def test_a_price_without_a_1h_rate_bills_those_writes_at_the_cache_write_rate() -> None:
    answer = AnthropicProvider(MODEL, http=None).read_answer(_body("tool_use", True, USAGE_1H), MODEL)  # type: ignore[arg-type]
    assert (answer.cache_write_tokens, answer.cache_write_1h_tokens) == (1000, 600)
    table = PriceTable({MODEL: ModelPrice(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)})
    assert table.cost(MODEL, answer.usage, 1000, 600).usd == pytest.approx(EXPECTED_USD)


class RecordingLimiter:
    """Grants every call; records the tokens each call's settle counts against the provider's limit."""

    def __init__(self) -> None:
        self.used: list[int | None] = []

    async def acquire(self, provider: str, model: str, tokens: int, deadline_s: float | None = None):  # type: ignore[no-untyped-def]
        return type("Grant", (), {"tokens": tokens})()

    async def settle(self, grant: object, used: int | None) -> None:
        self.used.append(used)

    def release_slots(self, grant: object) -> None:
        return None


async def test_cache_reads_do_not_count_against_anthropics_token_rate_limit() -> None:
    # Anthropic's input-tokens-per-minute limit leaves cache reads out: of 3150 tokens, 2000 were read.
    limiter = RecordingLimiter()
    orchestrator = Orchestrator(
        {"anthropic": Canned(_body("tool_use", True))},
        PriceTable.load(),
        ProviderName.ANTHROPIC,
        limiter=limiter,  # type: ignore[arg-type]
    )
    outcome = await orchestrator.run(CALL, None)
    assert outcome.answer is not None
    assert limiter.used == [3150 - 2000]
