"""Rate limiter logic in process: local windows, waiting bounded by the deadline, token correction,
FIFO concurrency, and the degraded local share when Redis is unreachable."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from contracts import ErrorCode
from tests.unit.fakes import FakeTime
from worker import metrics
from worker.errors import ProviderError
from worker.limits import FifoSlots, Limit, Limiter, estimate_tokens
from worker.providers.base import ComparisonCall
from worker.settings import ResilienceSettings


def local_limiter(limits: dict[str, Limit], time_: FakeTime, replicas: int = 1) -> Limiter:
    return Limiter(None, limits, "k", replicas, clock=time_, sleep=time_.sleep)


async def test_requests_per_minute_admits_up_to_the_limit_then_waits_for_the_oldest_to_expire() -> None:
    t = FakeTime()
    limiter = local_limiter({"p": Limit(requests_per_minute=3)}, t)
    for _ in range(3):
        await limiter.acquire("p", "m", 1)
        t.now += 1
    assert t.sleeps == []
    await limiter.acquire("p", "m", 1)
    assert t.sleeps == [pytest.approx(57.0)]


async def test_waiting_for_capacity_is_refused_when_it_would_pass_the_deadline() -> None:
    t = FakeTime()
    limiter = local_limiter({"p": Limit(requests_per_minute=1)}, t)
    await limiter.acquire("p", "m", 1)
    with pytest.raises(ProviderError) as caught:
        await limiter.acquire("p", "m", 1, deadline_s=t.now + 30)
    assert caught.value.code is ErrorCode.RATE_LIMIT and caught.value.details["limiter"] == "local"
    assert t.sleeps == []


async def test_tokens_estimate_is_corrected_with_real_usage() -> None:
    t = FakeTime()
    limiter = local_limiter({"p": Limit(tokens_per_minute=1000)}, t)
    grant = await limiter.acquire("p", "m", 600)
    await limiter.settle(grant, 100)
    await limiter.acquire("p", "m", 600)  # 100 + 600 fits; 600 + 600 would not
    assert t.sleeps == []


async def test_tokens_over_estimate_correction_holds_back_later_calls() -> None:
    t = FakeTime()
    limiter = local_limiter({"p": Limit(tokens_per_minute=1000)}, t)
    grant = await limiter.acquire("p", "m", 100)
    await limiter.settle(grant, 900)
    await limiter.acquire("p", "m", 200)
    assert t.sleeps == [pytest.approx(60.0)]


async def test_call_larger_than_the_limit_is_refused_at_once() -> None:
    t = FakeTime()
    limiter = local_limiter({"p": Limit(tokens_per_minute=1000)}, t)
    with pytest.raises(ProviderError):
        await limiter.acquire("p", "m", 5000)
    assert t.sleeps == []


async def test_without_redis_a_call_over_the_replicas_share_but_within_the_limit_goes_alone() -> None:
    t = FakeTime()
    limiter = local_limiter({"p": Limit(tokens_per_minute=1000)}, t, replicas=4)  # a share of 250
    first = await limiter.acquire("p", "m", 600)  # before: refused at once, though the key allows 1000
    assert t.sleeps == []
    await limiter.settle(first, 600)
    await limiter.acquire("p", "m", 10)  # alone in the window: the next call waits for it to move
    assert t.sleeps == [pytest.approx(60.0)]
    with pytest.raises(ProviderError):
        await limiter.acquire("p", "m", 1001)  # over the limit itself: never


async def test_per_model_limit_applies_with_the_provider_limit() -> None:
    t = FakeTime()
    limiter = local_limiter({"p": Limit(requests_per_minute=10), "p:big": Limit(requests_per_minute=1)}, t)
    await limiter.acquire("p", "big", 1)
    await limiter.acquire("p", "small", 1)
    assert t.sleeps == []
    await limiter.acquire("p", "big", 1)
    assert len(t.sleeps) == 1


async def test_unlimited_provider_is_not_held() -> None:
    t = FakeTime()
    limiter = local_limiter({"p": Limit(requests_per_minute=1)}, t)
    for _ in range(5):
        await limiter.acquire("other", "m", 1)
    assert t.sleeps == []


async def test_fifo_slots_hand_freed_slots_in_arrival_order() -> None:
    slots = FifoSlots(1)
    await slots.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await slots.acquire()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        slots.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


async def test_fifo_slots_skip_a_cancelled_waiter() -> None:
    slots = FifoSlots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    slots.release()
    await asyncio.wait_for(second, 1)
    assert slots.free == 0


async def test_concurrency_wait_is_bounded_by_the_deadline() -> None:
    limiter = Limiter(None, {"p": Limit(max_concurrency=1)}, "k")
    grant = await limiter.acquire("p", "m", 1)
    with pytest.raises(ProviderError):
        await limiter.acquire("p", "m", 1, deadline_s=time.monotonic() + 0.05)
    await limiter.settle(grant, None)
    await asyncio.wait_for(limiter.acquire("p", "m", 1), 1)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_redis_degrades_to_a_local_share_and_says_so() -> None:
    t = FakeTime()
    redis = Redis(
        host="127.0.0.1", port=_dead_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    limiter = Limiter(redis, {"p": Limit(requests_per_minute=9)}, "k", 3, clock=t, sleep=t.sleep)
    try:
        for _ in range(3):
            await limiter.acquire("p", "m", 1)
        assert t.sleeps == [] and metrics.LIMITER_DEGRADED._value.get() == 1
        await limiter.acquire("p", "m", 1)  # 9 / 3 replicas = 3 per minute here
        assert t.sleeps == [pytest.approx(60.0)]
    finally:
        await redis.aclose()
        metrics.LIMITER_DEGRADED.set(0)


def test_token_estimate_counts_prompt_and_output_cap() -> None:
    call = ComparisonCall("p", "m", "s" * 400, "u" * 400, max_tokens=50)
    assert estimate_tokens(call) == 201 + 50


async def test_redis_that_does_not_answer_degrades_after_the_call_timeout() -> None:
    t = FakeTime()
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        redis = Redis(host="127.0.0.1", port=silent.getsockname()[1], retry=Retry(NoBackoff(), 0))
        limiter = Limiter(
            redis,
            {"p": Limit(requests_per_minute=9)},
            "k",
            3,
            clock=t,
            sleep=t.sleep,
            redis_call_timeout_s=0.1,
        )
        try:
            grant = await asyncio.wait_for(limiter.acquire("p", "m", 1), 2)
            assert grant.admitted_ms == 0 and metrics.LIMITER_DEGRADED._value.get() == 1
        finally:
            await limiter.aclose()  # still waiting for the silent server's reply
            await redis.aclose()
            metrics.LIMITER_DEGRADED.set(0)


async def test_the_memo_of_limits_per_model_stays_bounded_whatever_models_requests_name() -> None:
    from worker.limits import _MAX_TARGETS

    t = FakeTime()
    limiter = local_limiter({"p": Limit(requests_per_minute=100_000)}, t)
    for i in range(_MAX_TARGETS + 10):
        await limiter.acquire("p", f"model-{i}", 1)
    assert len(limiter._targets) <= _MAX_TARGETS


async def test_a_correction_for_a_call_that_outlived_the_window_does_not_skew_the_local_window() -> None:
    t = FakeTime()
    limiter = local_limiter({"p": Limit(tokens_per_minute=1000)}, t)
    long_call = await limiter.acquire("p", "m", 400)
    t.now += 61  # the call outlived the window: its entry has aged out
    await limiter.acquire("p", "m", 600)
    await limiter.settle(long_call, 10)  # its estimate no longer counts, so neither does its correction
    await limiter.acquire("p", "m", 400)  # 600 + 400 fill the window exactly
    assert t.sleeps == []
    await limiter.acquire("p", "m", 1)  # and one more token must wait for the window to move
    assert t.sleeps == [pytest.approx(60.0)]


async def test_waiting_behind_the_queues_head_is_bounded_by_the_deadline() -> None:
    # Real time: the head of the queue sleeps for the window to move while a later caller waits behind it.
    limiter = Limiter(None, {"p": Limit(requests_per_minute=1)}, "k", window_s=2.0)
    await limiter.acquire("p", "m", 1)
    head = asyncio.create_task(limiter.acquire("p", "m", 1))  # sleeps about 2 s for the window
    await asyncio.sleep(0.01)
    with pytest.raises(ProviderError) as caught:
        await limiter.acquire("p", "m", 1, deadline_s=time.monotonic() + 0.1)
    assert caught.value.code is ErrorCode.RATE_LIMIT
    assert not head.done()  # refused at its deadline, not after the head got its turn
    head.cancel()
    with pytest.raises(asyncio.CancelledError):
        await head


async def test_a_wait_for_a_models_own_limit_does_not_hold_up_the_providers_other_models() -> None:
    # Real time: the head waiting for "big"'s own window to move (about 2 s) is in a queue of its own.
    limits = {"p": Limit(requests_per_minute=10), "p:big": Limit(requests_per_minute=1)}
    limiter = Limiter(None, limits, "k", window_s=2.0)
    await limiter.acquire("p", "big", 1)
    head = asyncio.create_task(limiter.acquire("p", "big", 1))
    await asyncio.sleep(0.01)
    for model in ("small", "other"):  # the provider's limit has room for them
        await asyncio.wait_for(limiter.acquire("p", model, 1), 0.5)
    assert not head.done()
    head.cancel()
    with pytest.raises(asyncio.CancelledError):
        await head


@pytest.mark.parametrize(
    "big",
    [Limit(max_concurrency=1), Limit(requests_per_minute=1)],
    ids=["its own slot", "its own window"],
)
async def test_a_call_waiting_for_its_models_own_limit_holds_none_of_the_providers_slots(big: Limit) -> None:
    # Real time (the window variant's head sleeps about 2 s). The provider has two slots: the first "big"
    # call holds one; the second waits for "big"'s own limit and must leave the other to "small".
    limiter = Limiter(None, {"p": Limit(max_concurrency=2), "p:big": big}, "k", window_s=2.0)
    first = await limiter.acquire("p", "big", 1)
    second = asyncio.create_task(limiter.acquire("p", "big", 1))
    await asyncio.sleep(0.01)
    small = await asyncio.wait_for(limiter.acquire("p", "small", 1, deadline_s=time.monotonic() + 0.3), 1)
    assert not second.done()
    await limiter.settle(small, 1)
    await limiter.settle(first, 1)
    granted = await asyncio.wait_for(second, 5)  # and the second gets its turn, with its slots
    assert len(granted.slots) == (2 if big.max_concurrency else 1)
    await limiter.settle(granted, 1)


@pytest.mark.parametrize(
    "limits",
    [
        {"openai": {"requests_per_minute": 0}},  # read as no limit at all
        {"openai": {"max_concurrency": -1}},  # every call waited for its deadline
        {"openai": {"tokens_per_minute": True}},
        {"OpenAI:gpt-4.1": {"requests_per_minute": 5}},  # a scope that names no provider was ignored
        {"openai": {"rpm": 5}},
    ],
)
def test_rate_limits_that_would_not_limit_as_written_are_refused_at_start(limits: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ResilienceSettings(rate_limits=limits)  # type: ignore[arg-type]
    assert ResilienceSettings(rate_limits={"openai:gpt-4.1": {"tokens_per_minute": 1000}}).rate_limits
