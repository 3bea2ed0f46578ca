"""Issue 5: cache key derivation, the local LRU's bounds, the Redis guard (breaker), entry encoding."""

from __future__ import annotations

import dataclasses
import re

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from contracts import PromptBlock, TokenUsage
from worker import cache as cache_module
from worker.cache import CachedAnswer, LocalLRU, RedisGuard, RedisUnavailable, make_cache_key
from worker.providers.base import Answer, ComparisonCall

CALL = ComparisonCall(
    provider="openai",
    model="gpt-5-mini",
    system_prompt="judge",
    user_prompt="Essay A ... Essay B ...",
    prompt_blocks=(PromptBlock(target="user_content", content="rubric"),),
    temperature=0.2,
    max_tokens=300,
    reasoning_effort="low",
    output_verbosity="low",
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cached(text: str = "x") -> CachedAnswer:
    return CachedAnswer(Answer("Essay A", text, 4.0, "m", TokenUsage(total_tokens=10)), 0.001)


def test_cache_key_is_namespaced_versioned_and_a_sha256() -> None:
    assert re.fullmatch(r"llmw:cache:v2:[0-9a-f]{64}", make_cache_key(CALL, "llmw"))


def test_cache_key_is_the_same_for_the_same_call() -> None:
    assert make_cache_key(CALL, "p") == make_cache_key(dataclasses.replace(CALL), "p")


@pytest.mark.parametrize(
    "change",
    [
        {"provider": "anthropic"},
        {"model": "gpt-5"},
        {"system_prompt": "judge strictly"},
        {"user_prompt": "Essay A ... Essay C ..."},
        {"prompt_blocks": (PromptBlock(target="system", content="rubric"),)},
        {"temperature": 0.3},
        {"max_tokens": 301},
        {"reasoning_effort": "high"},
        {"output_verbosity": "high"},
    ],
)
def test_cache_key_changes_with_every_answer_changing_field(change: dict[str, object]) -> None:
    assert make_cache_key(dataclasses.replace(CALL, **change), "p") != make_cache_key(CALL, "p")  # type: ignore[arg-type]


def test_cache_key_ignores_prompt_caching_hints() -> None:
    plain = dataclasses.replace(CALL, prompt_blocks=(PromptBlock(target="user_content", content="rubric"),))
    hinted = (PromptBlock(target="user_content", content="rubric", cacheable=True, ttl="1h"),)
    assert make_cache_key(dataclasses.replace(CALL, prompt_blocks=hinted), "p") == make_cache_key(plain, "p")


def test_anthropic_blocks_the_hints_reorder_are_another_key() -> None:
    # Anthropic gets cacheable blocks first: [A, B(cacheable)] is sent as B, A; [A, B] as A, B.
    a, b = PromptBlock(target="user_content", content="Essay A: X"), "Essay B: Y"
    hinted = (a, PromptBlock(target="user_content", content=b, cacheable=True))
    plain = (a, PromptBlock(target="user_content", content=b))
    for provider in ("anthropic", "openai"):
        call = dataclasses.replace(CALL, provider=provider)
        keys = [make_cache_key(dataclasses.replace(call, prompt_blocks=p), "p") for p in (hinted, plain)]
        assert (keys[0] != keys[1]) is (provider == "anthropic")
    ordered = (hinted[1], a)  # the order Anthropic sends the hinted one in, hinted the same: same prompt
    anthropic = dataclasses.replace(CALL, provider="anthropic")
    assert make_cache_key(dataclasses.replace(anthropic, prompt_blocks=hinted), "p") == make_cache_key(
        dataclasses.replace(anthropic, prompt_blocks=ordered), "p"
    )


def test_cache_key_changes_with_the_answer_schema_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = make_cache_key(CALL, "p")
    monkeypatch.setattr(cache_module, "SCHEMA_VERSION", cache_module.SCHEMA_VERSION + 1)
    assert make_cache_key(CALL, "p") != before


def test_cached_answer_survives_encoding() -> None:
    value = CachedAnswer(cached().answer, 0.25, "req-1", (["openai", "m", "2026-01-01T00:00:00+00:00"],))
    assert CachedAnswer.from_bytes(value.to_bytes()) == value


def test_local_lru_evicts_the_least_recently_used_beyond_max_entries() -> None:
    lru = LocalLRU(max_entries=2, max_bytes=10_000, ttl_s=60)
    lru.put("a", cached(), 10)
    lru.put("b", cached(), 10)
    assert lru.get("a") is not None  # a is now more recent than b
    lru.put("c", cached(), 10)
    assert (lru.get("a") is not None, lru.get("b"), lru.get("c") is not None) == (True, None, True)


def test_local_lru_evicts_until_under_max_bytes() -> None:
    lru = LocalLRU(max_entries=100, max_bytes=250, ttl_s=60)
    for key in ("k1", "k2", "k3"):
        lru.put(key, cached(), 98)  # 100 bytes with the key
    assert lru.get("k1") is None
    assert len(lru) == 2
    assert lru.bytes == 200


def test_local_lru_never_holds_an_entry_larger_than_max_bytes() -> None:
    lru = LocalLRU(max_entries=100, max_bytes=100, ttl_s=60)
    lru.put("small", cached(), 10)
    lru.put("huge", cached(), 1000)
    assert (lru.get("huge"), lru.get("small") is not None) == (None, True)


def test_local_lru_entries_expire_after_ttl() -> None:
    clock = Clock()
    lru = LocalLRU(max_entries=10, max_bytes=10_000, ttl_s=30, clock=clock)
    lru.put("a", cached(), 10)
    clock.now += 29.9
    assert lru.get("a") is not None
    clock.now += 0.1
    assert lru.get("a") is None
    assert lru.bytes == 0


class FlakyRedis:
    def __init__(self) -> None:
        self.calls = 0
        self.down = True

    async def op(self) -> str:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("connection refused")
        return "ok"


async def test_guard_after_an_error_skips_redis_until_the_retry_time() -> None:
    clock, redis = Clock(), FlakyRedis()
    guard = RedisGuard(retry_s=5, clock=clock)
    for _ in range(10):
        with pytest.raises(RedisUnavailable):
            await guard.call("get", redis.op)
    assert redis.calls == 1
    assert guard.status == "degraded"


async def test_guard_probes_once_after_the_retry_time_and_recovers() -> None:
    clock, redis = Clock(), FlakyRedis()
    guard = RedisGuard(retry_s=5, clock=clock)
    with pytest.raises(RedisUnavailable):
        await guard.call("get", redis.op)
    clock.now += 5
    redis.down = False
    assert await guard.call("get", redis.op) == "ok"
    assert (redis.calls, guard.status) == (2, "healthy")


async def test_guard_stays_degraded_when_the_probe_fails() -> None:
    clock, redis = Clock(), FlakyRedis()
    guard = RedisGuard(retry_s=5, clock=clock)
    with pytest.raises(RedisUnavailable):
        await guard.call("get", redis.op)
    clock.now += 5
    await guard.probe(redis.op)
    with pytest.raises(RedisUnavailable):
        await guard.call("get", redis.op)  # within the new retry time: skipped
    assert (redis.calls, guard.status) == (2, "degraded")
