"""Issue 5: the answer cache and single-flight against the real Redis: identical concurrent requests cause
one call within a process and across replicas (separate clients = separate replicas), a dead leader's
lease expires and a waiter takes over, a failed leader's joiners try again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from contracts import TokenUsage
from tests.conftest import REDIS_URL
from worker.cache import AnswerCache, CachedAnswer, RedisGuard
from worker.providers.base import Answer
from worker.settings import CacheSettings

ANSWER = CachedAnswer(Answer("Essay B", "better argued", 4.0, "mock-1", TokenUsage(total_tokens=42)), 0.002)


@pytest.fixture
async def clients(infra: None) -> AsyncIterator[Callable[[], Redis]]:
    made: list[Redis] = []

    def make() -> Redis:
        made.append(Redis.from_url(REDIS_URL))
        return made[-1]

    yield make
    for r in made:
        await r.aclose()


def replica(redis: Redis, prefix: str, **settings: Any) -> AnswerCache:
    s = CacheSettings(**{"single_flight_poll_ms": 20, **settings})
    return AnswerCache(redis, s, prefix, RedisGuard(s.cache_redis_retry_s))


class Provider:
    """Counts calls; each call waits until released, so callers overlap for sure."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls = 0
        self.fail_first = fail_first
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def call(self) -> str:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return "failed" if self.calls <= self.fail_first else "answer"


def to_cached(value: str) -> CachedAnswer | None:
    return ANSWER if value == "answer" else None


def _observe_polls(cache: AnswerCache) -> asyncio.Event:
    """An event set once `cache` polls Redis for another replica's answer."""
    polled, peek = asyncio.Event(), cache._peek

    async def observed_peek(*args: Any) -> Any:
        polled.set()
        return await peek(*args)

    cache._peek = observed_peek  # type: ignore[method-assign]
    return polled


async def test_identical_requests_in_one_process_make_one_call(prefix, clients) -> None:
    cache, provider = replica(clients(), prefix), Provider()
    tasks = [
        asyncio.create_task(cache.serve(f"{prefix}:k", provider.call, to_cached, None)) for _ in range(20)
    ]
    await asyncio.sleep(0)  # all twenty enter serve() before the call is released
    provider.release.set()
    flights = await asyncio.gather(*tasks)
    assert provider.calls == 1
    assert sum(f.led == "answer" for f in flights) == 1
    assert [f.scope for f in flights if f.shared].count("local") == 19


async def test_identical_requests_on_two_replicas_make_one_call(prefix, clients) -> None:
    a, b = replica(clients(), prefix), replica(clients(), prefix)
    provider, polled = Provider(), _observe_polls(b)
    leader = asyncio.create_task(a.serve(f"{prefix}:k", provider.call, to_cached, None))
    await provider.started.wait()
    waiters = [asyncio.create_task(b.serve(f"{prefix}:k", provider.call, to_cached, None)) for _ in range(5)]
    await polled.wait()  # b is polling while a's call is still open
    provider.release.set()
    led, shared = await leader, await asyncio.gather(*waiters)
    assert provider.calls == 1
    assert led.led == "answer"
    assert [f.scope for f in shared].count("replica") == 1  # b's own leader waited on a; 4 joined it
    assert all(f.shared == ANSWER for f in shared)


async def test_a_waiter_takes_over_when_the_leaders_lease_expires(prefix, clients) -> None:
    redis = clients()
    cache = replica(redis, prefix)
    await redis.set(f"{prefix}:k:lease", "a-leader-that-died", px=300)
    provider = Provider()
    provider.release.set()
    t0 = time.monotonic()
    flight = await cache.serve(f"{prefix}:k", provider.call, to_cached, None)
    assert (flight.led, provider.calls) == ("answer", 1)
    assert time.monotonic() - t0 >= 0.25  # it waited for the lease to run out


async def test_waiting_on_another_replica_ends_at_the_deadline(prefix, clients) -> None:
    redis = clients()
    cache = replica(redis, prefix)
    await redis.set(f"{prefix}:k:lease", "a-slow-leader", px=10_000)
    provider = Provider()
    with pytest.raises(TimeoutError):
        await cache.serve(f"{prefix}:k", provider.call, to_cached, time.monotonic() + 0.2)
    assert provider.calls == 0


async def test_joiners_of_a_failed_leader_call_again_and_share_the_retry(prefix, clients) -> None:
    cache, provider = replica(clients(), prefix), Provider(fail_first=1)
    tasks = [
        asyncio.create_task(cache.serve(f"{prefix}:k", provider.call, to_cached, None)) for _ in range(5)
    ]
    await asyncio.sleep(0)
    provider.release.set()
    flights = await asyncio.gather(*tasks)
    assert provider.calls == 2
    assert sorted(str(f.led) for f in flights if f.led) == ["answer", "failed"]
    assert sum(f.shared == ANSWER for f in flights) == 3


async def test_the_leader_stores_the_answer_and_the_next_request_hits_redis(prefix, clients) -> None:
    provider = Provider()
    provider.release.set()
    await replica(clients(), prefix).serve(f"{prefix}:k", provider.call, to_cached, None)
    flight = await replica(clients(), prefix).serve(f"{prefix}:k", provider.call, to_cached, None)
    assert (flight.shared, flight.layer, provider.calls) == (ANSWER, "redis", 1)


async def test_refresh_calls_again_and_overwrites_the_answer(prefix, clients) -> None:
    redis = clients()
    cache = replica(redis, prefix)
    stale = CachedAnswer(ANSWER.answer, 9.0)
    await cache.put(f"{prefix}:k", stale)
    provider = Provider()
    provider.release.set()
    flight = await cache.serve(f"{prefix}:k", provider.call, to_cached, None, read=False)
    assert (flight.led, provider.calls) == ("answer", 1)
    assert CachedAnswer.from_bytes(await redis.get(f"{prefix}:k")) == ANSWER


async def test_entries_in_redis_expire_after_the_ttl(prefix, clients) -> None:
    redis = clients()
    await replica(redis, prefix, cache_ttl_s=120).put(f"{prefix}:k", ANSWER)
    assert 110 < await redis.ttl(f"{prefix}:k") <= 120


async def test_a_joiner_past_its_deadline_gives_up_without_cancelling_the_leader(prefix, clients) -> None:
    cache, provider = replica(clients(), prefix), Provider()
    leader = asyncio.create_task(cache.serve(f"{prefix}:k", provider.call, to_cached, None))
    await provider.started.wait()
    with pytest.raises(TimeoutError):
        await cache.serve(f"{prefix}:k", provider.call, to_cached, time.monotonic() + 0.1)
    provider.release.set()
    assert (await leader).led == "answer"
    assert provider.calls == 1


async def test_when_the_shared_retry_has_nothing_to_share_either_the_rest_call_side_by_side(
    prefix, clients
) -> None:
    # E.g. every call answered by a fallback provider (not cached): the joiners must not queue up behind
    # one new leader after another, N calls long.
    cache = replica(clients(), prefix)
    running, most = 0, 0

    async def unshareable() -> str:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        return "fallback answer"

    flights = await asyncio.gather(
        *(cache.serve(f"{prefix}:k", unshareable, to_cached, None) for _ in range(6))
    )
    assert all(f.led == "fallback answer" for f in flights)
    assert most == 4  # a leader, the one shared retry, then the other four at once


async def test_a_refresh_never_gets_the_entry_it_was_asked_to_replace(prefix, clients) -> None:
    # Replica a refreshes; replica b refreshes the same key meanwhile and waits on a's lease, and a local
    # reading request leads a flight on b. b's refresh must end with a fresh answer, not the old entry.
    redis = clients()
    a, b = replica(redis, prefix), replica(clients(), prefix)
    stale = CachedAnswer(ANSWER.answer, 9.0)
    await a.put(f"{prefix}:k", stale)
    provider, polled = Provider(), _observe_polls(b)
    leader = asyncio.create_task(a.serve(f"{prefix}:k", provider.call, to_cached, None, read=False))
    await provider.started.wait()
    refresh = asyncio.create_task(b.serve(f"{prefix}:k", provider.call, to_cached, None, read=False))
    await polled.wait()  # b polls while a's call is open, and sees the old entry
    reader = await b.serve(f"{prefix}:k", provider.call, to_cached, None)  # a reading request on b
    assert reader.shared == stale  # a plain read may have the old entry until the refresh lands
    provider.release.set()
    await leader
    refreshed = await refresh
    assert (refreshed.shared or to_cached(refreshed.led)) == ANSWER


async def test_a_leader_whose_breaker_opened_meanwhile_stores_and_releases_once_it_lets_calls_through(
    prefix, clients
) -> None:
    """Any Redis error of a replica opens its breaker, though Redis may be fine: a leader finishing then
    must not leave other replicas' requests waiting for its lease until it expires (30 s by default)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from worker.cache import RedisUnavailable

    redis, key = clients(), f"{prefix}:k"
    leader = replica(redis, prefix, cache_redis_retry_s=0.2)
    provider = Provider()
    flight = asyncio.create_task(leader.serve(key, provider.call, to_cached, None))
    await asyncio.wait_for(provider.started.wait(), 5)
    assert await redis.exists(f"{key}:lease") == 1

    async def failing() -> None:
        raise RedisConnectionError("a spend call timed out")

    with pytest.raises(RedisUnavailable):
        await leader.guard.call("spend", failing)  # the breaker opens
    provider.release.set()
    await flight
    assert await redis.exists(key) == 0  # not stored: the breaker was open
    follower = replica(clients(), prefix)
    # it finds the lease and waits: for the stored answer, well before the lease's 30 s
    shared = await asyncio.wait_for(follower.serve(key, provider.call, to_cached, None), 5)
    assert (shared.shared, provider.calls) == (ANSWER, 1)
    assert await redis.exists(f"{key}:lease") == 0
    await leader.aclose()


async def test_a_refresh_on_one_replica_drops_the_entry_from_the_others_local_layer(prefix, clients) -> None:
    old = CachedAnswer(Answer("Essay A", "first take", 2.0, "mock-1", TokenUsage(total_tokens=7)), 0.001)
    key = f"{prefix}:k"
    a, b = replica(clients(), prefix), replica(clients(), prefix)
    a.start()
    b.start()
    try:
        await asyncio.sleep(0.2)  # both subscribed
        first = await a.serve(key, _value("first"), {"first": old, "second": ANSWER}.get, None)
        assert first.shared is None and first.led == "first"
        seen = await b.serve(key, _value("unused"), lambda v: None, None)
        assert seen.shared == old and seen.layer == "redis"  # now in b's local layer too
        refreshed = await a.serve(
            key, _value("second"), {"first": old, "second": ANSWER}.get, None, read=False
        )
        assert refreshed.led == "second"
        for _ in range(100):  # the announcement reaches b
            if b.local.get(key) is None:
                break
            await asyncio.sleep(0.02)
        again = await b.serve(key, _value("unused"), lambda v: None, None)
        assert again.shared == ANSWER and again.layer == "redis"  # before: the old answer, from b's layer
        assert a.local.get(key) == ANSWER  # the refreshing replica keeps its own new entry
    finally:
        await a.aclose()
        await b.aclose()


def _value(v: str) -> Callable[[], Any]:
    async def compute() -> str:
        return v

    return compute


async def test_an_entry_read_while_a_refresh_was_announced_is_answered_but_not_kept_locally(
    prefix, clients
) -> None:
    """The read may have left Redis before the refresh's store: the entry it got may be the replaced one."""
    cache = replica(clients(), prefix)
    raw = ANSWER.to_bytes()
    before = cache._epoch
    cache._epoch += 1  # a refresh heard while the read was on its way
    assert cache._decode(f"{prefix}:k", raw, before) == ANSWER
    assert cache.local.get(f"{prefix}:k") is None
    assert cache._decode(f"{prefix}:k", raw, cache._epoch) == ANSWER
    assert cache.local.get(f"{prefix}:k") == ANSWER


async def test_a_refresh_whose_announcement_redis_refuses_still_stores_and_releases(prefix, clients) -> None:
    """A Redis user without channel rights (ACL resetchannels): the entry is stored and the lease released
    all the same; only the announcement is lost."""
    admin = clients()
    user, password = f"{prefix}-nopub", "pw-nopub"
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all", "resetchannels")
    try:
        cache = replica(Redis.from_url(REDIS_URL, username=user, password=password), prefix)
        key = f"{prefix}:k"
        flight = await cache.serve(key, _value("v"), lambda v: ANSWER, None, read=False)
        assert flight.led == "v"
        assert await admin.get(key) == ANSWER.to_bytes()
        assert await admin.exists(f"{key}:lease") == 0
        assert cache.guard.status == "healthy"
        await cache.redis.aclose()
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
