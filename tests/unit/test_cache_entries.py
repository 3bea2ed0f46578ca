"""Issue 5: what a call leaves in the cache: only answers from the provider and model asked, with the
billed attempts needed to replay the call's cost events after a crash."""

from __future__ import annotations

import dataclasses
import json

import pytest

from contracts import ErrorCode, TokenUsage, utc_now
from worker.cache import CachedAnswer
from worker.handle import _attempts, _cacheable
from worker.orchestrate import Attempt, CallOutcome
from worker.pricing import Cost
from worker.providers.base import Answer, ComparisonCall

CALL = ComparisonCall(provider="openai", model="gpt-5-mini", system_prompt="s", user_prompt="u")
USAGE = TokenUsage(prompt_tokens=100, completion_tokens=20, total_tokens=120, cached_tokens=10)
ANSWER = Answer("Essay A", "clearer", 4.0, "gpt-5-mini", USAGE)


def attempt(cost_usd: float, code: ErrorCode | None = None) -> Attempt:
    return Attempt("openai", "gpt-5-mini", utc_now(), 812, USAGE, Cost(cost_usd, True), code)


def test_an_answer_is_cached_with_its_total_cost_and_attempts() -> None:
    outcome = CallOutcome(CALL, ANSWER, attempts=[attempt(0.001, ErrorCode.PARSING_ERROR), attempt(0.002)])
    cached = _cacheable("req-1", (outcome, []))
    assert cached is not None
    assert (cached.answer, cached.cost_usd, cached.request_id) == (ANSWER, 0.003, "req-1")
    restored = CachedAnswer.from_bytes(cached.to_bytes())
    assert _attempts(restored) == outcome.attempts


def test_a_failure_is_not_cached() -> None:
    assert _cacheable("req-1", (CallOutcome(CALL, attempts=[attempt(0.001)]), [])) is None


def test_an_answer_from_a_fallback_provider_is_not_cached_under_the_asked_call() -> None:
    fallback = dataclasses.replace(CALL, provider="anthropic", model="claude-haiku-4-5")
    outcome = CallOutcome(CALL, ANSWER, attempts=[attempt(0.001)], answered_by=fallback)
    assert _cacheable("req-1", (outcome, [])) is None


def test_an_answer_from_the_asked_provider_is_cached_when_named_as_answerer() -> None:
    outcome = CallOutcome(CALL, ANSWER, attempts=[attempt(0.001)], answered_by=CALL)
    assert _cacheable("req-1", (outcome, [])) is not None


def test_a_stored_answer_that_would_not_pass_parse_answer_is_unreadable() -> None:
    good = json.loads(CachedAnswer(Answer("Essay A", "why", 3.0, "m"), 0.0).to_bytes())
    for field, value in ((0, "Essay C"), (1, "x" * 501), (2, 5.5), (4, {"prompt_tokens": -1})):
        bad = list(good)
        bad[field] = value
        with pytest.raises(ValueError):
            CachedAnswer.from_bytes(json.dumps(bad).encode())


def test_a_hedges_cut_off_loser_is_no_part_of_the_cached_cost_or_attempts() -> None:
    """Its estimate is no saving for a later hit, and the entry keeps the format every version reads."""
    loser = Attempt(
        "anthropic", "claude-haiku-4-5", utc_now(), 400, USAGE, Cost(0.0005, True), None, True, True
    )
    outcome = CallOutcome(CALL, ANSWER, attempts=[attempt(0.002), loser])
    cached = _cacheable("req-1", (outcome, []))
    assert cached is not None and cached.cost_usd == 0.002
    assert all(len(a) == 7 for a in cached.attempts)
    assert _attempts(CachedAnswer.from_bytes(cached.to_bytes())) == outcome.attempts[:1]
