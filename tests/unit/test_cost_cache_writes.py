"""Anthropic prompt-cache writes are billed at the cache-write rate, on answers and billed failures."""

from __future__ import annotations

import json

import pytest

from contracts import ErrorCode, ProviderName
from worker.errors import ProviderError
from worker.orchestrate import Orchestrator
from worker.pricing import PriceTable
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


def _body(stop_reason: str, with_tool: bool) -> bytes:
    content = [
        {
            "type": "tool_use",
            "id": "t1",
            "name": "record_comparison",
            "input": {"winner": "Essay B", "justification": "B is clearer.", "confidence": 4},
        }
    ]
    return json.dumps(
        {"model": MODEL, "content": content if with_tool else [], "stop_reason": stop_reason, "usage": USAGE}
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
