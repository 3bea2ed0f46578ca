"""Hedging: past the provider's observed p95, the next provider is asked too; first answer wins."""

from __future__ import annotations

import asyncio

import pytest

from contracts import ProviderName, TokenUsage
from tests.unit.fakes import Scripted
from worker.orchestrate import FallbackPolicy, Orchestrator
from worker.pricing import PriceTable
from worker.providers.base import ComparisonCall
from worker.routing import Router, Strategy

CALL = ComparisonCall(provider="p", model="p-model", system_prompt="s", user_prompt="u")


def make(*providers: Scripted, hedge: bool = True, p95_s: float | None = 0.01) -> Orchestrator:
    router = Router(Strategy.PRIORITY, PriceTable({}))
    if p95_s is not None:
        for _ in range(20):
            router.observe_latency("p", p95_s)
    return Orchestrator(
        {p.name: p for p in providers},  # type: ignore[misc]
        PriceTable({}),
        ProviderName.MOCK,
        router=router,
        fallback=FallbackPolicy(("q",), hedge=hedge),
    )


async def test_slow_call_is_hedged_and_the_first_answer_wins() -> None:
    p, q = Scripted("p", delay_s=5.0), Scripted("q")
    outcome = await asyncio.wait_for(make(p, q).run(CALL, None, allow_fallback=True), 2)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "q"
    assert outcome.error is None
    by_provider = {a.provider: a for a in outcome.attempts}
    # The loser had the prompt and may be billed: its input is estimated (2 characters: 1 token), and
    # tracked as an estimate.
    loser = by_provider["p"]
    assert loser.cancelled and loser.estimated and loser.cost is not None
    assert loser.usage == TokenUsage(prompt_tokens=1, total_tokens=1)
    assert not by_provider["q"].cancelled and by_provider["q"].usage is not None


async def test_call_answering_before_p95_is_not_hedged() -> None:
    p, q = Scripted("p"), Scripted("q")
    outcome = await make(p, q, p95_s=1.0).run(CALL, None, allow_fallback=True)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "p"
    assert q.calls == []


async def test_hedging_is_off_unless_enabled() -> None:
    p, q = Scripted("p", delay_s=0.1), Scripted("q")
    outcome = await make(p, q, hedge=False).run(CALL, None, allow_fallback=True)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "p"
    assert q.calls == []


async def test_no_hedge_when_the_request_does_not_allow_fallback() -> None:
    p, q = Scripted("p", delay_s=0.1), Scripted("q")
    outcome = await make(p, q).run(CALL, None)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "p"
    assert q.calls == []


async def test_no_hedge_before_enough_latency_samples() -> None:
    p, q = Scripted("p", delay_s=0.1), Scripted("q")
    outcome = await make(p, q, p95_s=None).run(CALL, None, allow_fallback=True)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "p"
    assert q.calls == []


async def test_cancelling_a_hedged_request_cancels_both_provider_calls() -> None:
    p, q = Scripted("p", delay_s=5.0), Scripted("q", delay_s=5.0)
    task = asyncio.create_task(make(p, q).run(CALL, None, allow_fallback=True))
    await asyncio.wait_for(q.called.wait(), 2)  # the hedge started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_cancelling_a_request_before_its_hedge_cancels_the_provider_call() -> None:
    p, q = Scripted("p", delay_s=5.0), Scripted("q")
    task = asyncio.create_task(make(p, q, p95_s=5.0).run(CALL, None, allow_fallback=True))
    await asyncio.wait_for(p.called.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert q.calls == []


async def test_a_call_cut_by_the_deadline_is_tracked_at_its_estimated_input() -> None:
    """Cut off by our deadline: the provider had the prompt and may bill it, but reports nothing to a caller
    that left. The attempt carries the prompt's estimate (and its cost), marked as estimated."""
    import time

    from worker.pricing import ModelPrice

    call = ComparisonCall(provider="p", model="p-model", system_prompt="s" * 400, user_prompt="u" * 3_600)
    orchestrator = Orchestrator(
        {"p": Scripted("p", delay_s=5.0)},  # type: ignore[dict-item]
        PriceTable({"p-model": ModelPrice(input=2.0, output=8.0)}),
        ProviderName.MOCK,
    )
    outcome = await orchestrator.run(call, time.monotonic() + 0.05)
    assert outcome.error is not None and outcome.error.code.value == "EXPIRED"
    [attempt] = outcome.attempts
    assert attempt.estimated and attempt.usage == TokenUsage(prompt_tokens=1001, total_tokens=1001)
    assert attempt.cost is not None and attempt.cost.usd == pytest.approx(1001 * 2.0 / 1_000_000)


@pytest.mark.parametrize("unanswered", [True, False])
async def test_a_call_sent_but_not_answered_in_time_is_tracked_at_its_estimated_input(
    unanswered: bool,
) -> None:
    """Our HTTP read timeout after the request went out: the provider had the prompt. A connect timeout:
    nothing was sent, nothing estimated."""
    from contracts import ErrorCode
    from worker.errors import ProviderError
    from worker.orchestrate import RetryPolicy

    timeout = ProviderError(
        ErrorCode.TIMEOUT,
        "p did not answer in time",
        provider="p",
        **({"unanswered": True} if unanswered else {}),
    )
    orchestrator = Orchestrator(
        {"p": Scripted("p", timeout)},  # type: ignore[dict-item]
        PriceTable({}),
        ProviderName.MOCK,
        retry=RetryPolicy(max_attempts=1),
    )
    outcome = await orchestrator.run(CALL, None)
    [attempt] = outcome.attempts
    assert attempt.estimated is unanswered
    assert attempt.usage == (TokenUsage(prompt_tokens=1, total_tokens=1) if unanswered else None)


@pytest.mark.parametrize(
    ("strategy", "hedge", "observed"),
    [
        (Strategy.PRIORITY, False, False),
        (Strategy.PRIORITY, True, True),
        (Strategy.LATENCY, False, True),
        (Strategy.ROUND_ROBIN, False, False),
    ],
)
async def test_the_router_hears_of_calls_when_its_latency_order_or_hedging_reads_them(
    strategy: Strategy, hedge: bool, observed: bool
) -> None:
    # Hedging's p95 comes from the latencies the orchestrator hands the router: without them no call would
    # ever be hedged. Where nothing reads them they are not kept (per call).
    router = Router(strategy, PriceTable({}))
    orchestrator = Orchestrator(
        {"p": Scripted("p")},
        PriceTable({}),
        ProviderName.MOCK,
        router=router,
        fallback=FallbackPolicy((), hedge=hedge),
    )
    for _ in range(20):
        await orchestrator.run(CALL, None)
    assert (router.latency_p95_s("p") is not None) is observed
    assert ("p" in router.latency_ewma_s) is observed
