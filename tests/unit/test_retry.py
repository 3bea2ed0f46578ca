"""Retries (tenacity) in the orchestrator: waits checked through an injected sleep, never slept."""

from __future__ import annotations

import pytest

from contracts import ErrorCode, LLMComparisonRequestV1, ProviderName
from tests.unit.fakes import OK, FakeTime, Scripted, err
from worker import metrics
from worker.errors import ProviderError
from worker.orchestrate import FallbackPolicy, Orchestrator, RetryPolicy
from worker.pricing import PriceTable
from worker.providers.base import Answer, ComparisonCall

CALL = ComparisonCall(provider="p", model="p-model", system_prompt="s", user_prompt="u")
E5XX = err(ErrorCode.EXTERNAL_SERVICE_ERROR, http_status=503)


def make(
    *providers: Scripted,
    time: FakeTime,
    retry: RetryPolicy | None = None,
    chain: tuple[str, ...] = (),
) -> Orchestrator:
    return Orchestrator(
        {p.name: p for p in providers},  # type: ignore[misc]
        PriceTable({}),
        ProviderName.MOCK,
        retry=retry or RetryPolicy(max_attempts=3, base_s=1.0, max_wait_s=10.0, retry_after_cap_s=30.0),
        fallback=FallbackPolicy(chain),
        clock=time,
        sleep=time.sleep,
    )


@pytest.fixture
def upper_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full jitter draws uniform(0, cap); take the cap so waits are exact."""
    monkeypatch.setattr("tenacity.wait.random.uniform", lambda low, high: high)


async def test_retryable_error_is_retried_until_success_with_one_attempt_per_call() -> None:
    time = FakeTime()
    p = Scripted("p", E5XX, E5XX, OK)
    outcome = await make(p, time=time).run(CALL, None)
    assert outcome.answer is not None and outcome.error is None
    assert [a.error_code for a in outcome.attempts] == [E5XX.code, E5XX.code, None]
    assert len(p.calls) == 3


async def test_backoff_is_exponential_and_capped(upper_jitter: None) -> None:
    time = FakeTime()
    retry = RetryPolicy(max_attempts=6, attempt_budget=6, base_s=1.0, max_wait_s=5.0)
    await make(Scripted("p", E5XX), time=time, retry=retry).run(CALL, None)
    assert time.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_backoff_uses_full_jitter_between_zero_and_the_exponential_cap() -> None:
    time = FakeTime()
    retry = RetryPolicy(max_attempts=4, attempt_budget=4, base_s=1.0, max_wait_s=100.0)
    for _ in range(30):
        await make(Scripted("p", E5XX), time=time, retry=retry).run(CALL, None)
    by_attempt = [time.sleeps[i::3] for i in range(3)]
    for n, waits in enumerate(by_attempt):
        assert all(0.0 <= w <= 2.0**n for w in waits)
        assert len(set(waits)) > 1  # jittered, not fixed
    assert max(by_attempt[2]) > 2.0  # reaches past the previous cap


async def test_retry_after_is_honoured() -> None:
    time = FakeTime()
    p = Scripted("p", err(ErrorCode.RATE_LIMIT, retry_after_s=7), OK)
    outcome = await make(p, time=time).run(CALL, None)
    assert outcome.answer is not None
    assert time.sleeps == [7.0]


async def test_a_retry_after_that_is_not_a_number_falls_back_to_backoff(upper_jitter: None) -> None:
    time = FakeTime()
    p = Scripted("p", err(ErrorCode.RATE_LIMIT, retry_after_s=float("nan")), OK)
    outcome = await make(p, time=time).run(CALL, time.now + 60)
    assert outcome.answer is not None
    assert time.sleeps == [1.0]  # the exponential backoff's first step, not a NaN sleep


async def test_an_unmapped_exception_from_a_provider_is_a_parsing_error_with_its_attempt_recorded() -> None:
    class Odd(Scripted):
        async def compare(self, call: ComparisonCall) -> Answer:
            self.calls.append(call)
            raise OverflowError("int too large to convert to float: Essay text quoted here")

    time = FakeTime()
    p = Odd("p")
    outcome = await make(p, time=time).run(CALL, None)
    assert outcome.error is not None and outcome.error.code is ErrorCode.PARSING_ERROR
    assert "Essay text" not in outcome.error.message
    assert len(p.calls) == 2  # a PARSING_ERROR is retried once
    assert [a.error_code for a in outcome.attempts] == [ErrorCode.PARSING_ERROR] * 2


async def test_retry_after_is_capped() -> None:
    time = FakeTime()
    p = Scripted("p", err(ErrorCode.RATE_LIMIT, retry_after_s=600), OK)
    await make(p, time=time).run(CALL, None)
    assert time.sleeps == [30.0]


async def test_non_retryable_error_is_not_retried() -> None:
    time = FakeTime()
    p = Scripted("p", err(ErrorCode.CONTENT_POLICY))
    outcome = await make(p, time=time).run(CALL, None)
    assert outcome.error is not None and outcome.error.code is ErrorCode.CONTENT_POLICY
    assert len(outcome.attempts) == 1 and time.sleeps == []


async def test_parsing_error_gets_at_most_one_retry() -> None:
    time = FakeTime()
    retry = RetryPolicy(max_attempts=5, attempt_budget=5)
    p = Scripted("p", err(ErrorCode.PARSING_ERROR))
    outcome = await make(p, time=time, retry=retry).run(CALL, None)
    assert [a.error_code for a in outcome.attempts] == [ErrorCode.PARSING_ERROR] * 2


async def test_parsing_error_retry_can_succeed() -> None:
    time = FakeTime()
    p = Scripted("p", err(ErrorCode.PARSING_ERROR), OK)
    outcome = await make(p, time=time).run(CALL, None)
    assert outcome.answer is not None and len(outcome.attempts) == 2


async def test_max_attempts_per_provider_is_respected() -> None:
    time = FakeTime()
    outcome = await make(Scripted("p", E5XX), time=time).run(CALL, None)
    assert len(outcome.attempts) == 3
    assert outcome.error is not None and outcome.error.code is ErrorCode.EXTERNAL_SERVICE_ERROR


async def test_attempt_budget_caps_calls_across_fallback_providers() -> None:
    time = FakeTime()
    retry = RetryPolicy(max_attempts=3, attempt_budget=4)
    p, q = Scripted("p", E5XX), Scripted("q", E5XX)
    outcome = await make(p, q, time=time, retry=retry, chain=("q",)).run(CALL, None, allow_fallback=True)
    assert [a.provider for a in outcome.attempts] == ["p", "p", "p", "q"]


async def test_retry_never_waits_past_the_deadline() -> None:
    time = FakeTime()
    p = Scripted("p", err(ErrorCode.RATE_LIMIT, retry_after_s=5), OK)
    outcome = await make(p, time=time).run(CALL, time.now + 3)
    assert outcome.error is not None and outcome.error.code is ErrorCode.RATE_LIMIT
    assert len(p.calls) == 1 and time.sleeps == []


async def test_retry_within_the_deadline_goes_ahead() -> None:
    time = FakeTime()
    p = Scripted("p", err(ErrorCode.RATE_LIMIT, retry_after_s=2), OK)
    outcome = await make(p, time=time).run(CALL, time.now + 3)
    assert outcome.answer is not None and time.sleeps == [2.0]


async def test_retries_are_counted_in_the_attempts_metric() -> None:
    time = FakeTime()
    p = Scripted("retry-metric", E5XX, OK)
    retries = metrics.ATTEMPTS.labels("retry-metric", "retry")
    calls = metrics.ATTEMPTS.labels("retry-metric", "call")
    metrics.flush()
    before_retries, before_calls = retries._value.get(), calls._value.get()
    call = ComparisonCall(provider="retry-metric", model="m", system_prompt="s", user_prompt="u")
    await make(p, time=time).run(call, None)
    metrics.flush()  # counted as tallies: added to the metric when it is read
    assert retries._value.get() - before_retries == 1
    assert calls._value.get() - before_calls == 2


async def test_a_provider_message_quoting_the_prompt_is_withheld_but_its_code_kept() -> None:
    prompt = "Essay A: the cat sat on the mat and thought about it.\n\nEssay B: dogs."
    quoted = ProviderError(
        ErrorCode.CONTENT_TOO_LONG, "openai HTTP 400: cannot process 'the cat sat on the mat and thought'"
    )
    plain = ProviderError(ErrorCode.CONTENT_TOO_LONG, "openai HTTP 400: maximum context length is 8192")
    call = ComparisonCall(provider="p", model="p-model", system_prompt="s", user_prompt=prompt)
    for error, expected in [
        (quoted, "openai HTTP 400: message withheld (it quoted the prompt)"),
        (plain, "openai HTTP 400: maximum context length is 8192"),
    ]:
        outcome = await make(Scripted("p", error), time=FakeTime()).run(call, None)
        assert outcome.error is not None
        assert outcome.error.code is ErrorCode.CONTENT_TOO_LONG
        assert outcome.error.message == expected


async def test_capacity_granted_after_the_deadline_is_given_back_and_the_call_expires() -> None:
    from worker.limits import Grant

    time = FakeTime()

    class LateLimiter:
        settled: list[int | None] = []

        async def acquire(self, provider: str, model: str, tokens: int, deadline_s: float | None) -> Grant:
            time.now += 5  # the wait for capacity ran past the deadline
            return Grant(provider, tokens)

        async def settle(self, grant: Grant, used: int | None) -> None:
            self.settled.append(used)

    p = Scripted("p")
    orchestrator = make(p, time=time)
    orchestrator.limiter = LateLimiter()  # type: ignore[assignment]
    outcome = await orchestrator.run(CALL, time.now + 1)
    assert outcome.error is not None and outcome.error.code is ErrorCode.EXPIRED
    assert p.calls == [] and LateLimiter.settled == [None]


async def test_a_budgeted_call_falls_back_only_to_priced_models() -> None:
    """A budget cannot count a model without a price: with priced_only the chain skips such providers."""
    from worker.pricing import ModelPrice

    time = FakeTime()
    first, unpriced, priced = Scripted("p", E5XX), Scripted("u"), Scripted("q")
    orch = Orchestrator(
        {s.name: s for s in (first, unpriced, priced)},  # type: ignore[misc]
        PriceTable({"p-model": ModelPrice(1.0, 1.0), "q-model": ModelPrice(1.0, 1.0)}),
        ProviderName.MOCK,
        retry=RetryPolicy(max_attempts=1),
        fallback=FallbackPolicy(("u", "q")),
        clock=time,
        sleep=time.sleep,
    )
    budgeted = await orch.run(CALL, None, allow_fallback=True, priced_only=True)
    assert budgeted.answered_by is not None and budgeted.answered_by.provider == "q"
    assert unpriced.calls == []
    unbudgeted = await orch.run(CALL, None, allow_fallback=True)
    assert unbudgeted.answered_by is not None and unbudgeted.answered_by.provider == "u"


def test_a_budgeted_request_is_routed_only_to_priced_default_models() -> None:
    from worker.pricing import ModelPrice
    from worker.routing import Router, Strategy

    prices = PriceTable({"q-model": ModelPrice(1.0, 1.0)})
    orch = Orchestrator(
        {s.name: s for s in (Scripted("u"), Scripted("q"))},  # type: ignore[misc]
        prices,
        ProviderName.MOCK,
        router=Router(Strategy.ROUND_ROBIN, prices),
        fallback=FallbackPolicy(("u", "q")),
    )
    request = LLMComparisonRequestV1(request_id="r", user_prompt="Essay A: x. Essay B: y.")
    assert {orch.resolve(request).provider for _ in range(4)} == {"u", "q"}
    assert {orch.resolve(request, priced_only=True).provider for _ in range(4)} == {"q"}
