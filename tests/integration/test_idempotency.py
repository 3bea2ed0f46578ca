"""Idempotent redelivery on the real broker and Redis."""

from __future__ import annotations

import asyncio
import json
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis

from tests.conftest import (
    BOOTSTRAP,
    REDIS_URL,
    committed_offsets,
    free_port,
    make_settings,
    request_envelope,
    running_worker,
)
from worker import metrics
from worker.emit import Outgoing
from worker.outcomes import OutcomeStore
from worker.settings import Settings


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


async def test_a_redelivered_invalid_request_sends_the_same_result_again_and_no_second_failure(
    prefix, topics_for, kafka_for
) -> None:
    # Stored under the record (not its request id), as a valid request's outcome is under its request id:
    # read again after a crash before its commit, it is answered with the same event (same event id), and
    # the failure event, already out, is not sent twice.
    settings = make_settings(prefix, partitions=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    invalid = request_envelope().model_dump(mode="json")
    invalid["data"]["user_prompt"] = ""  # under min_length
    topic = settings.kafka.topics.comparison_request
    async with running_worker(settings) as runtime:
        await kafka.send_raw(json.dumps(invalid).encode(), key=invalid["data"]["request_id"])
        [first] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 1}
    # The worker is gone; its group reads the record again, as after a crash before the commit.
    await _commit(settings, TopicPartition(topic, 0), 0)
    async with running_worker(settings) as runtime:
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 1}
    await kafka.caught_up()
    assert first["data"]["error_detail"]["error_code"] == "VALIDATION_ERROR"
    assert results[1] == first
    assert len(kafka.of(kafka.topics.failure)) == 1
    # A corrected request under the same request id is validated afresh, not answered from the store.
    invalid["data"]["user_prompt"] = "Essay A or Essay B?"
    invalid["event_id"] = str(uuid.uuid4())
    async with running_worker(settings):
        await kafka.send_raw(json.dumps(invalid).encode(), key=invalid["data"]["request_id"])
        results = await kafka.wait_for(kafka.topics.comparison_result, 3)
    assert results[2]["data"]["winner"] in ("Essay A", "Essay B")


async def _commit(settings: Settings, tp: TopicPartition, offset: int) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=BOOTSTRAP, group_id=settings.kafka.consumer_group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


async def test_outcome_store_without_redis_degrades_to_at_least_once() -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    store = OutcomeStore(redis, "nowhere", ttl_s=60)
    ops = ("get", "put", "mark_emitted")
    metrics.flush()
    before = {op: metrics.IDEMPOTENCY_DEGRADED.labels(op)._value.get() for op in ops}
    try:
        assert await store.get("r1") is None
        await store.put_soon("r1", [Outgoing("result", "t", "r1", b"{}", "c")])
        # The future a publish waits on resolves (the events still go out), it does not fail.
        await asyncio.wait_for(store.put_soon("r2", [Outgoing("result", "t", "r2", b"{}", "c")]), 5)
        await store.mark_emitted("r1")
        store.mark_emitted_soon("r2")
        await store.aclose()
    finally:
        await redis.aclose()
    metrics.flush()
    after = {op: metrics.IDEMPOTENCY_DEGRADED.labels(op)._value.get() for op in ops}
    assert after == {
        "get": before["get"] + 1,
        "put": before["put"] + 2,
        "mark_emitted": before["mark_emitted"] + 2,
    }


async def test_an_unreadable_stored_record_fails_only_its_own_lookup() -> None:
    """Of lookups asked in one loop turn (they go out together), a record that cannot be decoded fails its
    own request (the consumer retries it, then dead-letters it); the others get their answers."""
    redis = Redis.from_url(REDIS_URL)
    prefix = f"unreadable-{uuid.uuid4()}"
    store = OutcomeStore(redis, prefix, ttl_s=60)
    try:
        await store.put_soon("good", [Outgoing("result", "t", "good", b'{"x":1}', "c")])
        await redis.set(f"{prefix}:outcome:bad", b'["not", "the format"')
        good, bad, missing = store.get("good"), store.get("bad"), store.get("missing")
        done = await asyncio.gather(good, bad, missing, return_exceptions=True)
        assert isinstance(done[1], ValueError)
        assert done[0] is not None and not isinstance(done[0], BaseException)
        assert [m.value for m in done[0].messages] == [b'{"x":1}'] and done[2] is None
    finally:
        await store.aclose()
        await redis.aclose()


async def test_the_puts_of_one_loop_turn_share_one_future_done_when_all_are_stored() -> None:
    redis = Redis.from_url(REDIS_URL)
    prefix = f"turn-{uuid.uuid4()}"
    store = OutcomeStore(redis, prefix, ttl_s=60)
    try:
        first = store.put_soon("a", [Outgoing("result", "t", "a", b"1", "c")])
        second = store.put_soon("b", [Outgoing("result", "t", "b", b"2", "c")])
        assert first is second and not first.done()
        await asyncio.wait_for(first, 5)
        assert await redis.exists(f"{prefix}:outcome:a", f"{prefix}:outcome:b") == 2
        later = store.put_soon("c", [Outgoing("result", "t", "c", b"3", "c")])
        assert later is not first
        await asyncio.wait_for(later, 5)
        stored = await store.get("c")
        assert stored is not None and [m.value for m in stored.messages] == [b"3"]
        cancelled = store.put_soon("d", [Outgoing("result", "t", "d", b"4", "c")])
        cancelled.cancel()  # against the rule; the puts after it in the turn must not inherit that
        fresh = store.put_soon("e", [Outgoing("result", "t", "e", b"5", "c")])
        assert fresh is not cancelled
        await asyncio.wait_for(fresh, 5)
        assert await redis.exists(f"{prefix}:outcome:d", f"{prefix}:outcome:e") == 2
    finally:
        await store.aclose()
        await redis.aclose()


async def test_a_stored_outcome_is_kept_when_a_later_run_stores_another() -> None:
    """A lookup Redis could not answer lets a request run again; its outcome must not replace the first
    one stored (which may be out already): redeliveries keep replaying the first. Emitted markers written
    in the same script call are set as before."""
    redis = Redis.from_url(REDIS_URL)
    prefix = f"first-{uuid.uuid4()}"
    store = OutcomeStore(redis, prefix, ttl_s=60)
    try:
        await store.put_soon("a", [Outgoing("result", "t", "a", b"first", "c")])
        store.mark_emitted_soon("b")  # in one call with the second put of "a" and a first put of "c"
        second = store.put_soon("a", [Outgoing("result", "t", "a", b"second", "c")])
        third = store.put_soon("c", [Outgoing("result", "t", "c", b"only", "c")])
        await asyncio.wait_for(second, 5)
        assert third is second
        kept, other = await asyncio.gather(store.get("a"), store.get("c"))
        assert kept is not None and [m.value for m in kept.messages] == [b"first"]
        assert other is not None and [m.value for m in other.messages] == [b"only"]
        assert await redis.get(f"{prefix}:emitted:b") == b"1"
        assert 0 < await redis.ttl(f"{prefix}:outcome:c") <= 60
    finally:
        await store.aclose()
        await redis.aclose()


async def test_aclose_waits_for_an_outcome_nobody_awaits() -> None:
    # As a request cancelled between its call and its events leaves it: stored at shutdown all the same
    # (here before the store's connection was even open: closing used to cancel the connect and the write).
    redis = Redis.from_url(REDIS_URL)
    prefix = f"unawaited-{uuid.uuid4()}"
    store = OutcomeStore(redis, prefix, ttl_s=60)
    try:
        store.put_soon("r1", [Outgoing("result", "t", "r1", b'{"x":1}', "c")])
        await store.aclose()
        assert await redis.exists(f"{prefix}:outcome:r1") == 1
    finally:
        await redis.aclose()
