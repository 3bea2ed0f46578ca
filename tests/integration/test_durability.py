"""Issue 3 on the real broker: watermark commits, crash safety, rebalance, drain, deadlines, poison
messages, backpressure. Assertions are on events and committed offsets, not on timing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import signal
from collections import Counter, defaultdict
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaConnectionError, UnknownTopicOrPartitionError
from redis.asyncio import Redis

from contracts import utc_now
from tests.conftest import (
    BOOTSTRAP,
    REDIS_URL,
    WorkerProcess,
    committed_offsets,
    free_port,
    make_settings,
    request_envelope,
    running_worker,
    worker_env,
)
from worker import metrics
from worker.consume import ConsumeLoop, Handle, Poison
from worker.settings import Settings


async def _until(predicate: Any, timeout_s: float = 30, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _run_loop(
    settings: Settings, handle: Handle, poison: Poison
) -> tuple[ConsumeLoop, asyncio.Task[None]]:
    """A ConsumeLoop of its own (no worker around it) on the request topic, running."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=BOOTSTRAP,
        group_id=settings.kafka.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    loop = ConsumeLoop(consumer, settings.kafka.topics.comparison_request, handle, poison, settings.flow)
    return loop, asyncio.create_task(loop.run())


def _offset_0_held(release: asyncio.Event, started: list[int], finished: list[int]) -> tuple[Handle, Poison]:
    """A handler that holds offset 0 until `release` while the others finish at once (noting each
    offset's start and finish), and a poison handler that fails the test."""

    async def handle(record: ConsumerRecord) -> None:
        started.append(record.offset)
        if record.offset == 0:
            await release.wait()
        finished.append(record.offset)

    async def poison(record: ConsumerRecord, error: BaseException) -> None:
        raise AssertionError("no poison expected")

    return handle, poison


def _patch_submit(runtime: Any, change: Any) -> None:
    """Route the worker's publishes (Emitter.submit, which publish() awaits too: both paths) through
    `change(messages)`, which returns what to send, and the error the publish then fails with (None: it
    does not): before anything is sent when nothing is to be sent, else once the rest is acknowledged."""
    real_submit = runtime.emitter.submit

    def submit(messages: list[Any], after: Any = None) -> asyncio.Future[None]:
        sending, error = change(messages)
        if error is None:
            return real_submit(sending, after)
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not sending:
            failed.set_exception(error)
            return failed

        def then_fail(sent: asyncio.Future[None]) -> None:
            if sent.cancelled():
                failed.cancel()
            else:
                failed.set_exception(sent.exception() or error)

        real_submit(sending, after).add_done_callback(then_fail)
        return failed

    runtime.emitter.submit = submit


def _refuse_topic(runtime: Any, topic: str) -> None:
    """Make the worker's producer refuse every event for `topic`, as for a topic that does not exist where
    the broker creates none."""

    def change(messages: list[Any]) -> tuple[list[Any], Exception | None]:
        if any(m.topic == topic for m in messages):
            return [], UnknownTopicOrPartitionError()
        return messages, None

    _patch_submit(runtime, change)


def _fail_calls(runtime: Any, request_id: str, calls: Counter[str] | None = None) -> None:
    """The running worker fails (a bug) on every attempt to answer request `request_id`, on either path:
    its provider call raises RuntimeError("handler bug") (counted in `calls`)."""
    from worker.logs import request_id_var

    real_run = runtime.orchestrator.run

    async def run(*args: Any, **kwargs: Any) -> Any:
        if request_id_var.get() == request_id:
            if calls is not None:
                calls[request_id] += 1
            raise RuntimeError("handler bug")
        return await real_run(*args, **kwargs)

    runtime.orchestrator.run = run


async def test_commit_stays_at_lowest_unfinished_offset_until_it_finishes(prefix, topics_for, kafka_for):
    settings = make_settings(prefix, partitions=1, max_in_flight=200)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    for i in range(100):
        await kafka.send_raw(b"payload %d" % i)
    release = asyncio.Event()
    finished: list[int] = []
    loop, task = await _run_loop(settings, *_offset_0_held(release, [], finished))
    try:
        await _until(lambda: len(finished) == 99, what="offsets 1..99 to finish")
        await loop.commit()
        assert await committed_offsets(settings, 1) == {0: 0}
        release.set()
        await _until(lambda: len(finished) == 100, what="offset 0 to finish")
        await loop.commit()
        assert await committed_offsets(settings, 1) == {0: 100}
    finally:
        loop.stop()
        await task


async def test_a_partition_stuck_behind_one_request_stops_being_fetched_past_the_cap_then_resumes(
    prefix, topics_for, kafka_for
):
    # Offset 0 does not finish while those after it do: without a cap every later record would be taken
    # and kept (memory, and what a restart redoes, growing for as long as it lasts).
    settings = make_settings(prefix, partitions=1, max_in_flight=200, max_uncommitted_per_partition=20)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    for i in range(100):
        await kafka.send_raw(b"payload %d" % i)
    release = asyncio.Event()
    started: list[int] = []
    finished: list[int] = []
    loop, task = await _run_loop(settings, *_offset_0_held(release, started, finished))
    try:
        await _until(lambda: len(finished) >= 19, what="the records up to the cap to finish")
        await asyncio.sleep(1.0)  # uncapped, the other 80 would be taken and finished by now
        assert 20 <= len(started) < 40 and len(finished) == len(started) - 1
        assert metrics.HELD_PARTITIONS._value.get() == 1
        release.set()
        await _until(lambda: len(finished) == 100, what="all records once offset 0 finished")
        await loop.commit()
        assert await committed_offsets(settings, 1) == {0: 100}
        assert metrics.HELD_PARTITIONS._value.get() == 0
        assert sorted(started) == list(range(100))
    finally:
        loop.stop()
        await task


async def test_kill_9_with_500_in_flight_loses_nothing_and_duplicates_only_uncommitted(
    prefix, topics_for, kafka_for, tmp_path
):
    partitions = 3
    settings = make_settings(
        prefix,
        partitions=partitions,
        max_in_flight=1000,
        mock_latency_ms=1500,
        mock_jitter_ms=1400,
        commit_interval_ms=100,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=500,
    )
    await topics_for(settings)
    kafka = await kafka_for(settings)
    env = worker_env(settings)
    first = WorkerProcess(env, tmp_path / "first.log")
    try:
        await first.wait_assigned()
        envelopes = [request_envelope(i) for i in range(500)]
        metas = await asyncio.gather(*(kafka.send(e) for e in envelopes))
        where = {e.data.request_id: (m.partition, m.offset) for e, m in zip(envelopes, metas, strict=True)}
        results_topic = kafka.topics.comparison_result
        await kafka.wait_for(results_topic, 50)
        first.kill()
    finally:
        first.kill()
    committed = await committed_offsets(settings, partitions)
    answered_before_restart = {e["data"]["request_id"] for e in kafka.of(results_topic)}
    assert len(answered_before_restart) < 500, "the kill came too late to test anything"

    second = WorkerProcess(env, tmp_path / "second.log")
    try:
        await _until(
            lambda: len({e["data"]["request_id"] for e in kafka.of(results_topic)}) == 500,
            timeout_s=60,
            what="a result for every request",
        )
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait_exit() == 0
    finally:
        second.kill()

    per_request = Counter(e["data"]["request_id"] for e in kafka.of(results_topic))
    assert set(per_request) == set(where)
    for request_id, count in per_request.items():
        if count > 1:
            partition, offset = where[request_id]
            assert committed[partition] is None or offset >= committed[partition], (
                f"{request_id} at {partition}:{offset} was committed ({committed[partition]}) yet redone"
            )
    cost_ids: dict[str, set[str]] = defaultdict(set)
    for e in kafka.of(kafka.topics.cost_tracking):
        cost_ids[e["data"]["request_id"]].add(e["event_id"])
    assert set(cost_ids) == set(where)
    assert all(len(ids) == 1 for ids in cost_ids.values()), "a call's cost was tracked twice"


async def test_two_workers_share_partitions_and_nothing_is_lost_when_one_leaves(
    prefix, topics_for, kafka_for
):
    settings = make_settings(prefix, partitions=6, max_in_flight=20, mock_latency_ms=100)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as first:
        second_cm = running_worker(settings)
        second = await second_cm.__aenter__()
        try:
            await _until(
                lambda: (
                    len(first.loop.trackers) + len(second.loop.trackers) == 6
                    and first.loop.trackers
                    and second.loop.trackers
                ),
                what="both workers to own partitions",
            )
            envelopes = [request_envelope(i) for i in range(300)]
            await asyncio.gather(*(kafka.send(e) for e in envelopes))
            await kafka.wait_for(kafka.topics.comparison_result, 60)
        finally:
            await second_cm.__aexit__(None, None, None)
        second_calls = second.providers["mock"].calls
        await _until(
            lambda: len({e["data"]["request_id"] for e in kafka.of(kafka.topics.comparison_result)}) == 300,
            what="all 300 results",
        )
        first_calls = first.providers["mock"].calls
    assert first_calls > 0 and second_calls > 0, (first_calls, second_calls)
    answered = {e["data"]["request_id"] for e in kafka.of(kafka.topics.comparison_result)}
    assert answered == {e.data.request_id for e in envelopes}


async def test_a_member_giving_its_calls_their_grace_on_revocation_stays_in_the_group(
    prefix, topics_for, kafka_for
):
    """Calls longer than the session timeout are in flight when a second member joins. The first gives
    them their grace, commits and rejoins within its rebalance timeout; with the session timeout as the
    rebalance timeout it was dropped from the group meanwhile, its commit refused, and the second redid
    every request (a second result for each)."""
    partitions, n = 4, 20
    settings = make_settings(
        prefix,
        partitions=partitions,
        mock_latency_ms=8000,
        rebalance_grace_seconds=12,
        kafka_session_timeout_ms=6000,  # the broker's minimum
        kafka_heartbeat_interval_ms=500,
    )
    await topics_for(settings)
    kafka = await kafka_for(settings)
    envelopes = [request_envelope(i) for i in range(n)]
    async with running_worker(settings) as first:
        await _until(lambda: len(first.loop.trackers) == partitions, what="one worker owning every partition")
        metas = await asyncio.gather(*(kafka.send(e) for e in envelopes))
        await _until(lambda: first.loop.in_flight == n, what=f"{n} requests in flight")
        async with running_worker(settings):
            await kafka.wait_for(kafka.topics.comparison_result, n, timeout_s=60)
            ends: dict[int, int] = defaultdict(int)
            for m in metas:
                ends[m.partition] = max(ends[m.partition], m.offset + 1)
            loop = asyncio.get_running_loop()
            end = loop.time() + 60
            while await committed_offsets(settings, partitions) != {
                p: ends.get(p) for p in range(partitions)
            }:
                assert loop.time() < end, "offsets never committed"
                await asyncio.sleep(0.2)
            await kafka.caught_up()  # every result published before that commit is read by now
    counts = Counter(e["data"]["request_id"] for e in kafka.of(kafka.topics.comparison_result))
    assert set(counts) == {e.data.request_id for e in envelopes}
    assert set(counts.values()) == {1}, counts


async def test_sigterm_drains_in_flight_work_commits_and_exits_0(prefix, topics_for, kafka_for, tmp_path):
    partitions = 2
    port = free_port()
    settings = make_settings(prefix, partitions=partitions, mock_latency_ms=1500, metrics_port=port)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log")
    try:
        await worker.wait_assigned()
        metas = await asyncio.gather(*(kafka.send(request_envelope(i)) for i in range(50)))
        await _until_in_flight(port, 50)
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0
    finally:
        worker.kill()
    results = await kafka.wait_for(kafka.topics.comparison_result, 50, timeout_s=10)
    assert len({e["data"]["request_id"] for e in results}) == 50
    ends: dict[int, int] = defaultdict(int)
    for m in metas:
        ends[m.partition] = max(ends[m.partition], m.offset + 1)
    assert await committed_offsets(settings, partitions) == dict(ends)


async def _until_in_flight(port: int, count: int) -> None:
    import urllib.request

    def read() -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        line = next(ln for ln in body.splitlines() if ln.startswith("llm_worker_in_flight "))
        return float(line.split()[1])

    loop = asyncio.get_running_loop()
    end = loop.time() + 20
    while (await asyncio.to_thread(read)) < count:
        if loop.time() > end:
            raise AssertionError(f"never reached {count} in flight")
        await asyncio.sleep(0.05)


async def test_deadline_in_the_past_expires_without_a_provider_call(prefix, topics_for, kafka_for):
    settings = make_settings(prefix, partitions=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    env = request_envelope(deadline=utc_now() - timedelta(seconds=1))
    async with running_worker(settings) as runtime:
        await kafka.send(env)
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        calls = runtime.providers["mock"].calls
    detail = result["data"]["error_detail"]
    assert detail["error_code"] == "TIMEOUT"
    assert detail["details"]["reason"] == "deadline_expired"
    assert detail["details"]["retryable"] is False
    assert calls == 0
    assert kafka.of(kafka.topics.cost_tracking) == []


async def test_deadline_passing_during_the_call_expires_the_request(prefix, topics_for, kafka_for):
    settings = make_settings(prefix, partitions=1, mock_latency_ms=3000)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    env = request_envelope(deadline=utc_now() + timedelta(milliseconds=500))
    async with running_worker(settings):
        await kafka.send(env)
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
    assert result["data"]["error_detail"]["details"]["reason"] == "deadline_expired"


async def test_poison_message_is_dead_lettered_after_attempts_and_its_offset_finishes(
    prefix, topics_for, kafka_for
):
    settings = make_settings(prefix, partitions=1, poison_max_attempts=2)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    poison = request_envelope(1, request_id="poison-1")  # not the other's prompt: its answer would be cached
    attempts = Counter[str]()
    async with running_worker(settings) as runtime:
        _fail_calls(runtime, "poison-1", attempts)  # the first attempt on the staged path, then its own
        await kafka.send(poison)
        await kafka.send(request_envelope())
        [dlq] = await kafka.wait_for(kafka.topics.dlq, 1)
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 2}
    assert attempts["poison-1"] == 2
    assert dlq["error"] == "processing failed: RuntimeError: handler bug"
    assert dlq["source"]["offset"] == 0
    failed = next(r["data"] for r in results if r["data"]["request_id"] == "poison-1")
    assert failed["error_detail"]["error_code"] == "PROCESSING_ERROR"


async def test_backpressure_bounds_concurrency_at_max_in_flight(prefix, topics_for, kafka_for):
    settings = make_settings(prefix, partitions=2, max_in_flight=5, mock_latency_ms=30)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        mock = runtime.providers["mock"]
        real_compare = mock.compare
        active, peak = 0, 0

        async def counting_compare(call: Any) -> Any:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            try:
                return await real_compare(call)
            finally:
                active -= 1

        mock.compare = counting_compare
        await asyncio.gather(*(kafka.send(request_envelope(i)) for i in range(60)))
        await kafka.wait_for(kafka.topics.comparison_result, 60)
    assert peak == 5


async def test_a_failing_dlq_publish_is_retried_until_it_lands_and_the_offset_then_finishes(
    prefix, topics_for, kafka_for
):
    settings = make_settings(prefix, partitions=1, poison_max_attempts=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    await kafka.send_raw(b"poison")
    await kafka.send_raw(b"fine")
    dlq_tries: list[bytes] = []

    async def handle(record: ConsumerRecord) -> None:
        if record.value == b"poison":
            raise RuntimeError("handler bug")

    async def poison(record: ConsumerRecord, error: BaseException) -> None:
        dlq_tries.append(record.value)
        if len(dlq_tries) < 3:
            raise KafkaConnectionError("broker unreachable")  # as a publish during an outage fails

    loop, task = await _run_loop(settings, handle, poison)
    try:
        await _until(lambda: len(dlq_tries) == 3 and loop.in_flight == 0, what="the third DLQ try to land")
        await loop.commit()
        assert await committed_offsets(settings, 1) == {0: 2}
        assert dlq_tries == [b"poison"] * 3
    finally:
        loop.stop()
        await task


async def test_a_poison_message_too_large_to_dead_letter_whole_still_reaches_the_dlq_and_finishes(
    prefix, topics_for, kafka_for
):
    # 900 kB of garbage fits the broker's 1 MB limit; base64 in a DLQ record would not (1.2 MB).
    settings = make_settings(prefix, partitions=1, poison_max_attempts=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    raw = b"\x00" + bytes(range(256)) * 3515
    async with running_worker(settings) as runtime:
        await kafka.send_raw(raw)
        env = request_envelope()
        await kafka.send(env)
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        [dlq] = await kafka.wait_for(kafka.topics.dlq, 1)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 2}
    assert result["data"]["request_id"] == env.data.request_id
    assert dlq["error"] == "not JSON"
    assert dlq["raw_bytes"] == len(raw) and dlq["raw_truncated"] is True
    assert dlq["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    kept = base64.b64decode(dlq["raw_base64"])
    assert 0 < len(kept) < len(raw) and raw.startswith(kept)


async def test_a_callback_topic_that_cannot_be_written_does_not_hold_the_partition(
    prefix, topics_for, kafka_for
):
    # As when the callback topic does not exist and the broker does not create topics: the producer
    # refuses every record for it. The poison path then answers on the default result topic.
    settings = make_settings(prefix, partitions=1, poison_max_attempts=2)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        _refuse_topic(runtime, "missing-callback")
        await kafka.send(request_envelope(request_id="cb-1", callback_topic="missing-callback"))
        env = request_envelope()
        await kafka.send(env)
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
        [dlq] = await kafka.wait_for(kafka.topics.dlq, 1)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 2}
    by_id = {r["data"]["request_id"]: r["data"] for r in results}
    assert by_id[env.data.request_id]["winner"] in ("Essay A", "Essay B")
    # Its answer was recorded before the publish failed: that result is what goes to the default topic.
    assert by_id["cb-1"]["winner"] in ("Essay A", "Essay B") and by_id["cb-1"]["error_detail"] is None
    assert dlq["error"].startswith("processing failed: UnknownTopicOrPartitionError")
    assert dlq["source"]["offset"] == 0


async def test_a_consume_loop_that_dies_stops_the_worker_instead_of_leaving_it_idle(
    prefix, topics_for, kafka_for
):
    settings = make_settings(prefix, partitions=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        stopped = asyncio.Event()
        runtime.on_fatal = stopped.set
        await kafka.send(request_envelope(request_id="before"))
        await kafka.wait_for(kafka.topics.comparison_result, 1)
        real_getmany = runtime.loop.consumer.getmany

        async def broken_getmany(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("fetch broke")

        runtime.loop.consumer.getmany = broken_getmany
        await asyncio.wait_for(stopped.wait(), 10)
        assert isinstance(runtime.failure, RuntimeError) and str(runtime.failure) == "fetch broke"
        runtime.loop.consumer.getmany = real_getmany
    # The loop committed what it had finished before it went.
    assert await committed_offsets(settings, 1) == {0: 1}


async def test_periodic_commits_go_on_after_an_unexpected_commit_error(prefix, topics_for, kafka_for):
    settings = make_settings(prefix, partitions=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    for i in range(3):
        await kafka.send_raw(b"payload %d" % i)

    async def handle(record: ConsumerRecord) -> None:
        return None

    async def poison(record: ConsumerRecord, error: BaseException) -> None:
        return None

    loop, task = await _run_loop(settings, handle, poison)
    real_commit, calls, committed = loop.consumer.commit, 0, []

    async def commit_failing_once(offsets: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("not a KafkaError")
        await real_commit(offsets)
        committed.append(max(offsets.values()))

    loop.consumer.commit = commit_failing_once  # type: ignore[method-assign]
    try:
        # No explicit commit(): only the periodic committer, which must survive its first failure.
        await _until(lambda: committed[-1:] == [3], what="the periodic commit of offset 3")
        assert await committed_offsets(settings, 1) == {0: 3}
    finally:
        loop.stop()
        await task


async def test_poison_shapes_that_used_to_escape_the_poison_path_reach_the_dlq_and_finish(
    prefix, topics_for, kafka_for
):
    # JSON nested too deep for json.loads, and a correlation_id header with a null value: both used to
    # raise outside the handler's error mapping on every attempt and hold the partition for good.
    settings = make_settings(prefix, partitions=1, poison_max_attempts=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        await kafka.send_raw(b"[" * 5000)
        await kafka._producer.send_and_wait(
            kafka.topics.comparison_request, b"\x00garbage", headers=[("correlation_id", None)]
        )
        env = request_envelope()
        await kafka.send(env)
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        dlq = await kafka.wait_for(kafka.topics.dlq, 2)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 3}
    assert result["data"]["request_id"] == env.data.request_id
    assert sorted(d["source"]["offset"] for d in dlq) == [0, 1]
    assert {d["error"] for d in dlq} == {"not JSON"}


async def test_an_invalid_request_whose_callback_topic_cannot_be_written_is_answered_on_the_default_topic(
    prefix, topics_for, kafka_for
):
    settings = make_settings(prefix, partitions=1, poison_max_attempts=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    bad = json.loads(
        request_envelope(request_id="inv-1", callback_topic="missing-callback").model_dump_json()
    )
    bad["data"]["cache"] = "sometimes"
    async with running_worker(settings) as runtime:
        _refuse_topic(runtime, "missing-callback")
        await kafka.send_raw(json.dumps(bad).encode(), key="inv-1")
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        [dlq] = await kafka.wait_for(kafka.topics.dlq, 1)
    assert result["data"]["request_id"] == "inv-1"
    assert result["data"]["error_detail"]["error_code"] == "VALIDATION_ERROR"
    assert dlq["source"]["offset"] == 0


async def test_an_invalid_request_answered_by_the_poison_path_is_answered_with_the_same_event_later(
    prefix, topics_for, kafka_for
):
    # Its events are stored before the publish that fails (callback topic refused); the poison path sends
    # those stored events (the result redirected to the default topic), and a redelivery to a worker that
    # can write the callback topic sends that same result there: one event id, not two results.
    settings = make_settings(prefix, partitions=1, poison_max_attempts=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    elsewhere = make_settings(f"{prefix}-cb")
    await topics_for(elsewhere)
    other = await kafka_for(elsewhere)
    callback = other.topics.comparison_result
    bad = json.loads(request_envelope(request_id="inv-2", callback_topic=callback).model_dump_json())
    bad["data"]["cache"] = "sometimes"
    async with running_worker(settings) as runtime:
        _refuse_topic(runtime, callback)
        await kafka.send_raw(json.dumps(bad).encode(), key="inv-2")
        [redirected] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 1}
        await kafka.caught_up()
        assert kafka.of(kafka.topics.failure) == []  # refused with the result in one publish
    again = make_settings(prefix, partitions=1, consumer_group=f"{prefix}-again")  # reads it again
    async with running_worker(again):
        [replayed] = await other.wait_for(callback, 1)
        # Not marked emitted (only the result went out): the failure event goes out with the replay.
        [failure] = await kafka.wait_for(kafka.topics.failure, 1)
    assert redirected["data"]["error_detail"]["error_code"] == "VALIDATION_ERROR"
    assert replayed["event_id"] == redirected["event_id"]
    assert failure["data"]["request_id"] == "inv-2"


async def test_after_a_delivered_result_the_poison_path_resends_that_result_not_a_contradicting_one(
    prefix, topics_for, kafka_for
):
    # The result is acknowledged but the cost event keeps failing (its topic unavailable): the request
    # ends in the poison path, which must not answer INTERNAL_ERROR after a success went out.
    settings = make_settings(prefix, partitions=1, poison_max_attempts=2)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:

        def change(messages: list[Any]) -> tuple[list[Any], Exception | None]:
            error = KafkaConnectionError("cost topic unavailable")
            return [m for m in messages if m.kind != "cost"], error if any(
                m.kind == "cost" for m in messages
            ) else None

        _patch_submit(runtime, change)
        env = request_envelope(request_id="ok-then-poison")
        await kafka.send(env)
        [dlq] = await kafka.wait_for(kafka.topics.dlq, 1)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 1}
        await asyncio.sleep(0.5)  # time for a second result, if one were coming
        await kafka.caught_up()
    results = [
        r for r in kafka.of(kafka.topics.comparison_result) if r["data"]["request_id"] == env.data.request_id
    ]
    assert {r["data"]["winner"] for r in results} <= {"Essay A", "Essay B"} and results
    assert len({r["event_id"] for r in results}) == 1  # the same event each time: consumers drop copies
    assert dlq["error"].startswith("processing failed: KafkaConnectionError")


def _refuse_result_publishes(runtime: Any, key: str, times: int, *, after_sending: bool) -> list[int]:
    """The next `times` publishes holding the result keyed `key` fail: before anything is sent, or after
    all of it was (an acknowledgement lost). The list counts the refusals."""
    refused = [0]

    def change(messages: list[Any]) -> tuple[list[Any], Exception | None]:
        if not any(m.kind == "result" and m.key == key for m in messages) or refused[0] >= times:
            return messages, None
        refused[0] += 1
        if after_sending:
            return messages, KafkaConnectionError("acknowledgement lost")
        return [], KafkaConnectionError("result topic briefly unavailable")

    _patch_submit(runtime, change)
    return refused


async def test_a_poison_requests_error_result_is_stored_so_retries_and_redelivery_resend_the_same_event(
    prefix, topics_for, kafka_for
):
    # The poison path's first call fails after its result landed (the result goes out, then the publish
    # fails): the retried call sends that same result, not a new one with a new event id. A redelivery
    # to a handler without the bug replays it too, with no provider call and no contradicting success.
    settings = make_settings(prefix, partitions=1, poison_max_attempts=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        _fail_calls(runtime, "poison-3")
        # Both tries of the first call, and the first of the second.
        refusals = _refuse_result_publishes(runtime, "poison-3", 3, after_sending=True)
        await kafka.send(request_envelope(request_id="poison-3"))
        await kafka.wait_for(kafka.topics.comparison_result, 4, timeout_s=60)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 1}
    assert refusals == [3]
    again = make_settings(prefix, partitions=1, consumer_group=f"{prefix}-again")
    async with running_worker(again) as second:
        results = await kafka.wait_for(kafka.topics.comparison_result, 5, timeout_s=30)
        assert second.providers["mock"].calls == 0
    assert len(results) == 5
    assert len({r["event_id"] for r in results}) == 1
    assert {r["data"]["error_detail"]["error_code"] for r in results} == {"PROCESSING_ERROR"}
    assert len(kafka.of(kafka.topics.dlq)) == 1


async def test_a_request_whose_stored_outcome_is_unreadable_is_dead_lettered_and_answered(
    prefix, topics_for, kafka_for
):
    # A record in the outcome store this code cannot decode (another version's format, say): the lookup
    # fails on every attempt, so the request is poison; its DLQ record and an INTERNAL_ERROR result go
    # out, and the offset finishes (the poison path's own lookup used to fail too, retried for ever).
    settings = make_settings(prefix, partitions=1, poison_max_attempts=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    redis = Redis.from_url(REDIS_URL)
    try:
        await redis.set(f"{prefix}:outcome:unreadable-1", b'{"not": "the format"}\nxyz', ex=60)
    finally:
        await redis.aclose()
    async with running_worker(settings) as runtime:
        await kafka.send(request_envelope(request_id="unreadable-1"))
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1, timeout_s=30)
        [dlq] = await kafka.wait_for(kafka.topics.dlq, 1)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 1}
        assert runtime.providers["mock"].calls == 0
    assert result["data"]["error_detail"]["error_code"] == "PROCESSING_ERROR"
    assert dlq["source"]["offset"] == 0 and dlq["error"].startswith("processing failed: ")


async def test_a_poison_message_whose_result_takes_retries_to_land_is_dead_lettered_once(
    prefix, topics_for, kafka_for
):
    settings = make_settings(prefix, partitions=1, poison_max_attempts=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        _fail_calls(runtime, "poison-2")
        refusals = _refuse_result_publishes(runtime, "poison-2", 2, after_sending=False)
        await kafka.send(request_envelope(request_id="poison-2"))
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1, timeout_s=60)
        await runtime.loop.commit()
        assert await committed_offsets(settings, 1) == {0: 1}
        await asyncio.sleep(0.3)  # time for a second result, if one were coming
        await kafka.caught_up()
    assert refusals == [2]
    assert len(kafka.of(kafka.topics.dlq)) == 1  # not once per try of the result
    assert result["data"]["error_detail"]["error_code"] == "PROCESSING_ERROR"
