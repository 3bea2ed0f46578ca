"""Issue 5 benchmark: the answer cache on the local Redis (127.0.0.1:6379), prefix bench<random>, cleaned up.

Prints per-request wall time of: make_cache_key on a 12 KB prompt; a miss that leads and stores (two Redis
round trips: read-or-lease, store-and-release), sequential and N concurrent; a Redis hit with an empty
local layer; a local-layer hit. Redis client as in the worker: a BlockingConnectionPool of 64.

Usage: python bench/bench_cache.py [-n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from redis.asyncio import BlockingConnectionPool, Redis

from contracts import TokenUsage
from worker.cache import AnswerCache, CachedAnswer, LocalLRU, RedisGuard, make_cache_key
from worker.providers.base import DEFAULT_SYSTEM_PROMPT, Answer, ComparisonCall
from worker.settings import CacheSettings

ANSWER = CachedAnswer(Answer("Essay A", "x" * 200, 4.0, "m", TokenUsage(total_tokens=500)), 0.001, "r", ())


async def compute() -> str:
    return "answer"


def to_cached(value: str) -> CachedAnswer:
    return ANSWER


async def main(n: int) -> None:
    pool = BlockingConnectionPool.from_url("redis://127.0.0.1:6379/0", max_connections=64, timeout=5)
    redis = Redis(connection_pool=pool)
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    cache = AnswerCache(redis, CacheSettings(), prefix, RedisGuard(5))
    prompt = "Essay A: " + "a" * 6000 + "\n\nEssay B: " + "b" * 6000
    call = ComparisonCall("openai", "gpt-5-mini", DEFAULT_SYSTEM_PROMPT, prompt)
    try:
        t0 = time.perf_counter()
        for _ in range(n * 10):
            make_cache_key(call, prefix)
        print(f"make_cache_key, 12 KB prompt:       {(time.perf_counter() - t0) / (n * 10) * 1e6:8.1f} us")
        t0 = time.perf_counter()
        for i in range(n):
            await cache.serve(f"{prefix}:s{i}", compute, to_cached, None)
        print(f"miss + store, sequential:           {(time.perf_counter() - t0) / n * 1e6:8.1f} us/request")
        t0 = time.perf_counter()
        await asyncio.gather(*(cache.serve(f"{prefix}:c{i}", compute, to_cached, None) for i in range(n)))
        print(f"miss + store, {n} concurrent:      {(time.perf_counter() - t0) / n * 1e6:8.1f} us/request")
        cache.local = LocalLRU(10, 1_000_000, 60)  # empty local layer: hits come from Redis
        t0 = time.perf_counter()
        for i in range(n):
            flight = await cache.serve(f"{prefix}:s{i}", compute, to_cached, None)
            assert flight.layer == "redis"
        print(f"Redis hit, sequential:              {(time.perf_counter() - t0) / n * 1e6:8.1f} us/request")
        t0 = time.perf_counter()
        for _ in range(n):
            await cache.serve(f"{prefix}:s{n - 1}", compute, to_cached, None)
        print(f"local hit:                          {(time.perf_counter() - t0) / n * 1e6:8.1f} us/request")
        assert cache.guard.status == "healthy", "Redis failed during the run: numbers are not valid"
    finally:
        keys = await redis.keys(f"{prefix}:*")
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000)
    asyncio.run(main(parser.parse_args().n))
