"""The orchestrator against the fake provider server over real HTTP: an outage opens the breaker after
the threshold, half-open recovers, Retry-After is honoured, fallback only when allowed, a deadline stops
retries. Clock and sleep are injected, so no test waits for a backoff."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from contracts import ErrorCode, ProviderName
from tests.unit.fake_providers import fake_server, make_call, settings_for
from tests.unit.fakes import FakeTime
from worker.breaker import BreakerPolicy, Breakers, BreakerState
from worker.fake_server import FakeProviderServer
from worker.orchestrate import FallbackPolicy, Orchestrator, RetryPolicy
from worker.pricing import PriceTable
from worker.providers import build_provider
from worker.providers.base import Provider

CALL = make_call("openai", "gpt-4.1-mini")


@pytest.fixture
async def server() -> AsyncIterator[tuple[FakeProviderServer, str]]:
    async with fake_server(slow_ms=1000) as found:
        yield found


def make(url: str, time: FakeTime, max_attempts: int = 3, threshold: int = 3) -> Orchestrator:
    settings = settings_for(url)
    providers: dict[str, Provider] = {}
    for name in (ProviderName.OPENAI, ProviderName.ANTHROPIC):
        provider = build_provider(name, settings)
        assert provider is not None
        providers[name.value] = provider
    return Orchestrator(
        providers,
        PriceTable.load(),
        ProviderName.OPENAI,
        breakers=Breakers(BreakerPolicy(threshold, 60, 30, 1), time),
        retry=RetryPolicy(max_attempts=max_attempts, attempt_budget=10, base_s=0.2, retry_after_cap_s=30),
        fallback=FallbackPolicy(("anthropic",)),
        clock=time,
        sleep=time.sleep,
    )


async def test_outage_opens_the_breaker_after_the_threshold(server) -> None:
    fake, url = server
    fake.default_scenario = "server_error"
    time = FakeTime()
    o = make(url, time, max_attempts=1)
    try:
        for _ in range(3):
            outcome = await o.run(CALL, None)
            assert outcome.error is not None and outcome.error.code is ErrorCode.EXTERNAL_SERVICE_ERROR
        assert o.breakers["openai"].state is BreakerState.OPEN
        outcome = await o.run(CALL, None)
    finally:
        await o.aclose()
    assert outcome.error is not None and outcome.error.code is ErrorCode.PROVIDER_UNAVAILABLE
    assert outcome.error.code.wire == "CIRCUIT_BREAKER_OPEN"
    assert fake.served == 3 and outcome.attempts == []


async def test_half_open_probe_recovers_the_provider(server) -> None:
    fake, url = server
    fake.default_scenario = "server_error"
    time = FakeTime()
    o = make(url, time, max_attempts=1)
    try:
        for _ in range(3):
            await o.run(CALL, None)
        fake.default_scenario = "ok"
        time.now += 30
        assert o.breakers["openai"].state is BreakerState.HALF_OPEN
        outcome = await o.run(CALL, None)
        assert outcome.answer is not None
        assert o.breakers["openai"].state is BreakerState.CLOSED
        assert (await o.run(CALL, None)).answer is not None
    finally:
        await o.aclose()
    assert fake.served == 5


async def test_retry_after_from_the_provider_is_honoured(server) -> None:
    fake, url = server
    fake.enqueue("rate_limit")
    time = FakeTime()
    o = make(url, time)
    try:
        outcome = await o.run(CALL, None)
    finally:
        await o.aclose()
    assert outcome.answer is not None
    assert time.sleeps == [7.0]  # the fake server's Retry-After
    assert [a.error_code for a in outcome.attempts] == [ErrorCode.RATE_LIMIT, None]


async def test_fallback_is_not_used_unless_the_request_allows_it(server) -> None:
    fake, url = server
    fake.default_scenario = "server_error"
    time = FakeTime()
    o = make(url, time, max_attempts=2)
    try:
        outcome = await o.run(CALL, None)
    finally:
        await o.aclose()
    assert outcome.error is not None and outcome.answered_by is None
    assert {r.api for r in fake.requests} == {"openai"} and fake.served == 2


async def test_fallback_answers_from_the_next_provider_when_allowed(server) -> None:
    fake, url = server
    fake.enqueue("server_error", "server_error")
    time = FakeTime()
    o = make(url, time, max_attempts=2)
    try:
        outcome = await o.run(CALL, None, allow_fallback=True)
    finally:
        await o.aclose()
    assert outcome.error is None and outcome.answer is not None
    assert outcome.answered_by is not None and outcome.answered_by.provider == "anthropic"
    assert [r.api for r in fake.requests] == ["openai", "openai", "anthropic"]
    assert [a.provider for a in outcome.attempts] == ["openai", "openai", "anthropic"]
    assert outcome.attempts[-1].cost is not None and outcome.attempts[-1].cost.usd > 0


async def test_deadline_stops_retries_that_would_wait_past_it(server) -> None:
    fake, url = server
    fake.default_scenario = "rate_limit"
    time = FakeTime()
    o = make(url, time)
    try:
        outcome = await o.run(CALL, time.now + 5)  # Retry-After 7 would end past it
    finally:
        await o.aclose()
    assert outcome.error is not None and outcome.error.code is ErrorCode.RATE_LIMIT
    assert fake.served == 1 and time.sleeps == []


async def test_deadline_cuts_a_slow_call_without_retrying_or_counting_it_against_the_provider(
    server,
) -> None:
    fake, url = server
    fake.default_scenario = "slow"
    time = FakeTime()
    o = make(url, time, threshold=1)
    try:
        outcome = await o.run(CALL, time.now + 0.3, allow_fallback=True)
    finally:
        await o.aclose()
    assert outcome.error is not None and outcome.error.code is ErrorCode.EXPIRED
    assert fake.served == 1 and len(outcome.attempts) == 1
    assert o.breakers["openai"].state is BreakerState.CLOSED
