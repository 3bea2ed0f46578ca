"""The staged path (worker/pipeline.py) on a real Redis, with a stand-in emitter: what goes to the per-record
path, cancellation, the emitted marker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from redis.asyncio import Redis

from contracts import ProviderName
from tests.conftest import REDIS_URL, request_envelope
from worker import metrics
from worker.emit import Outgoing
from worker.handle import Handler
from worker.orchestrate import Orchestrator
from worker.outcomes import OutcomeStore, StoredOutcome
from worker.pipeline import Flight, Pipeline
from worker.pricing import PriceTable
from worker.providers.mock import MockProvider
from worker.settings import KafkaSettings, MockSettings


class Emitter:
    """Acknowledges every publish once its store is done, unless told to hold them (`held`)."""

    def __init__(self) -> None:
        self.sent: list[list[Outgoing]] = []
        self.hold = False
        self.held: list[asyncio.Future[None]] = []

    def submit(self, messages: list[Outgoing], after: Any = None) -> asyncio.Future[None]:
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent.append(messages)
        if self.hold:
            self.held.append(acked)
        else:
            after.add_done_callback(lambda _: acked.done() or acked.set_result(None))
        return acked


@dataclass
class Staged:
    pipeline: Pipeline
    store: OutcomeStore
    emitter: Emitter
    mock: MockProvider
    redis: Redis


@asynccontextmanager
async def staged(latency_ms: float = 0, redis_url: str = REDIS_URL) -> AsyncIterator[Staged]:
    redis = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    store = OutcomeStore(redis, f"staged-{uuid.uuid4()}", ttl_s=60)
    mock = MockProvider(MockSettings(mock_latency_ms=latency_ms))
    orchestrator = Orchestrator({"mock": mock}, PriceTable.load(), ProviderName.MOCK)
    emitter = Emitter()
    handler = Handler(orchestrator, store, emitter, KafkaSettings().topics, "test")  # type: ignore[arg-type]
    try:
        yield Staged(Pipeline(handler), store, emitter, mock, redis)
    finally:
        await store.aclose()
        await redis.aclose()


async def _until(predicate: Any, every_s: float = 0.01) -> None:
    for _ in range(500 if every_s else 100_000):
        if predicate():
            return
        await asyncio.sleep(every_s)
    raise AssertionError("timed out")


def record(offset: int, value: bytes) -> ConsumerRecord:
    return ConsumerRecord("t", 0, offset, 0, 0, b"k", value, None, 1, len(value), [])


def valid(request_id: str) -> bytes:
    return request_envelope(request_id=request_id).model_dump_json().encode()


async def test_only_new_valid_requests_stay_on_the_staged_path() -> None:
    async with staged() as s:
        await s.store.put_soon("done-before", [Outgoing("result", "t", "done-before", b"{}", "c")])
        flights = s.pipeline.start(
            [record(0, valid("new-1")), record(1, b"not json"), record(2, valid("done-before"))]
        )
        assert flights[1] is None  # unparseable: the per-record path (DLQ)
        new, stored = flights[0], flights[2]
        assert new is not None and stored is not None
        assert await asyncio.wait_for(stored, 5) is False  # a redelivery: replayed by the per-record path
        assert await asyncio.wait_for(new, 5) is True
        assert s.mock.calls == 1 and [m.kind for m in s.emitter.sent[0]] == ["result", "cost"]
        found = await s.store.get("new-1")
        assert found is not None and [m.value for m in found.messages] == [m.value for m in s.emitter.sent[0]]


async def test_a_request_sent_twice_is_called_once() -> None:
    # The copy (a producer's retry, in the same fetch or a later one) waits for the first, then takes the
    # per-record path, which answers it from the outcome store.
    async with staged() as s:
        first, copy = s.pipeline.start([record(0, valid("twice")), record(1, valid("twice"))])
        assert first is not None and copy is not None
        [later] = s.pipeline.start([record(2, valid("twice"))])
        assert later is not None
        assert await asyncio.wait_for(first, 5) is True
        assert await asyncio.wait_for(copy, 5) is False and await asyncio.wait_for(later, 5) is False
        assert s.mock.calls == 1 and len(s.emitter.sent) == 1
        [again] = s.pipeline.start([record(3, valid("twice"))])  # once it is done: looked up, stored
        assert again is not None and await asyncio.wait_for(again, 5) is False
        assert s.mock.calls == 1


async def test_a_stored_record_it_cannot_read_sends_the_whole_fetch_to_the_per_record_path() -> None:
    # Each record there looks itself up again: only that one fails (and is retried, then dead-lettered).
    async with staged() as s:
        await s.redis.set(f"{s.store.prefix}unreadable", b'{"not": "the format"}\nxyz', ex=60)
        flights = s.pipeline.start([record(0, valid("fine")), record(1, valid("unreadable"))])
        assert [await asyncio.wait_for(f, 5) for f in flights if f is not None] == [False, False]
        assert s.mock.calls == 0


async def test_with_redis_down_the_lookup_degrades_to_at_least_once() -> None:
    metrics.flush()
    before = metrics.IDEMPOTENCY_DEGRADED.labels("get")._value.get()
    async with staged(redis_url="redis://127.0.0.1:1") as s:  # nothing listens there
        s.emitter.hold = True  # (its store cannot be made either)
        [flight] = s.pipeline.start([record(0, valid("no-redis"))])
        assert flight is not None
        await _until(lambda: s.mock.calls)
        assert s.mock.calls == 1  # called all the same
        metrics.flush()
        assert metrics.IDEMPOTENCY_DEGRADED.labels("get")._value.get() == before + 1
        flight.cancel()


async def test_a_cancelled_flight_ends_when_its_call_has_ended() -> None:
    # As a task does: a drain that waits for it waits for the call's own clean-up.
    async with staged(latency_ms=200) as s:
        [flight] = s.pipeline.start([record(0, valid("slow"))])
        assert isinstance(flight, Flight)
        await _until(lambda: s.mock.calls)
        task = flight.work
        assert task is not None and not task.done()
        assert flight.cancel()
        assert not flight.done()  # its call is still ending
        await asyncio.wait([flight], timeout=5)
        assert flight.cancelled() and task.cancelled()
        assert s.emitter.sent == []


async def test_events_acknowledged_before_a_cancel_are_marked_emitted() -> None:
    # Else a redelivery would send the cost event again.
    async with staged() as s:
        s.emitter.hold = True
        [flight] = s.pipeline.start([record(0, valid("acked"))])
        assert flight is not None
        await _until(lambda: s.emitter.held)
        [acked] = s.emitter.held
        acked.set_result(None)  # acknowledged; the Flight hears of it a turn later
        flight.cancel()
        await asyncio.wait([flight], timeout=5)
        assert flight.cancelled()
        await asyncio.sleep(0.05)  # the marker's write
        found = await s.store.get("acked")
        assert found is not None and found.emitted


async def test_a_request_cancelled_after_it_answered_leaves_its_events_stored_for_the_next_owner() -> None:
    # The replies of one loop turn make their events together in the next. A revocation or shutdown that
    # cancels a request in between must not lose the answer: the provider was called, so its events are
    # stored (and not sent), and the next owner replays them without a second call.
    stored, calls, sent, loop_errors = await _cancelled_once_answered()
    assert stored is not None and not stored.emitted
    assert [m.kind for m in stored.messages] == ["result", "cost"]
    assert b'"winner":"Essay' in stored.messages[0].value
    assert calls == 1 and sent == [] and loop_errors == []


async def test_a_request_cancelled_there_stays_cancelled_when_its_events_cannot_be_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug there must not turn the cancel into an error: the consumer would retry the request (a second
    # provider call) on a partition it no longer owns, or keep a shutdown waiting.
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(Handler, "_events", broken)
    stored, calls, sent, loop_errors = await _cancelled_once_answered()  # raises unless cancelled
    assert stored is None and calls == 1 and sent == [] and loop_errors == []


async def _cancelled_once_answered() -> tuple[StoredOutcome | None, int, list[Any], list[Any]]:
    """One request on the staged path, its Flight cancelled as soon as its answer came: what the outcome
    store then holds for it, the mock's calls, what was handed to the emitter, and the errors the event
    loop was told of."""
    loop_errors: list[Any] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: loop_errors.append(context))
    try:
        async with staged() as s:
            [flight] = s.pipeline.start([record(0, valid("cancelled-1"))])
            assert flight is not None
            await _until(lambda: flight.work is not None, every_s=0)  # its task (the call) just made
            assert flight.work is not None
            # Called after the pipeline's own callback (the answer is in), before the next turn makes events.
            flight.work.add_done_callback(lambda _: flight.cancel())
            with pytest.raises(asyncio.CancelledError):
                await flight
            await asyncio.sleep(0.01)  # the turn that makes the events
            found = await s.store.get("cancelled-1")  # read after the write, on the same connection
            return found, s.mock.calls, s.emitter.sent, loop_errors
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
