"""The consume loop with a staged path (`start`): what it does with each outcome of a staged request, and at
shutdown. (A stand-in consumer and stand-in flights; the real pipeline runs in the integration tests.)"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from worker import metrics
from worker.consume import ConsumeLoop
from worker.settings import FlowSettings

TP = TopicPartition("requests", 0)


class OneBatchConsumer:
    """Hands out `n` records of TP once, then waits as aiokafka does when nothing comes."""

    def __init__(self, n: int) -> None:
        self.records = [ConsumerRecord("requests", 0, i, 0, 0, b"k", b"v", None, 1, 1, []) for i in range(n)]
        self.commits: list[dict[TopicPartition, int]] = []

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        if self.records:
            records, self.records = self.records, []
            return {TP: records}
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)

    async def stop(self) -> None:
        pass


class Harness:
    """A ConsumeLoop whose staged path hands out futures the test settles (made by `make`), and whose
    per-record path and DLQ note what they were given."""

    def __init__(self, n: int, make: Any = None, **flow: Any) -> None:
        self.consumer = OneBatchConsumer(n)
        self.flights: dict[int, asyncio.Future[bool]] = {}
        self.handled: list[int] = []
        self.dead: list[tuple[int, str]] = []
        self.make = make or (lambda: asyncio.get_running_loop().create_future())
        self.loop = ConsumeLoop(
            self.consumer,  # type: ignore[arg-type]
            "requests",
            self._handle,
            self._poison,
            FlowSettings(**flow),
            start=self._start,
        )
        self.loop.on_assigned([TP])

    def _start(self, records: list[ConsumerRecord]) -> list[asyncio.Future[bool] | None]:
        out: list[asyncio.Future[bool] | None] = []
        for record in records:
            if record.offset == 3:  # not for the staged path
                out.append(None)
                continue
            flight = self.flights[record.offset] = self.make()
            out.append(flight)
        return out

    async def _handle(self, record: ConsumerRecord) -> None:
        self.handled.append(record.offset)

    async def _poison(self, record: ConsumerRecord, error: BaseException) -> None:
        self.dead.append((record.offset, str(error)))

    async def until(self, predicate: Any) -> None:
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")


async def test_each_outcome_of_a_staged_request() -> None:
    # True: finished. False: the per-record path. Failed: the per-record path, the failure counted as its
    # first attempt (one attempt allowed: straight to the DLQ, with that error). None: the per-record path.
    h = Harness(4, poison_max_attempts=1)
    run = asyncio.create_task(h.loop.run())
    try:
        await h.until(lambda: len(h.flights) == 3 and h.loop.in_flight == 3)
        assert h.handled == [3]
        h.flights[0].set_result(True)
        h.flights[1].set_result(False)
        h.flights[2].set_exception(RuntimeError("staged bug"))
        await h.until(lambda: h.loop.in_flight == 0)
        assert sorted(h.handled) == [1, 3]
        assert h.dead == [(2, "staged bug")]
        assert h.loop.trackers[TP].committable() == 4
    finally:
        h.loop.stop()
        await run


async def test_a_staged_failure_is_retried_on_the_per_record_path_as_its_second_attempt() -> None:
    h = Harness(3, poison_max_attempts=2)
    run = asyncio.create_task(h.loop.run())
    try:
        await h.until(lambda: len(h.flights) == 3)
        for flight in h.flights.values():
            flight.set_exception(RuntimeError("staged bug"))
        await h.until(lambda: h.loop.in_flight == 0)
        assert sorted(h.handled) == [0, 1, 2] and h.dead == []
    finally:
        h.loop.stop()
        await run


class EndsWhenCancelled(asyncio.Future[bool]):
    """A staged request that, cancelled, ends as if it were done at that moment for another reason (False:
    for the per-record path), as a Flight does whose lookup or publish completes just then."""

    def cancel(self, msg: object = None) -> bool:
        if self.done():
            return False
        self.set_result(False)
        return True


async def test_after_the_drains_grace_nothing_is_handed_to_the_per_record_path() -> None:
    # Else a request would start (a provider call, maybe) while the worker closes its clients under it.
    left = metrics.REVOKED_CANCELLED._value.get()
    h = Harness(
        2, make=lambda: EndsWhenCancelled(loop=asyncio.get_running_loop()), shutdown_grace_seconds=0.2
    )
    run = asyncio.create_task(h.loop.run())
    await h.until(lambda: len(h.flights) == 2)
    h.flights[0].set_result(True)
    await h.until(lambda: h.loop.in_flight == 1)
    h.loop.stop()
    await asyncio.wait_for(run, 5)
    assert h.handled == []  # offset 1 ended False only when the drain cancelled it: not handed over
    assert h.loop.in_flight == 0
    assert h.consumer.commits[-1] == {TP: 1}  # offset 1 left unfinished for the next owner
    assert metrics.REVOKED_CANCELLED._value.get() == left + 1


async def test_a_staged_path_that_raises_leaves_the_records_to_the_per_record_path() -> None:
    h = Harness(3)

    def broken(records: list[ConsumerRecord]) -> list[asyncio.Future[bool] | None]:
        raise RuntimeError("staged bug")

    h.loop.start = broken
    run = asyncio.create_task(h.loop.run())
    try:
        await h.until(lambda: sorted(h.handled) == [0, 1, 2] and h.loop.in_flight == 0)
        assert not run.done() and h.loop.trackers[TP].committable() == 3
    finally:
        h.loop.stop()
        await run
