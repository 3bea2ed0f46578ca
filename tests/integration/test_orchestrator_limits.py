"""The orchestrator with the shared limiter on the real Redis: a call waits for capacity within its
deadline, is refused (and may fall back) when capacity comes too late, and the token window holds the
real usage after the call."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from contracts import ErrorCode, ProviderName
from tests.conftest import REDIS_URL
from tests.unit.fakes import Scripted
from worker.limits import Limit, Limiter
from worker.orchestrate import FallbackPolicy, Orchestrator
from worker.pricing import PriceTable
from worker.providers.base import ComparisonCall

pytestmark = pytest.mark.connected

CALL = ComparisonCall(provider="p", model="p-model", system_prompt="s" * 400, user_prompt="u" * 400)


@pytest.fixture
async def redis(infra: None) -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    while _limiters:  # each holds a connection of its own
        await _limiters.pop().aclose()
    await client.aclose()


_limiters: list[Limiter] = []


def make(redis: Redis, prefix: str, limits: dict[str, Limit], *providers: Scripted) -> Orchestrator:
    limiter = Limiter(redis, limits, prefix, window_s=0.5)
    _limiters.append(limiter)
    return Orchestrator(
        {p.name: p for p in providers},  # type: ignore[misc]
        PriceTable({}),
        ProviderName.MOCK,
        limiter=limiter,
        fallback=FallbackPolicy(("q",)),
    )


async def test_call_waits_for_capacity_within_its_deadline(redis: Redis, prefix: str) -> None:
    p = Scripted("p")
    o = make(redis, prefix, {"p": Limit(requests_per_minute=1)}, p)
    assert (await o.run(CALL, None)).answer is not None
    t0 = time.monotonic()
    outcome = await o.run(CALL, time.monotonic() + 5)
    assert outcome.answer is not None
    assert 0.3 < time.monotonic() - t0 < 2.0  # waited for the 0.5 s window, did not fail
    assert len(p.calls) == 2


async def test_call_is_refused_when_capacity_comes_after_its_deadline(redis: Redis, prefix: str) -> None:
    p = Scripted("p")
    o = make(redis, prefix, {"p": Limit(requests_per_minute=1)}, p)
    await o.run(CALL, None)
    outcome = await o.run(CALL, time.monotonic() + 0.1)
    assert outcome.error is not None and outcome.error.code is ErrorCode.RATE_LIMIT
    assert outcome.error.details["limiter"] == "local"
    assert len(p.calls) == 1 and outcome.attempts == []


async def test_refused_call_falls_back_when_allowed(redis: Redis, prefix: str) -> None:
    p, q = Scripted("p"), Scripted("q")
    o = make(redis, prefix, {"p": Limit(requests_per_minute=1)}, p, q)
    await o.run(CALL, None)
    outcome = await o.run(CALL, time.monotonic() + 0.1, allow_fallback=True)
    assert outcome.answered_by is not None and outcome.answered_by.provider == "q"


async def test_token_window_holds_real_usage_after_the_call(redis: Redis, prefix: str) -> None:
    o = make(redis, prefix, {"p": Limit(tokens_per_minute=100_000)}, Scripted("p"))
    await o.run(CALL, None)
    assert o.limiter is not None
    await o.limiter.flush()  # corrections are sent off the request's path
    assert int(await redis.get(f"{prefix}:rl:p:tpm:sum") or 0) == 15  # Scripted reports 15 tokens
