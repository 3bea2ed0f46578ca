"""Fallback chain and breaker in the orchestrator, with scripted providers and an injected clock/sleep (the
hanging provider on the real clock, with deadlines of 0.1 s)."""

from __future__ import annotations

from time import monotonic

from contracts import ErrorCode, ProviderName
from tests.unit.fakes import OK, FakeTime, Scripted, err
from worker.breaker import BreakerPolicy, Breakers, BreakerState
from worker.limits import Grant
from worker.orchestrate import FallbackPolicy, Orchestrator, RetryPolicy
from worker.pricing import PriceTable
from worker.providers.base import ComparisonCall

CALL = ComparisonCall(provider="p", model="p-big", system_prompt="s", user_prompt="u")
E5XX = err(ErrorCode.EXTERNAL_SERVICE_ERROR, http_status=503)


def make(*providers: Scripted, time: FakeTime, always: bool = False, threshold: int = 100) -> Orchestrator:
    return Orchestrator(
        {p.name: p for p in providers},  # type: ignore[misc]
        PriceTable({}),
        ProviderName.MOCK,
        breakers=Breakers(BreakerPolicy(threshold, 60, 30, 1), time),
        retry=RetryPolicy(max_attempts=2, attempt_budget=10, base_s=0.1),
        fallback=FallbackPolicy(("p", "q", "r"), always),
        clock=time,
        sleep=time.sleep,
    )


async def test_no_fallback_unless_allowed() -> None:
    time = FakeTime()
    p, q = Scripted("p", E5XX), Scripted("q")
    outcome = await make(p, q, time=time).run(CALL, None)
    assert outcome.error is not None and outcome.error.code is ErrorCode.EXTERNAL_SERVICE_ERROR
    assert q.calls == [] and outcome.answered_by is None


async def test_request_allowing_fallback_is_answered_by_the_next_provider() -> None:
    time = FakeTime()
    p, q = Scripted("p", E5XX), Scripted("q")
    outcome = await make(p, q, time=time).run(CALL, None, allow_fallback=True)
    assert outcome.error is None and outcome.answer is not None
    assert outcome.answered_by is not None and outcome.answered_by.provider == "q"
    assert [(a.provider, a.model) for a in outcome.attempts] == [("p", "p-big")] * 2 + [("q", "q-model")]
    assert q.calls[0].user_prompt == "u"


async def test_configuration_can_enable_fallback_for_every_request() -> None:
    time = FakeTime()
    outcome = await make(Scripted("p", E5XX), Scripted("q"), time=time, always=True).run(CALL, None)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "q"


async def test_chain_goes_on_until_a_provider_answers() -> None:
    time = FakeTime()
    p, q, r = Scripted("p", E5XX), Scripted("q", E5XX), Scripted("r")
    outcome = await make(p, q, r, time=time).run(CALL, None, allow_fallback=True)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "r"
    assert len(outcome.attempts) == 5


async def test_non_retryable_failure_does_not_fall_back() -> None:
    time = FakeTime()
    q = Scripted("q")
    outcome = await make(Scripted("p", err(ErrorCode.CONTENT_POLICY)), q, time=time).run(
        CALL, None, allow_fallback=True
    )
    assert outcome.error is not None and outcome.error.code is ErrorCode.CONTENT_POLICY
    assert q.calls == []


async def test_a_quota_spent_at_one_provider_falls_back_without_a_retry() -> None:
    time = FakeTime()
    spent = err(ErrorCode.RATE_LIMIT, http_status=429, retryable=False)
    p, q = Scripted("p", spent), Scripted("q")
    outcome = await make(p, q, time=time).run(CALL, None, allow_fallback=True)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "q"
    assert len(p.calls) == 1  # not retried: the quota will not be back for this request


async def test_open_breaker_fails_fast_without_calling_the_provider() -> None:
    time = FakeTime()
    p = Scripted("p", E5XX)
    o = make(p, time=time, threshold=2)
    await o.run(CALL, None)
    assert o.breakers["p"].state is BreakerState.OPEN
    outcome = await o.run(CALL, None)
    assert outcome.error is not None and outcome.error.code is ErrorCode.PROVIDER_UNAVAILABLE
    assert outcome.attempts == [] and len(p.calls) == 2


async def test_open_breaker_falls_back_when_allowed() -> None:
    time = FakeTime()
    p, q = Scripted("p", E5XX), Scripted("q")
    o = make(p, q, time=time, threshold=2)
    await o.run(CALL, None)
    outcome = await o.run(CALL, None, allow_fallback=True)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "q"
    assert [a.provider for a in outcome.attempts] == ["q"] and len(p.calls) == 2


async def test_breaker_recovers_through_a_half_open_probe() -> None:
    time = FakeTime()
    p = Scripted("p", E5XX, E5XX, OK)
    o = make(p, time=time, threshold=2)
    await o.run(CALL, None)
    time.now += 30
    outcome = await o.run(CALL, None)
    assert outcome.answer is not None
    assert o.breakers["p"].state is BreakerState.CLOSED


def _hanging(slow_call_s: float, threshold: int = 2) -> tuple[Orchestrator, Scripted]:
    """A provider that does not answer within a request's deadline, on the real clock."""
    p = Scripted("p", delay_s=10)
    o = Orchestrator(
        {"p": p},  # type: ignore[dict-item]
        PriceTable({}),
        ProviderName.MOCK,
        breakers=Breakers(BreakerPolicy(threshold, 60, 30, 1, slow_call_s)),
        retry=RetryPolicy(max_attempts=1),
    )
    return o, p


async def test_a_provider_hanging_past_the_slow_call_bound_opens_its_breaker_though_deadlines_cut_it() -> (
    None
):
    o, p = _hanging(slow_call_s=0.05)
    for _ in range(2):
        outcome = await o.run(CALL, monotonic() + 0.1)
        assert outcome.error is not None and outcome.error.code is ErrorCode.EXPIRED  # the request's own
    assert o.breakers["p"].state is BreakerState.OPEN
    outcome = await o.run(CALL, monotonic() + 0.1)
    assert outcome.error is not None and outcome.error.code is ErrorCode.PROVIDER_UNAVAILABLE
    assert len(p.calls) == 2


async def test_calls_cut_by_the_deadline_before_the_slow_call_bound_do_not_count() -> None:
    for slow_call_s in (0.5, 0.0):  # not yet that slow; counting such calls switched off
        o, p = _hanging(slow_call_s)
        for _ in range(3):
            outcome = await o.run(CALL, monotonic() + 0.1)
            assert outcome.error is not None and outcome.error.code is ErrorCode.EXPIRED
        assert o.breakers["p"].state is BreakerState.CLOSED
        assert len(p.calls) == 3


class _SettleRecorder:
    """A limiter that grants at once and records each settle as (tokens held, tokens used)."""

    def __init__(self) -> None:
        self.settled: list[tuple[int, int | None]] = []

    async def acquire(self, provider: str, model: str, tokens: int, deadline_s: float | None) -> Grant:
        return Grant(provider, tokens)

    async def settle(self, grant: Grant, used: int | None) -> None:
        self.settled.append((grant.tokens, used))

    def release_slots(self, grant: Grant) -> None:
        pass


async def test_a_call_cut_by_the_deadline_keeps_its_token_estimate_in_the_limiter() -> None:
    o, p = _hanging(slow_call_s=0)
    o.limiter = limiter = _SettleRecorder()  # type: ignore[assignment]
    settled = limiter.settled
    outcome = await o.run(CALL, monotonic() + 0.1)
    assert outcome.error is not None and outcome.error.code is ErrorCode.EXPIRED
    assert len(p.calls) == 1
    assert len(settled) == 1 and settled[0][0] > 0
    assert settled[0][1] == settled[0][0]  # not None: that would give the estimate back


async def test_a_call_sent_but_not_answered_in_time_keeps_its_token_estimate_in_the_limiter() -> None:
    """Our read timeout after the request went out: the provider counted the prompt against its limits."""
    from worker.errors import ProviderError

    limiter = _SettleRecorder()
    settled = limiter.settled
    for unanswered, kept in ((True, True), (False, False)):
        sent = {"unanswered": True} if unanswered else {}
        timeout = ProviderError(ErrorCode.TIMEOUT, "p did not answer in time", provider="p", **sent)
        o = Orchestrator(
            {"p": Scripted("p", timeout)},  # type: ignore[dict-item]
            PriceTable({}),
            ProviderName.MOCK,
            limiter=limiter,  # type: ignore[arg-type]
            retry=RetryPolicy(max_attempts=1),
        )
        settled.clear()
        await o.run(CALL, None)
        [(held, used)] = settled
        assert (used == held) is kept and (used is None) is not kept
