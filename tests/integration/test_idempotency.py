"""Idempotent redelivery on the real broker and Redis."""

from __future__ import annotations

from redis.asyncio import Redis

from tests.conftest import free_port, make_settings, request_envelope, running_worker
from worker import metrics
from worker.emit import Outgoing
from worker.outcomes import OutcomeStore


async def test_redelivered_request_replays_its_result_without_a_second_call_or_cost(
    prefix, topics_for, kafka_for
) -> None:
    settings = make_settings(prefix, partitions=1, mock_latency_ms=20)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    env = request_envelope()
    async with running_worker(settings) as runtime:
        await kafka.send(env)
        await kafka.wait_for(kafka.topics.comparison_result, 1)
        await kafka.send(env)  # the same request again, as a redelivery would bring it
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
        calls = runtime.providers["mock"].calls
    assert calls == 1
    assert results[0] == results[1]  # the stored event, byte for byte: same event_id and timestamps
    assert len(kafka.of(kafka.topics.cost_tracking)) == 1


async def test_outcome_store_without_redis_degrades_to_at_least_once() -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    store = OutcomeStore(redis, "nowhere", ttl_s=60)
    before = metrics.IDEMPOTENCY_DEGRADED.labels("get")._value.get()
    try:
        assert await store.get("r1") is None
        await store.put("r1", [Outgoing("result", "t", "r1", b"{}", "c")])
        await store.mark_emitted("r1")
    finally:
        await redis.aclose()
    assert metrics.IDEMPOTENCY_DEGRADED.labels("get")._value.get() == before + 1
