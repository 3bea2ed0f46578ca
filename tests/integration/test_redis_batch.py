"""RedisBatch on the real Redis: concurrent callers share pipelines, errors stay with their caller."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tests.conftest import REDIS_URL
from worker.redis_batch import RedisBatch


async def test_concurrent_commands_each_get_their_own_reply(prefix) -> None:
    redis = Redis.from_url(REDIS_URL)
    try:
        batch = RedisBatch(redis)
        await asyncio.gather(*(batch.execute("SET", f"{prefix}:{i}", i) for i in range(300)))
        values = await asyncio.gather(*(batch.execute("GET", f"{prefix}:{i}") for i in range(300)))
        assert values == [str(i).encode() for i in range(300)]
    finally:
        await redis.delete(*[f"{prefix}:{i}" for i in range(300)])
        await redis.aclose()


async def test_a_failing_command_fails_only_its_caller(prefix) -> None:
    redis = Redis.from_url(REDIS_URL)
    try:
        batch = RedisBatch(redis)
        await redis.set(f"{prefix}:s", "text")
        ok, bad = await asyncio.gather(
            batch.execute("GET", f"{prefix}:s"), batch.execute("INCR", f"{prefix}:s"), return_exceptions=True
        )
        assert ok == b"text"
        assert isinstance(bad, ResponseError)
        with pytest.raises(ResponseError):
            await batch.execute("HGET", f"{prefix}:s", "field")
    finally:
        await redis.delete(f"{prefix}:s")
        await redis.aclose()
