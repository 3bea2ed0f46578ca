"""The hand-built envelope is exactly what the EventEnvelope contract parses."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydantic_core
import pytest

from contracts import EventEnvelope, LLMCostAlertV1, TokenUsage
from worker.emit import Outgoing, dumps, make_event
from worker.outcomes import decode_outcome, encode_outcome


def test_make_event_output_parses_as_the_envelope_contract() -> None:
    data = LLMCostAlertV1(
        scope="organization", organization_id='org "x"', window_s=60, spend_usd=2.5, threshold_usd=2.0
    )
    cid = uuid.uuid4()
    out = make_event("cost_alert", "topic", "key", data, cid, 'svc "quoted"')
    env = EventEnvelope[LLMCostAlertV1].model_validate_json(out.value)
    assert env.data == data
    assert env.correlation_id == cid
    assert env.event_type == "LLMCostAlertV1"
    assert env.source_service == 'svc "quoted"'
    assert env.event_timestamp.tzinfo is not None
    assert env.event_id.version == 4
    assert set(json.loads(out.value)) == set(EventEnvelope[LLMCostAlertV1].model_fields)
    assert (out.topic, out.key, out.correlation_id) == ("topic", "key", str(cid))


def test_outcome_record_round_trips_the_event_bytes_exactly() -> None:
    events = [
        Outgoing("result", "t", None, b'{"a": 1, "s": "line\\nbreak \\u00e9"}', "c"),
        Outgoing("cost", "cost-topic", 'k "q"', '{"b":"\u00e9"}'.encode(), "c2"),
    ]
    again = decode_outcome(encode_outcome(events))
    assert [(m.kind, m.topic, m.key, m.value, m.correlation_id) for m in again] == [
        (m.kind, m.topic, m.key, m.value, m.correlation_id) for m in events
    ]


def test_outcome_records_of_the_earlier_json_format_still_decode() -> None:
    earlier = json.dumps([["result", "t", "k", '{"a": 1}', "c"]]).encode()
    [m] = decode_outcome(earlier)
    assert (m.kind, m.topic, m.key, m.value, m.correlation_id) == ("result", "t", "k", b'{"a": 1}', "c")


def test_murmur2_matches_aiokafkas_for_every_length() -> None:
    import random

    from aiokafka.partitioner import murmur2 as reference

    from worker.emit import murmur2

    rnd = random.Random(7)
    for length in range(0, 130):
        for _ in range(10):
            data = rnd.randbytes(length)
            assert murmur2(data) == reference(data)


def test_keyed_events_go_to_the_default_partitioners_choice_keyless_ones_stick_to_one() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from worker.emit import Emitter, _Waiter

    class Cluster:
        def partitions_for_topic(self, topic: str) -> set[int] | None:
            return set(range(12)) if topic != "unknown" else None

    producer = type("P", (), {"client": type("C", (), {"cluster": Cluster()})()})()
    waiter = _Waiter(None, 0)  # type: ignore[arg-type]
    keys = [f"b-{i}-\u00e9" for i in range(200)]
    pending = [(Outgoing("result", "t", k, b"v", "c"), waiter) for k in keys]
    pending += [(Outgoing("cost", "cost", None, b"v", "c"), waiter) for _ in range(50)]
    pending += [(Outgoing("result", "unknown", "k", b"v", "c"), waiter)]
    groups = Emitter(producer)._group(pending)  # type: ignore[arg-type]

    parts = list(range(12))
    for (topic, partition), items in groups.items():
        if topic == "t":
            for m, key, _ in items:
                assert key == m.key.encode() and partition == DefaultPartitioner()(key, parts, parts)
    assert sum(len(items) for (topic, _), items in groups.items() if topic == "t") == 200
    assert len({p for t, p in groups if t == "t"}) == 12  # 200 keys reach every partition
    [keyless] = [p for t, p in groups if t == "cost"]
    assert 0 <= keyless < 12 and len(groups["cost", keyless]) == 50  # one partition, one batch
    assert [key for _, key, _ in groups["unknown", -1]] == [b"k"]  # sent through send(), which waits


def test_event_timestamps_are_written_as_the_envelope_model_writes_them() -> None:
    from datetime import UTC, datetime

    from pydantic import TypeAdapter

    from worker.emit import _Clock

    clock, as_model = _Clock(), TypeAdapter(datetime)
    for t in (0.0, 1.5, 1.9999996, 1_700_000_000.25, 1_700_000_000.000001, 1_800_000_000.999999):
        assert clock.iso_now(t) == as_model.dump_json(datetime.fromtimestamp(t, UTC)).decode().strip('"')
    assert datetime.fromisoformat(clock.iso_now()).tzinfo is not None


def test_event_ids_are_distinct_version_4_uuids_across_refills() -> None:
    from worker.emit import _RandomIds

    ids = _RandomIds()
    made = [ids.uuid4() for _ in range(1000)]  # four refills of the random pool
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_makes_event_ids_of_its_own() -> None:
    from worker import emit

    emit._IDS.uuid4()  # the parent holds ids made but not used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.write(write, emit._IDS.uuid4().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_id = os.read(read, 100).decode()
    os.close(read)
    assert uuid.UUID(child_id).version == 4
    assert child_id != emit._IDS.uuid4()  # without forgetting, both would take the same one


class _Producer:
    """The producer surface the Emitter uses: metadata, batches, send_batch (acknowledged at once)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.client = self
        self.cluster = self

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> Any:
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(512 * 1024, 0)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[None]:
        from aiokafka.record.default_records import DefaultRecordBatch

        self.sent += [record.value for record in DefaultRecordBatch(batch._build())]
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked


class _MissingTopicProducer(_Producer):
    """No metadata ever comes for the topic "missing": each wait for it fails after `wait_s`."""

    def __init__(self, wait_s: float = 0.0) -> None:
        super().__init__()
        self.wait_s = wait_s
        self.waits = 0

    def partitions_for_topic(self, topic: str) -> set[int] | None:  # type: ignore[override]
        return None if topic == "missing" else {0, 1, 2}

    async def partitions_for(self, topic: str) -> set[int]:
        from aiokafka.errors import UnknownTopicOrPartitionError

        self.waits += 1
        await asyncio.sleep(self.wait_s)
        raise UnknownTopicOrPartitionError()


def _events(n: int) -> list[Outgoing]:
    return [Outgoing("result", "t", f"r{i}", f"v{i}".encode(), "c") for i in range(n)]


async def test_publish_after_a_future_sends_only_once_it_is_done() -> None:
    from worker.emit import Emitter

    producer = _Producer()
    emitter, stored = Emitter(producer), asyncio.get_running_loop().create_future()  # type: ignore[arg-type]
    publishing = asyncio.create_task(emitter.publish(_events(2), after=stored))
    await asyncio.sleep(0.01)
    assert producer.sent == [] and not publishing.done()
    stored.set_result(None)
    await asyncio.wait_for(publishing, 1)
    assert sorted(producer.sent) == [b"v0", b"v1"]
    await emitter.aclose()


@pytest.mark.parametrize("how", ["failed", "cancelled", "publisher cancelled"])
async def test_publish_after_a_future_that_fails_or_is_cancelled_sends_nothing(how: str) -> None:
    from worker.emit import Emitter

    producer = _Producer()
    emitter, stored = Emitter(producer), asyncio.get_running_loop().create_future()  # type: ignore[arg-type]
    publishing = asyncio.create_task(emitter.publish(_events(2), after=stored))
    await asyncio.sleep(0)
    if how == "failed":
        stored.set_exception(RuntimeError("store broke"))
        with pytest.raises(RuntimeError, match="store broke"):
            await publishing
    elif how == "cancelled":
        stored.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publishing
    else:
        publishing.cancel()
        await asyncio.sleep(0)
        stored.set_result(None)
        with pytest.raises(asyncio.CancelledError):
            await publishing
    await asyncio.sleep(0.01)
    assert producer.sent == []
    await emitter.aclose()


async def test_publishes_after_one_future_go_out_together_and_a_cancelled_one_stays_out() -> None:
    """What OutcomeStore.put_soon hands every put of a loop turn: one future, many publishes after it."""
    from worker.emit import Emitter

    producer = _Producer()
    emitter, stored = Emitter(producer), asyncio.get_running_loop().create_future()  # type: ignore[arg-type]
    batches = [[Outgoing("result", "t", f"r{i}", f"v{i}".encode(), "c")] for i in range(3)]
    publishing = [asyncio.create_task(emitter.publish(b, after=stored)) for b in batches]
    await asyncio.sleep(0)
    publishing[1].cancel()
    await asyncio.sleep(0.01)
    assert producer.sent == []
    stored.set_result(None)
    await asyncio.wait_for(asyncio.gather(publishing[0], publishing[2]), 1)
    assert sorted(producer.sent) == [b"v0", b"v2"]
    assert publishing[1].cancelled()
    later = asyncio.get_running_loop().create_future()
    failing = [asyncio.create_task(emitter.publish(b, after=later)) for b in batches[:2]]
    await asyncio.sleep(0)
    later.set_exception(RuntimeError("store broke"))
    for task in failing:
        with pytest.raises(RuntimeError, match="store broke"):
            await task
    assert sorted(producer.sent) == [b"v0", b"v2"]
    await emitter.aclose()


async def test_a_record_the_batch_refuses_fails_its_publish_and_the_pump_keeps_serving() -> None:
    from worker.emit import Emitter

    producer = _Producer()
    emitter = Emitter(producer)  # type: ignore[arg-type]
    bad = Outgoing("result", "t", "r-bad", "not bytes", "c")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await asyncio.wait_for(emitter.publish([bad]), 1)
    await asyncio.wait_for(emitter.publish(_events(2)), 1)
    assert sorted(producer.sent) == [b"v0", b"v1"]
    await emitter.aclose()


async def test_a_topic_without_metadata_does_not_hold_up_the_other_topics() -> None:
    from worker.emit import Emitter

    class Producer(_Producer):
        def __init__(self) -> None:
            super().__init__()
            self.metadata = asyncio.Event()
            self.unknown_sent: list[bytes] = []

        def partitions_for_topic(self, topic: str) -> set[int] | None:  # type: ignore[override]
            return None if topic == "new" else {0, 1, 2}

        async def partitions_for(self, topic: str) -> set[int]:
            await self.metadata.wait()  # as aiokafka waits for the topic's metadata
            return {0}

        async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[None]:
            self.unknown_sent.append(value)
            acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            acked.set_result(None)
            return acked

    producer = Producer()
    emitter = Emitter(producer)  # type: ignore[arg-type]
    first = asyncio.create_task(emitter.publish([Outgoing("result", "new", "a", b"n1", "c")]))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(emitter.publish([Outgoing("result", "new", "b", b"n2", "c")]))
    await asyncio.wait_for(emitter.publish(_events(2)), 1)  # not behind the topic still waiting
    assert sorted(producer.sent) == [b"v0", b"v1"] and not first.done()
    producer.metadata.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert producer.unknown_sent == [b"n1", b"n2"]  # rounds for one topic keep their order
    await emitter.aclose()


async def test_rounds_chained_behind_a_metadata_wait_go_batched_once_the_topic_is_known() -> None:
    """Rounds for a topic keep joining its chain while it runs (their order); once the metadata is there
    they are sent in batches, as the pump sends, not message by message."""
    from worker.emit import Emitter

    class Producer(_Producer):
        def __init__(self) -> None:
            super().__init__()
            self.metadata = asyncio.Event()
            self.one_by_one = 0

        def partitions_for_topic(self, topic: str) -> set[int] | None:  # type: ignore[override]
            return {0, 1, 2} if topic != "new" or self.metadata.is_set() else None

        async def partitions_for(self, topic: str) -> set[int]:
            await self.metadata.wait()
            return {0, 1, 2}

        async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[None]:
            self.one_by_one += 1
            raise AssertionError("sent message by message")

    producer = Producer()
    emitter = Emitter(producer)  # type: ignore[arg-type]
    rounds = []
    for i in range(3):
        events = [
            Outgoing("result", "new", f"k{i}", f"n{i}".encode(), "c"),
            Outgoing("cost", "new", None, b"x", "c"),
        ]
        rounds.append(asyncio.create_task(emitter.publish(events)))
        await asyncio.sleep(0.01)
    producer.metadata.set()
    await asyncio.wait_for(asyncio.gather(*rounds), 1)
    assert producer.one_by_one == 0
    assert [v for v in producer.sent if v != b"x"] == [b"n0", b"n1", b"n2"] and producer.sent.count(b"x") == 3
    await emitter.aclose()


async def test_prefetch_asks_for_every_topic_at_once_and_gives_up_after_its_timeout() -> None:
    from worker.emit import Emitter

    class Producer(_Producer):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[str] = []

        async def partitions_for(self, topic: str) -> set[int]:
            self.asked.append(topic)
            if topic == "slow":
                await asyncio.sleep(3600)
            return {0}

    producer = Producer()
    emitter = Emitter(producer)  # type: ignore[arg-type]
    await asyncio.wait_for(emitter.prefetch(["a", "slow", "b"], timeout_s=0.05), 1)
    assert sorted(producer.asked) == ["a", "b", "slow"]
    # In the background: nothing waits for it, and aclose() cancels it.
    producer.asked.clear()
    emitter.prefetch_soon(["slow"], timeout_s=3600)
    await asyncio.sleep(0.01)
    assert producer.asked == ["slow"]
    await asyncio.wait_for(emitter.aclose(), 1)


async def test_publishes_to_a_missing_topic_fail_after_one_metadata_wait_then_at_once() -> None:
    from aiokafka.errors import UnknownTopicOrPartitionError

    from worker.emit import Emitter

    producer = _MissingTopicProducer(wait_s=0.05)  # standing in for the 40 s request timeout
    emitter = Emitter(producer)  # type: ignore[arg-type]
    missing = [Outgoing("result", "missing", f"k{i}", b"x", "c") for i in range(6)]
    outcomes = await asyncio.gather(*(emitter.publish([m]) for m in missing), return_exceptions=True)
    assert all(isinstance(o, UnknownTopicOrPartitionError) for o in outcomes)
    assert producer.waits == 1  # one wait for the round, not one per event
    with pytest.raises(UnknownTopicOrPartitionError):
        await asyncio.wait_for(emitter.publish(missing[:1]), 0.02)  # known missing: fails at once
    assert producer.waits == 1
    await emitter.aclose()


@pytest.mark.parametrize(
    ("raw_kb", "header_kb", "headers_truncated"),
    [(900, 0, False), (600, 450, False), (10, 700, True), (0, 512, True)],
)
def test_a_dlq_record_fits_kafkas_1_mb_limit_whatever_came_in(
    raw_kb: int, header_kb: int, headers_truncated: bool
) -> None:
    import base64
    import hashlib

    from worker.emit import make_dlq_record

    raw = b"r" * (raw_kb * 1024)
    headers = [("correlation_id", b"cid"), ("big", b"h" * (header_kb * 1024))]
    record = make_dlq_record("dlq", raw, "not JSON", headers, {"offset": 1})
    body = json.loads(record.value)
    assert len(record.value) < 1_000_000
    assert body["raw_bytes"] == len(raw) and body["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    assert raw.startswith(base64.b64decode(body["raw_base64"]))
    assert body["raw_truncated"] is (len(base64.b64decode(body["raw_base64"])) < len(raw))
    assert body["headers_truncated"] is headers_truncated
    assert body["headers"][0] == ["correlation_id", base64.b64encode(b"cid").decode()]
    assert record.correlation_id == "cid"


@pytest.mark.parametrize(
    ("headers", "raw_kb"),
    [
        ([("a", None)] * 300_000, 0),  # 900 KB of header framing on the wire: 3.3 MB as JSON before
        ([("\u00e9" * 100_000, b"v")], 500),  # a key whose JSON escapes outgrow its bytes: 1.27 MB before
        ([("correlation_id", b"c" * 2_000_000)], 0),
    ],
    ids=["many empty headers", "a non-ASCII key", "a huge correlation id"],
)
def test_a_dlq_record_fits_whatever_its_headers_hold(headers: list, raw_kb: int) -> None:
    from worker.emit import DLQ_MAX_BYTES, make_dlq_record

    record = make_dlq_record("dlq", b"r" * raw_kb * 1024, "x" * 100_000, headers, {"offset": 1})
    body = json.loads(record.value)
    assert len(record.value) <= DLQ_MAX_BYTES
    assert body["headers_truncated"] is True
    assert len(body["error"]) <= 2000 and len(record.correlation_id) <= 200


async def test_a_missing_topic_is_waited_for_again_once_its_30_s_are_over_whatever_the_traffic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time as real_time

    from aiokafka.errors import UnknownTopicOrPartitionError

    import worker.emit as emit

    class Clock:
        now = 1000.0

        def monotonic(self) -> float:
            return self.now

        def time(self) -> float:
            return real_time.time()

    clock = Clock()
    monkeypatch.setattr(emit, "time", clock)

    producer = _MissingTopicProducer()
    emitter = emit.Emitter(producer)  # type: ignore[arg-type]
    event = [Outgoing("result", "missing", "k", b"x", "c")]
    for at, waits in [(0, 1), (20, 1), (29, 1), (31, 2), (40, 2), (62, 3)]:
        clock.now = 1000.0 + at
        with pytest.raises(UnknownTopicOrPartitionError):
            await asyncio.wait_for(emitter.publish(event), 1)
        assert producer.waits == waits, at  # failing at once does not extend the 30 s
    await emitter.aclose()


async def test_aclose_cancels_the_publishes_still_waiting_for_a_topics_metadata() -> None:
    from worker.emit import Emitter

    class Producer(_Producer):
        def partitions_for_topic(self, topic: str) -> set[int] | None:  # type: ignore[override]
            return None

        async def partitions_for(self, topic: str) -> set[int]:
            await asyncio.sleep(60)
            return {0}

    emitter = Emitter(Producer())  # type: ignore[arg-type]
    waiting = [asyncio.create_task(emitter.publish(_events(1))) for _ in range(3)]
    await asyncio.sleep(0.01)
    await emitter.aclose()
    for task in waiting:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)


def test_dumps_writes_what_pydantic_writes() -> None:
    """emit.dumps (orjson) against pydantic_core.to_json, as the models serialise: floats (shortest
    round-trip text, non-finite as null), strings of any code point, datetimes at UTC, without an offset or
    at whole-minute offsets, nested models, and integers past 64 bits (which orjson refuses)."""
    rng = random.Random(11)
    floats = [0.0, -0.0, 1e16, 1e-7, 1e21, 1e22, 5e-324, 1e300, float("inf"), float("-inf"), float("nan")]
    floats += [struct.unpack("d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(3000)]
    floats += [rng.random() * 10 ** rng.randint(-12, 25) for _ in range(3000)]
    texts = [
        "".join(
            chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0, 0xD7FF), rng.randint(0x10000, 0x10FFFF)]))
            for _ in range(rng.randint(0, 12))
        )
        for _ in range(3000)
    ]
    zones = [UTC, None, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11))]
    times = [
        datetime(
            rng.randint(1, 9999),
            rng.randint(1, 12),
            rng.randint(1, 28),
            rng.randint(0, 23),
            rng.randint(0, 59),
            rng.randint(0, 59),
            rng.choice([0, 1, 500000, rng.randint(0, 999999)]),
            tzinfo=rng.choice(zones),
        )
        for _ in range(3000)
    ]
    models = [TokenUsage(prompt_tokens=1, total_tokens=2**40), {"u": TokenUsage(), "n": [None, True]}]
    for value in [*floats, *texts, *times, *models, 2**64, -(2**63) - 1, {"big": [2**70]}]:
        assert dumps(value) == pydantic_core.to_json(value, inf_nan_mode="null"), value


async def test_aclose_cancels_publishes_queued_or_waiting_for_their_future_and_refuses_later_ones() -> None:
    from worker.emit import Emitter

    producer = _Producer()
    emitter, never = Emitter(producer), asyncio.get_running_loop().create_future()  # type: ignore[arg-type]
    gated = asyncio.create_task(emitter.publish(_events(1), after=never))
    queued = asyncio.create_task(emitter.publish(_events(1)))
    await asyncio.sleep(0)  # both are waiting; the pump has not run yet
    await emitter.aclose()
    for task in (gated, queued):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
    assert producer.sent == []
    with pytest.raises(RuntimeError, match="closed"):
        await emitter.publish(_events(1))


async def test_aclose_while_the_pump_is_sending_cancels_that_rounds_publishes() -> None:
    from worker.emit import Emitter

    class Stuck(_Producer):
        async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[None]:
            await asyncio.sleep(60)  # a send that never ends
            raise AssertionError("unreachable")

    emitter = Emitter(Stuck())  # type: ignore[arg-type]
    publishing = asyncio.create_task(emitter.publish(_events(3)))
    await asyncio.sleep(0.01)
    await emitter.aclose()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(publishing, 1)
