"""Issue 5: sliding-window spend in the real Redis: one alert per threshold crossing (also under concurrent
replicas), re-armed once spend falls below the threshold; budgets refuse before the call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from contracts import ErrorCode, ProviderName
from tests.conftest import REDIS_URL, request_envelope
from worker.cache import RedisGuard
from worker.errors import RequestRejected
from worker.settings import SpendSettings
from worker.spend import SpendTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis(infra: None) -> AsyncIterator[Redis]:
    r = Redis.from_url(REDIS_URL)
    yield r
    await r.aclose()


@pytest.fixture
def tracker(prefix: str, redis: Redis) -> Callable[..., SpendTracker]:
    def make(clock: Clock | None = None, **settings: Any) -> SpendTracker:
        return SpendTracker(redis, SpendSettings(**settings), prefix, RedisGuard(5), clock or Clock())

    return make


async def test_org_alert_fires_once_when_spend_crosses_the_threshold(tracker) -> None:
    spend = tracker(cost_alert_window_s=3600, org_cost_alert_threshold_usd=1.0)
    alerts = [await spend.record("org1", 0.4) for _ in range(5)]
    assert [len(a) for a in alerts] == [0, 0, 1, 0, 0]
    [alert] = alerts[2]
    assert (alert.scope, alert.organization_id, alert.window_s) == ("organization", "org1", 3600)
    assert (alert.spend_usd, alert.threshold_usd) == (pytest.approx(1.2), 1.0)


async def test_org_alert_fires_again_after_spend_falls_below_and_crosses_again(tracker) -> None:
    clock = Clock()
    spend = tracker(clock, cost_alert_window_s=600, org_cost_alert_threshold_usd=1.0)
    first = [await spend.record("org1", 0.6) for _ in range(2)]
    clock.now += 600  # the window slides past both calls
    second = [await spend.record("org1", 0.6) for _ in range(3)]
    assert [len(a) for a in first + second] == [0, 1, 0, 1, 0]


async def test_spend_slides_out_of_the_window(tracker) -> None:
    clock = Clock()
    spend = tracker(clock, cost_alert_window_s=600, org_cost_alert_threshold_usd=1.0)
    await spend.record("org1", 0.9)
    clock.now += 600
    assert await spend.record("org1", 0.2) == []


async def test_global_alert_sums_every_organization(tracker) -> None:
    spend = tracker(cost_alert_threshold_usd=1.0)
    alerts = [await spend.record(org, 0.4) for org in ("a", "b", None)]
    assert [[x.scope for x in a] for a in alerts] == [[], [], ["global"]]
    assert alerts[2][0].organization_id is None


async def test_concurrent_replicas_alert_exactly_once_per_crossing(tracker) -> None:
    clock = Clock()
    replicas = [tracker(clock, org_cost_alert_threshold_usd=1.0) for _ in range(4)]
    results = await asyncio.gather(*(replicas[i % 4].record("org1", 0.1) for i in range(40)))
    assert sum(len(r) for r in results) == 1


async def test_exact_sums_of_small_costs(tracker) -> None:
    spend = tracker(org_cost_alert_threshold_usd=0.3)
    alerts = [await spend.record("org1", 0.1) for _ in range(3)]  # 0.1 * 3 is 0.30000000000000004 in floats
    assert [len(a) for a in alerts] == [0, 0, 1]
    assert alerts[2][0].spend_usd == 0.3


async def test_budget_refuses_a_call_that_would_exceed_it(tracker) -> None:
    spend = tracker(org_budget_usd=1.0)
    await spend.record("org1", 0.9)
    await spend.check_budget("org1", 0.05)
    with pytest.raises(RequestRejected) as exc:
        await spend.check_budget("org1", 0.2)
    assert exc.value.code is ErrorCode.COST_LIMIT_EXCEEDED
    assert exc.value.details["organization_id"] == "org1"


async def test_calls_checked_at_once_on_several_replicas_hold_their_estimates_so_the_budget_holds(
    tracker,
) -> None:
    replicas = [tracker(org_budget_usd=1.0) for _ in range(4)]
    checks = await asyncio.gather(
        *(replicas[i % 4].check_budget("org1", 0.1) for i in range(25)), return_exceptions=True
    )
    refused = [c for c in checks if isinstance(c, RequestRejected)]
    assert len(refused) == 15  # ten estimates of 0.1 fill the budget of 1.0; before, all 25 passed
    assert all(c.code is ErrorCode.COST_LIMIT_EXCEEDED for c in refused)


async def test_a_calls_real_cost_replaces_its_hold_and_a_failed_call_gives_it_back(tracker) -> None:
    spend = tracker(org_budget_usd=1.0)
    cheaper = await spend.check_budget("org1", 0.5)
    failed = await spend.check_budget("org1", 0.5)
    with pytest.raises(RequestRejected):
        await spend.check_budget("org1", 0.01)  # both holds count
    await spend.record("org1", 0.2, cheaper)  # cost 0.2 in place of 0.5
    await spend.record("org1", 0.0, failed)  # billed nothing: its 0.5 is given back
    assert await spend.check_budget("org1", 0.8) is not None  # 0.2 + 0.8 fills it exactly
    with pytest.raises(RequestRejected):
        await spend.check_budget("org1", 0.01)


async def test_a_hold_is_replaced_in_the_bucket_it_was_held_in(tracker, redis, prefix) -> None:
    clock = Clock()
    spend = tracker(clock, org_budget_usd=1.0, org_budget_window_s=3600)  # buckets of 60 s
    held = await spend.check_budget("org1", 0.5)
    clock.now += 120  # the call ended two buckets later
    await spend.record("org1", 0.2, held)
    buckets = {int(k): int(v) for k, v in (await redis.hgetall(f"{prefix}:spend:budget:org1")).items()}
    assert held is not None and buckets == {held.bucket: 200_000_000}


async def test_a_call_cancelled_in_flight_gives_its_budget_hold_back(
    tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revocation or shutdown past its grace cancels calls: their holds must not stay for the window."""
    spend = tracker(org_budget_usd=1.0)
    started = asyncio.Event()

    class HangingOrchestrator:
        prices = None

        async def run(self, call: Any, deadline_s: Any, allow_fallback: bool = False, **_: Any) -> Any:
            started.set()
            await asyncio.Event().wait()

    task = await _budgeted_call_started(spend, HangingOrchestrator(), started, monkeypatch)
    with pytest.raises(RequestRejected):
        await spend.check_budget("org1", 0.6)  # 0.5 is held
    await _cancel(task)
    assert await spend.check_budget("org1", 1.0) is not None  # given back


async def _budgeted_call_started(
    spend: SpendTracker,
    orchestrator: Any,
    started: asyncio.Event,
    monkeypatch: pytest.MonkeyPatch,
    outcomes: Any = None,
    request_id: str = "budgeted-1",
) -> asyncio.Task[Any]:
    """Handler._call of an org1 request (its budget check holds an estimate of 0.5) on `orchestrator`,
    once the orchestrator's run has set `started`."""
    from worker import handle
    from worker.handle import Handler
    from worker.providers.base import ComparisonCall
    from worker.settings import KafkaSettings
    from worker.validate import decode_request

    monkeypatch.setattr(handle, "estimate_call_usd", lambda prices, call: 0.5)
    topics = KafkaSettings().topics
    handler = Handler(orchestrator, outcomes, None, topics, "test", spend=spend)  # type: ignore[arg-type]
    env = request_envelope(organization_id="org1", request_id=request_id)
    job = decode_request(env.model_dump_json().encode(), None, topics.comparison_result)
    call = ComparisonCall(provider="openai", model="m", system_prompt="s", user_prompt="u")
    task = asyncio.create_task(handler._call(job, call, None, True, time.perf_counter(), "miss"))
    await asyncio.wait_for(started.wait(), 5)
    return task


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_call_cancelled_after_it_was_sent_counts_at_its_estimate(
    tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled once the provider had the prompt: the orchestrator records the cut call at its estimate
    (as for a deadline's cut), and that is what the budget keeps, not 0."""
    from contracts import TokenUsage, utc_now
    from worker.orchestrate import Attempt
    from worker.pricing import Cost

    spend = tracker(org_budget_usd=1.0, cost_alert_threshold_usd=0.25)
    started = asyncio.Event()

    class SentThenCancelled:
        prices = None

        async def run(self, call: Any, deadline_s: Any, outcome: Any = None, **_: Any) -> Any:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:  # as Orchestrator._attempt records a call cut while the provider had it
                usage = TokenUsage(prompt_tokens=100, total_tokens=100)
                outcome.attempts.append(
                    Attempt("openai", "m", utc_now(), 5, usage, Cost(0.3, True), None, True)
                )

    await _cancel(await _budgeted_call_started(spend, SentThenCancelled(), started, monkeypatch))
    with pytest.raises(RequestRejected):
        await spend.check_budget("org1", 0.8)  # 0.3 counted
    assert await spend.check_budget("org1", 0.7) is not None
    # The 0.3 crossed the alert threshold; a cancelled request sends no events, so the next call alerts.
    [alert] = await spend.record("org1", 0.01)
    assert alert.scope == "global" and alert.spend_usd == pytest.approx(0.31)


async def test_a_request_cancelled_while_its_answered_call_is_recorded_stores_its_events(
    tracker, redis, prefix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled (revocation, shutdown) after the provider answered, while its spend is being recorded: the
    task still ends cancelled (drain and revocation stay bounded), but the request's events are stored
    first, with the alert the recording made, so whoever reads the partition next replays them; losing the
    answer meant a second call and its spend counted twice."""
    from contracts import TokenUsage, utc_now
    from worker.orchestrate import Attempt
    from worker.outcomes import OutcomeStore
    from worker.pricing import Cost
    from worker.providers.base import Answer

    spend = tracker(org_budget_usd=1.0, cost_alert_threshold_usd=0.25)
    started, recording = asyncio.Event(), asyncio.Event()
    real_record = spend.record

    async def slow_record(*args: Any, **kwargs: Any) -> Any:
        recording.set()
        await asyncio.sleep(0.1)
        return await real_record(*args, **kwargs)

    monkeypatch.setattr(spend, "record", slow_record)

    class Answers:
        prices = None

        async def run(self, call: Any, deadline_s: Any, outcome: Any = None, **_: Any) -> Any:
            started.set()
            usage = TokenUsage(prompt_tokens=100, completion_tokens=10, total_tokens=110)
            outcome.answer = Answer("Essay A", "clearer", 4.0, "m", usage)
            outcome.attempts.append(Attempt("openai", "m", utc_now(), 5, usage, Cost(0.3, True)))
            return outcome

    store = OutcomeStore(redis, prefix, ttl_s=60)
    try:
        task = await _budgeted_call_started(spend, Answers(), started, monkeypatch, store, "answered-1")
        await asyncio.wait_for(recording.wait(), 5)
        await _cancel(task)
        found = await store.get("answered-1")
    finally:
        await store.aclose()
    assert found is not None and not found.emitted
    assert [m.kind for m in found.messages] == ["result", "cost", "cost_alert"]
    assert b'"winner":"Essay A"' in found.messages[0].value
    assert b'"scope":"global"' in found.messages[2].value  # 0.3 crossed 0.25
    with pytest.raises(RequestRejected):
        await spend.check_budget("org1", 0.8)  # 0.3 counted once
    assert await spend.check_budget("org1", 0.7) is not None


async def test_an_organization_with_a_budget_cannot_call_a_model_without_a_price(tracker) -> None:
    """Its cost would count 0, so the budget would not hold: refused before any call. Without a budget the
    call goes."""
    from contracts import TokenUsage
    from worker.handle import Handler
    from worker.orchestrate import Orchestrator
    from worker.pricing import ModelPrice, PriceTable
    from worker.providers.base import Answer, ComparisonCall
    from worker.settings import KafkaSettings
    from worker.validate import decode_request

    class Recording:
        name, default_model = "openai", "priced"

        def __init__(self) -> None:
            self.calls: list[str] = []

        async def compare(self, call: Any) -> Answer:
            self.calls.append(call.model)
            return Answer("Essay A", "clearer", 3.0, call.model, TokenUsage(prompt_tokens=8, total_tokens=8))

        async def aclose(self) -> None:
            return None

    provider = Recording()
    prices = PriceTable({"priced": ModelPrice(input=1.0, output=1.0)})
    orchestrator = Orchestrator({"openai": provider}, prices, ProviderName.OPENAI)  # type: ignore[dict-item]
    topics = KafkaSettings().topics
    handler = Handler(orchestrator, None, None, topics, "test", spend=tracker(org_budget_usd=10.0))  # type: ignore[arg-type]

    def job(**fields: Any) -> Any:
        env = request_envelope(**fields)
        return decode_request(env.model_dump_json().encode(), None, topics.comparison_result)

    def call(model: str) -> ComparisonCall:
        return ComparisonCall(provider="openai", model=model, system_prompt="s", user_prompt="u")

    async def call_as_process_does(job: Any, call: ComparisonCall) -> Any:
        assert handler.spend is not None
        budgeted = handler.spend.has_budget(job.request.organization_id)
        return await handler._call(job, call, None, budgeted, time.perf_counter(), "miss")

    refused, _ = await call_as_process_does(job(organization_id="org1"), call("unpriced"))
    assert refused.error is not None and refused.error.code is ErrorCode.CONFIGURATION_ERROR
    assert "'unpriced' has no price" in refused.error.message and provider.calls == []
    priced, _ = await call_as_process_does(job(organization_id="org1"), call("priced"))
    assert priced.answer is not None and provider.calls == ["priced"]
    no_budget, _ = await call_as_process_does(job(), call("unpriced"))  # no organization: no budget
    assert no_budget.answer is not None and provider.calls == ["priced", "unpriced"]


async def test_budget_is_per_organization(tracker) -> None:
    spend = tracker(org_budget_usd=1.0)
    await spend.record("org1", 1.5)
    with pytest.raises(RequestRejected):
        await spend.check_budget("org1", 0.5)
    await spend.check_budget("org2", 0.5)
    await spend.check_budget(None, 0.5)


async def test_budget_window_lets_old_spend_go(tracker) -> None:
    clock = Clock()
    spend = tracker(clock, org_budget_usd=1.0, org_budget_window_s=86_400)
    await spend.record("org1", 1.0)
    with pytest.raises(RequestRejected):
        await spend.check_budget("org1", 0.5)
    clock.now += 86_400
    await spend.check_budget("org1", 0.5)


async def test_without_thresholds_or_budgets_nothing_is_written(tracker, redis, prefix) -> None:
    await tracker().record("org1", 5.0)
    assert [k async for k in redis.scan_iter(match=f"{prefix}:spend*", count=10_000)] == []
