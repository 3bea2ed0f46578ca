"""The consume loop where Kafka does not answer: revocation and shutdown still let go, in bounded time.
(A stand-in consumer: these are the paths a real broker reaches only when it is down or mid-rebalance.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from worker import consume, metrics
from worker.consume import ConsumeLoop
from worker.settings import FlowSettings

TP = TopicPartition("requests", 0)


class StuckConsumer:
    """getmany waits as aiokafka's does for a rebalance that does not end; commit as for a coordinator
    that does not answer (or raises `commit_error`)."""

    def __init__(self, commit_error: Exception | None = None) -> None:
        self.commit_error = commit_error
        self.commits: list[dict[TopicPartition, int]] = []
        self.stopped = False

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        await asyncio.Event().wait()
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)
        if self.commit_error is not None:
            raise self.commit_error
        await asyncio.Event().wait()

    async def stop(self) -> None:
        self.stopped = True


async def _nothing(*args: Any) -> None:
    return None


def _loop(consumer: StuckConsumer) -> ConsumeLoop:
    loop = ConsumeLoop(consumer, "requests", _nothing, _nothing, FlowSettings())  # type: ignore[arg-type]
    loop.on_assigned([TP])
    tracker = loop.trackers[TP]
    tracker.admit(0)
    tracker.finish(0)  # offset 1 is committable
    return loop


async def test_stop_cuts_a_fetch_waiting_for_a_rebalance_and_the_last_commit_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consume, "COMMIT_BOUND_S", 0.2)
    consumer = StuckConsumer()
    loop = _loop(consumer)
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0.1)  # the loop is in getmany
    assert not task.done()
    loop.stop()
    await asyncio.wait_for(task, 5)  # before: waited for the fetch, then the commit, for ever
    assert consumer.commits == [{TP: 1}] and consumer.stopped


async def test_cancelling_the_loop_task_is_not_taken_for_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consume, "COMMIT_BOUND_S", 0.2)
    loop = _loop(StuckConsumer())
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0.1)
    loop._stopping = True  # stop() under way, and the task cancelled as well
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("error", [None, ValueError("not a KafkaError")], ids=["no answer", "a bug"])
async def test_revocation_lets_its_partitions_go_whatever_their_commit_does(
    monkeypatch: pytest.MonkeyPatch, error: Exception | None
) -> None:
    monkeypatch.setattr(consume, "COMMIT_BOUND_S", 0.2)
    consumer = StuckConsumer(commit_error=error)
    loop = _loop(consumer)
    straggler = asyncio.create_task(asyncio.sleep(60))
    loop.tasks[TP].add(straggler)
    loop.flow = FlowSettings(rebalance_grace_seconds=0.1)
    await asyncio.wait_for(loop.on_revoked([TP]), 5)
    await asyncio.sleep(0)
    assert consumer.commits == [{TP: 1}]
    assert loop.trackers == {} and loop.tasks == {}  # later commits do not name a partition not owned
    assert straggler.cancelled()


def test_the_rebalance_timeout_covers_heartbeat_grace_and_commit() -> None:
    flow = FlowSettings(rebalance_grace_seconds=10)
    ms = consume.rebalance_timeout_ms(flow, heartbeat_interval_ms=3000, session_timeout_ms=10_000)
    assert ms >= 3000 + 10_000 + consume.COMMIT_BOUND_S * 1000
    assert consume.rebalance_timeout_ms(FlowSettings(rebalance_grace_seconds=0), 100, 60_000) == 60_000


class PausingConsumer(StuckConsumer):
    """Commits at once; records pause and resume."""

    def __init__(self) -> None:
        super().__init__()
        self.paused: set[TopicPartition] = set()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)


async def test_a_held_partition_is_forgotten_on_revocation() -> None:
    consumer = PausingConsumer()
    loop = ConsumeLoop(
        consumer, "requests", _nothing, _nothing, FlowSettings(max_uncommitted_per_partition=3)
    )  # type: ignore[arg-type]
    loop.on_assigned([TP])
    tracker = loop.trackers[TP]
    for offset in range(3):
        tracker.admit(offset)
    loop._hold(TP, tracker)
    assert consumer.paused == {TP} and metrics.HELD_PARTITIONS._value.get() == 1
    tracker.finish(1)  # offset 0 still open: 3 at or past it, over half the cap
    loop._release_if_caught_up(TP, tracker)
    assert consumer.paused == {TP}
    await loop.on_revoked([TP])  # aiokafka starts the next assignment unpaused: nothing of ours may hold it
    assert loop._held == set() and metrics.HELD_PARTITIONS._value.get() == 0


async def test_a_partition_released_during_the_paused_poll_is_resumed_after_it_not_during(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Resumed under that poll, its buffered records would come back in a batch that is dropped; not
    # resumed after it, it would stay paused for good.
    monkeypatch.setattr(consume, "_FULL_POLL_S", 0.01)
    seen_during: list[set[TopicPartition]] = []

    class ReleasingConsumer(PausingConsumer):
        async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
            tracker.finish(0)  # the stuck request finishes while the paused poll runs
            loop._release_if_caught_up(TP, tracker)
            seen_during.append(set(self.paused))
            return {}

    consumer = ReleasingConsumer()
    loop = ConsumeLoop(
        consumer, "requests", _nothing, _nothing, FlowSettings(max_uncommitted_per_partition=2)
    )  # type: ignore[arg-type]
    loop.on_assigned([TP])
    tracker = loop.trackers[TP]
    tracker.admit(0)
    tracker.admit(1)
    tracker.finish(1)
    loop._hold(TP, tracker)
    loop.in_flight = loop.flow.max_in_flight  # the window is full: the loop polls with everything paused
    await loop._fetch_once()
    assert seen_during == [{TP}]  # released, but not resumed under the poll
    assert TP not in loop._held and consumer.paused == set()  # resumed after it
