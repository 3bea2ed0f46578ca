"""Issue 5: Redis stops mid-test (our own redis-server, never the shared one): requests keep completing from
the local layer and readiness says degraded; Redis starts again: readiness healthy, Redis used again."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.conftest import free_port, make_settings, request_envelope, running_worker

PROMPT = "Essay A: tea.\n\nEssay B: coffee."


class RedisServer:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir = port, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    async def wait_ready(self) -> None:
        client = Redis(port=self.port)
        try:
            for _ in range(100):
                try:
                    await client.ping()
                    return
                except Exception:  # not up yet
                    await asyncio.sleep(0.05)
            raise AssertionError("redis-server did not start")
        finally:
            await client.aclose()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


async def until_health(runtime, status: str, timeout_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while (await runtime.health())["status"] != status:
        if loop.time() > end:
            raise AssertionError(f"readiness never became {status}")
        await asyncio.sleep(0.05)


async def test_redis_outage_serves_from_the_local_layer_and_recovers(
    prefix, topics_for, kafka_for, redis_server
) -> None:
    await redis_server.wait_ready()
    settings = make_settings(
        prefix,
        redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
        redis_timeout_s=0.5,
        cache_redis_retry_s=0.2,
    )
    await topics_for(settings)
    kafka = await kafka_for(settings)
    results = kafka.topics.comparison_result
    async with running_worker(settings) as runtime:
        assert (await runtime.health())["status"] == "healthy"
        await kafka.send(request_envelope(user_prompt=PROMPT))
        await kafka.wait_for(results, 1)

        redis_server.stop()
        cached, new = request_envelope(user_prompt=PROMPT), request_envelope(1)
        await kafka.send(cached)  # answered from the local layer
        await kafka.send(new)  # the provider answers, Redis is skipped
        await kafka.wait_for(results, 3)
        assert (await runtime.health())["status"] == "degraded"

        redis_server.start()
        await redis_server.wait_ready()
        await until_health(runtime, "healthy")
        await kafka.send(request_envelope(2))
        await kafka.wait_for(results, 4)
        calls = runtime.providers["mock"].calls
    data = {r["data"]["request_id"]: r["data"] for r in kafka.of(results)}
    assert len(data) == 4
    assert all(d["winner"] for d in data.values())
    assert data[cached.data.request_id]["request_metadata"]["cache_layer"] == "local"
    assert data[new.data.request_id]["request_metadata"]["cache"] == "miss"
    assert calls == 3
    client = Redis(port=redis_server.port)
    try:  # the restarted (empty) Redis holds the answer written after recovery
        assert len(await client.keys(f"{prefix}:cache:*")) == 1
    finally:
        await client.aclose()


async def test_a_replica_empties_its_local_layer_when_it_subscribes_again_after_an_outage(
    prefix, redis_server
) -> None:
    """Refreshes announced while its subscription was down are unknown to it: its local entries may be
    stale, so they go once Redis is back (and stay while Redis is down: the only layer then)."""
    from contracts import TokenUsage
    from worker.cache import AnswerCache, CachedAnswer, RedisGuard
    from worker.providers.base import Answer
    from worker.settings import CacheSettings

    await redis_server.wait_ready()
    client = Redis(port=redis_server.port, socket_timeout=0.5)
    cache = AnswerCache(client, CacheSettings(cache_redis_retry_s=0.2), prefix, RedisGuard(0.2))
    answer = CachedAnswer(Answer("Essay A", "clearer", 3.0, "mock-1", TokenUsage(total_tokens=5)), 0.0)
    cache.start()
    try:
        await asyncio.sleep(0.3)  # subscribed
        cache.local.put("k", answer, 10)
        redis_server.stop()
        await asyncio.sleep(0.6)  # the subscription is lost; tries to subscribe again fail
        assert cache.local.get("k") == answer
        redis_server.start()
        await redis_server.wait_ready()
        for _ in range(100):
            if cache.local.get("k") is None:
                break
            await asyncio.sleep(0.05)
        assert cache.local.get("k") is None
    finally:
        await cache.aclose()
        await client.aclose()
