"""The consume loop: many requests in flight per partition, at-least-once watermark commits,
backpressure (no records taken at the limit, so aiokafka fetches no more), bounded drain on revocation and
shutdown.

FastStream's subscriber awaits one message at a time and `msg.ack()` commits everything read so far, so
offsets are ours: this loop drives an aiokafka consumer directly (auto-commit off) and publishes through
the FastStream broker.

Correctness in four rules:
1. An offset is admitted to its partition's tracker before its task starts, in fetch order.
2. An offset is finished only when its request is done: `handle` returned, or the staged path
   (worker/pipeline.py, `start`) resolved its future True; i.e. its terminal events were acknowledged by
   Kafka (acks=all) and its outcome was recorded for idempotent replay first.
3. We only ever commit `tracker.committable()`: the lowest unfinished offset. A crash therefore redelivers
   every unfinished request (nothing lost) plus finished ones above the gap (replayed from the outcome
   store, no second provider call).
4. Trackers carry an epoch. On revocation a tracker is dropped after its grace period; a task of an old
   epoch that completes later touches nothing, because the new owner may be redoing that offset.

Assignment: aiokafka implements only the eager rebalance protocol (no cooperative-sticky), so every
rebalance revokes all partitions of this member: in-flight work gets REBALANCE_GRACE_SECONDS to finish and
be committed, the rest is cancelled and redone by whoever owns the partition next (the consumer's rebalance
timeout covers that wait: `rebalance_timeout_ms`). The sticky assignor keeps most partitions where they
were.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from worker import metrics
from worker.logs import correlation_id_var, request_id_var
from worker.offsets import PartitionTracker
from worker.settings import FlowSettings
from worker.validate import header_text

log = logging.getLogger(__name__)

# A DLQ publish that fails is tried again, backing off up to this long between tries.
_DLQ_RETRY_MAX_S = 30.0
# While the in-flight window stays full, poll (paused) at least this often to stay in the group.
_FULL_POLL_S = 30.0
# The commit on revocation and the last one at shutdown wait at most this long (aiokafka retries a commit
# until the coordinator answers): past it, the next owner redoes what was not committed.
COMMIT_BOUND_S = 5.0


def rebalance_timeout_ms(flow: FlowSettings, heartbeat_interval_ms: int, session_timeout_ms: int) -> int:
    """How long the broker waits for this member to rejoin in a rebalance. It hears of the rebalance on its
    next heartbeat, then gives revoked work its grace and commits before rejoining; with the default (the
    session timeout) a member still waiting for its grace is dropped from the group, its commit refused,
    and it comes back with another rebalance, so with long calls members would take turns being dropped
    and a slow request could be redone again and again."""
    needed = heartbeat_interval_ms + (flow.rebalance_grace_seconds + COMMIT_BOUND_S) * 1000 + 5000
    return max(session_timeout_ms, int(needed))


Handle = Callable[[ConsumerRecord], Awaitable[None]]
Poison = Callable[[ConsumerRecord, BaseException], Awaitable[None]]
#: The staged path (worker/pipeline.py): per record a future done True when its request is finished, or
#: None (or a future done False, or failed) for the per-record path (`handle`).
Start = Callable[[list[ConsumerRecord]], Sequence["asyncio.Future[bool] | None"]]


class ConsumeLoop:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topic: str,
        handle: Handle,
        poison: Poison,
        flow: FlowSettings,
        start: Start | None = None,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.handle = handle
        self.start = start
        self.poison = poison
        self.flow = flow
        self.trackers: dict[TopicPartition, PartitionTracker] = {}
        #: In-flight work per partition: the per-record path's tasks and the staged path's futures.
        self.tasks: dict[TopicPartition, set[asyncio.Future[Any]]] = {}
        self.in_flight = 0
        self._epoch = 0
        self._paused = False
        self._revoking: set[TopicPartition] = set()
        #: Partitions paused because a request at their watermark does not finish while the ones after it
        #: do: fetching from them resumes once half of what was taken past it has been committed.
        self._held: set[TopicPartition] = set()
        self._paused_poll = False
        self._finished_since_commit = 0
        self._capacity = asyncio.Event()
        self._commit_soon = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._stopping = False
        #: The drain's grace is over: no more work is handed from the staged path to the per-record path.
        self._drained = False
        self._fetch: asyncio.Future[dict[TopicPartition, list[ConsumerRecord]]] | None = None
        # Resume fetching once 2 % of the window is free: small enough to keep the window full, large
        # enough not to flip pause/resume on every completion.
        self._resume_at = flow.max_in_flight - max(1, flow.max_in_flight // 50)
        self.assigned = asyncio.Event()
        self._pacer = _Pacer(flow.max_in_flight)
        self._loop: asyncio.AbstractEventLoop | None = None
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)  # read at scrape time, not per request

    # ---- main loop -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch and schedule until stop(); then drain, commit and close the consumer."""
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        committer = asyncio.create_task(self._commit_periodically())
        try:
            while not self._stopping:
                await self._fetch_once()
        finally:
            await self._drain(self.flow.shutdown_grace_seconds)
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
            await self._commit_bounded(None, "shutdown")
            await self.consumer.stop()

    async def _fetch_once(self) -> None:
        room = self.flow.max_in_flight - self.in_flight
        if room <= 0 or (self._paused and self.in_flight > self._resume_at):
            # Backpressure: take no more records. aiokafka keeps what it already fetched (at most one response
            # per partition) and fetches nothing more for a partition until its records are taken, so memory
            # stays bounded without pause(); pausing would make it drop those records and fetch them again on
            # resume (measured: that refetching was most of the consumer's CPU under load).
            self._set_backpressure(True)
            self._capacity.clear()
            try:
                await asyncio.wait_for(self._capacity.wait(), timeout=_FULL_POLL_S)
            except TimeoutError:
                # Full for a long time: poll with every partition paused, so that this member is not taken
                # for dead (max.poll.interval.ms) however long the provider calls take.
                self.consumer.pause(*self.consumer.assignment())
                self._paused_poll = True  # a partition released meanwhile is resumed after it, not during
                try:
                    await self._getmany(timeout_ms=0)
                finally:
                    self._paused_poll = False
                self.consumer.resume(*(self.consumer.assignment() - self._held))
            return
        if self._paused:
            self._set_backpressure(False)
        allowed, wait_s = self._pacer.allowance(room)
        if not allowed:
            await asyncio.sleep(wait_s)
            return
        batch = await self._getmany(timeout_ms=100, max_records=allowed)
        if batch is None or self._stopping:
            return  # not started: not committed either, so whoever owns the partition next reads them
        taken: list[tuple[TopicPartition, PartitionTracker, list[ConsumerRecord]]] = []
        for tp, records in batch.items():
            tracker = self.trackers.get(tp)
            if tracker is None or tp in self._revoking:
                continue  # revoked while fetched: the next owner reads these again
            taken.append((tp, tracker, records))
        if not taken:
            return
        # The staged path takes the whole fetch at once (its stages run over groups: the larger, the less
        # CPU per request).
        everything = [r for _, _, records in taken for r in records] if len(taken) > 1 else taken[0][2]
        staged: Iterable[asyncio.Future[bool] | None] = itertools.repeat(None)
        if self.start is not None:
            try:
                staged = self.start(everything)
            except Exception:  # a bug: the per-record path takes them all (the loop must not die of it)
                log.exception("staged path failed; records go one by one")
        now = time.monotonic()
        flights = iter(staged)
        for tp, tracker, records in taken:
            for record in records:
                self._start(tp, tracker, record, next(flights), now)
            if tracker.span >= self.flow.max_uncommitted_per_partition:
                self._hold(tp, tracker)

    async def _getmany(
        self, timeout_ms: int, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord]] | None:
        """consumer.getmany in a task, so that stop() can cut it (None then): getmany waits out a rebalance
        in progress, however long."""
        fetch = asyncio.ensure_future(self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records))
        self._fetch = fetch
        try:
            return await fetch
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stopping and fetch.cancelled() and not (task and task.cancelling()):
                return None  # cut by stop(), not this task cancelled
            raise
        finally:
            self._fetch = None

    def _start(
        self,
        tp: TopicPartition,
        tracker: PartitionTracker,
        record: ConsumerRecord,
        flight: asyncio.Future[bool] | None,
        now: float,
    ) -> None:
        tracker.admit(record.offset)
        self.in_flight += 1
        self._pacer.admitted()
        if flight is None:
            self._launch(tp, tracker.epoch, record, now)
            return
        self.tasks[tp].add(flight)
        flight.add_done_callback(partial(self._landed, tp, tracker.epoch, record, now))

    def _launch(
        self,
        tp: TopicPartition,
        epoch: int,
        record: ConsumerRecord,
        started: float,
        failed: BaseException | None = None,
    ) -> None:
        """The per-record path: the handler in a task, with retries and the DLQ (`failed`: the error of
        the staged attempt, counted as the first)."""
        loop = self._loop
        if loop is None:  # asyncio.create_task looks the loop up on each call, with a getpid() syscall (3.11)
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(self._process(record, failed))
        self.tasks[tp].add(task)
        task.add_done_callback(partial(self._on_done, tp, epoch, record.offset, started))

    def _landed(
        self,
        tp: TopicPartition,
        epoch: int,
        record: ConsumerRecord,
        started: float,
        flight: asyncio.Future[bool],
    ) -> None:
        """A staged request is done: finished, or handed to the per-record path (still in flight), unless
        its partition was let go or the drain's grace is over: then it is left unfinished, as if cancelled."""
        if not flight.cancelled() and ((failed := flight.exception()) is not None or not flight.result()):
            tasks, tracker = self.tasks.get(tp), self.trackers.get(tp)
            if tasks is not None and tracker is not None and tracker.epoch == epoch and not self._drained:
                tasks.discard(flight)
                self._launch(tp, epoch, record, started, failed)
                return
            self._on_done(tp, epoch, record.offset, started, flight, left=True)
            return
        self._on_done(tp, epoch, record.offset, started, flight)

    async def _process(self, record: ConsumerRecord, failed: BaseException | None = None) -> None:
        """Run the handler; an unexpected error is retried, then the message is dead-lettered. `failed`: the
        error of a first attempt on the staged path."""
        # Log context: set by the handler once it has read the request (or found it unreadable); from the
        # record's key and header when it failed before that.
        error: BaseException | None = failed
        attempt = 0 if failed is None else 1  # (that attempt was logged by the staged path)
        if failed is not None:
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        while attempt < self.flow.poison_max_attempts:
            attempt += 1
            try:
                await self.handle(record)
                return
            except Exception as exc:  # a bug or a poison message; the handler maps all expected errors
                error = exc
                metrics.PROCESSING_ERRORS.inc()
                if request_id_var.get() is None:  # failed before the handler read the request
                    _log_context_of(record)
                log.exception(
                    "processing failed",
                    extra={"attempt": attempt, "partition": record.partition, "offset": record.offset},
                )
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        assert error is not None
        await self._dead_letter(record, error)

    async def _dead_letter(self, record: ConsumerRecord, error: BaseException) -> None:
        """Publish to the DLQ until Kafka takes it: the partition's watermark waits for this offset, so
        giving up would hold it until a restart. Revocation and shutdown cancel the wait."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=0.2, max=_DLQ_RETRY_MAX_S),
            before_sleep=_log_dlq_retry,
            reraise=True,
        ):
            with attempt:
                await self.poison(record, error)

    def _on_done(
        self,
        tp: TopicPartition,
        epoch: int,
        offset: int,
        started: float,
        task: asyncio.Future[Any],
        left: bool = False,
    ) -> None:
        """`left`: let go unfinished (whoever reads the partition next redoes it), as if cancelled."""
        self.in_flight -= 1
        self._pacer.finished(time.monotonic() - started)
        tasks = self.tasks.get(tp)
        if tasks is not None:
            tasks.discard(task)
        if left or task.cancelled():
            metrics.REVOKED_CANCELLED.inc()
        elif task.exception() is not None:
            # Not expected (the DLQ publish is retried until it lands or is cancelled): leave the offset
            # unfinished. The partition's watermark stops here, so a restart redelivers this message.
            log.error("message left unfinished", exc_info=task.exception(), extra={"offset": offset})
        else:
            tracker = self.trackers.get(tp)
            if tracker is not None and tracker.epoch == epoch:
                tracker.finish(offset)
                if self._held and tp in self._held:
                    self._release_if_caught_up(tp, tracker)
                self._finished_since_commit += 1
                if self._finished_since_commit >= self.flow.commit_every:
                    self._commit_soon.set()
        if self.in_flight <= self._resume_at:
            self._capacity.set()

    # ---- backpressure ----------------------------------------------------------------------------------

    def _hold(self, tp: TopicPartition, tracker: PartitionTracker) -> None:
        """Stop fetching from a partition whose watermark is stuck behind a request that does not finish
        while the ones after it do: memory stays bounded, and so does what a restart would redo (those
        finished past it are replayed from the outcome store only while their records live)."""
        if tp in self._held:
            return
        self._held.add(tp)
        self.consumer.pause(tp)
        metrics.HELD_PARTITIONS.set(len(self._held))
        log.warning(
            "partition held: its lowest unfinished request does not finish",
            extra={
                "partition": tp.partition,
                "offset": tracker.committable(),
                "span": tracker.span,
            },
        )

    def _release_if_caught_up(self, tp: TopicPartition, tracker: PartitionTracker) -> None:
        if tracker.span > self.flow.max_uncommitted_per_partition // 2:
            return
        self._held.discard(tp)
        metrics.HELD_PARTITIONS.set(len(self._held))
        # Not while the paused poll runs: records it returned for a partition resumed under it are dropped
        # (and the position moved past them); the resume after that poll takes this one too.
        if tp in self.consumer.assignment() and not self._paused_poll:
            self.consumer.resume(tp)
        log.info("partition released", extra={"partition": tp.partition, "span": tracker.span})

    def _set_backpressure(self, on: bool) -> None:
        if on != self._paused:
            self._paused = on
            metrics.PAUSED.set(1 if on else 0)

    # ---- commits ---------------------------------------------------------------------------------------

    async def _commit_periodically(self) -> None:
        interval_s = self.flow.commit_interval_ms / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._commit_soon.wait(), timeout=interval_s)
            self._commit_soon.clear()
            try:
                await self.commit()
            except Exception:  # not a KafkaError (those are handled): keep committing on the next tick
                metrics.labelled(metrics.COMMITS, "error").inc()
                log.exception("offset commit failed unexpectedly; will retry")

    async def commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit each partition's watermark that moved; one request for all partitions."""
        async with self._commit_lock:
            wanted = set(only) if only is not None else None
            offsets: dict[TopicPartition, int] = {}
            for tp, tracker in self.trackers.items():
                target = tracker.committable()
                if (wanted is None or tp in wanted) and target is not None and target != tracker.committed:
                    offsets[tp] = target
            if not offsets:
                return
            self._finished_since_commit = 0
            try:
                await self.consumer.commit(offsets)
            except KafkaError as exc:
                metrics.labelled(metrics.COMMITS, "error").inc()
                log.warning("offset commit failed; will retry", extra={"error": repr(exc)})
                return
            metrics.labelled(metrics.COMMITS, "ok").inc()
            for tp, offset in offsets.items():
                current = self.trackers.get(tp)
                if current is not None:
                    current.committed = offset

    # ---- rebalance and shutdown ------------------------------------------------------------------------

    def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        for tp in assigned:
            self._epoch += 1
            self.trackers[tp] = PartitionTracker(self._epoch)
            self.tasks[tp] = set()
        log.info("partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})
        self.assigned.set()

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Stop starting work for these partitions, give in-flight work a grace period, commit, let go."""
        mine = [tp for tp in revoked if tp in self.trackers]
        if not mine:
            return
        self._revoking.update(mine)
        try:
            await self._wait_for(mine, self.flow.rebalance_grace_seconds)
            await self._commit_bounded(mine, "revocation")
        finally:  # let go whatever happened above: no task or tracker of a partition we may not own
            for tp in mine:
                for task in self.tasks.pop(tp, ()):
                    task.cancel()
                self.trackers.pop(tp, None)
            self._revoking.difference_update(mine)
            self._held.difference_update(mine)  # a new assignment starts unpaused
            metrics.HELD_PARTITIONS.set(len(self._held))
        log.info("partitions revoked", extra={"partitions": sorted(tp.partition for tp in mine)})

    async def _commit_bounded(self, only: list[TopicPartition] | None, when: str) -> None:
        """commit(), for at most COMMIT_BOUND_S and never raising: on revocation and at shutdown nothing
        is left to retry it, and the next owner redoes what was not committed."""
        try:
            async with asyncio.timeout(COMMIT_BOUND_S):
                await self.commit(only)
        except Exception as exc:  # TimeoutError (Kafka unreachable), or a bug
            metrics.labelled(metrics.COMMITS, "error").inc()
            log.warning("offset commit failed; not retried", extra={"on": when, "error": repr(exc)})

    async def _drain(self, grace_s: float) -> None:
        self._set_backpressure(True)
        if self.in_flight:
            log.info("draining in-flight requests", extra={"in_flight": self.in_flight, "grace_s": grace_s})
        still = await self._wait_for(None, grace_s)
        self._drained = True
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still)

    async def _wait_for(
        self, partitions: list[TopicPartition] | None, timeout_s: float
    ) -> set[asyncio.Future[Any]]:
        """Wait until the in-flight work of these partitions (all: None) is done, for at most timeout_s;
        what is still running then. Work handed from the staged path to the per-record path meanwhile (a
        new task) is waited for too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            groups = (
                self.tasks.values() if partitions is None else (self.tasks.get(tp, ()) for tp in partitions)
            )
            pending = {t for group in groups for t in group if not t.done()}
            left = deadline - loop.time()
            if not pending or left <= 0:
                return pending
            await asyncio.wait(pending, timeout=left)

    @property
    def paused(self) -> bool:
        return self._paused

    def stop(self) -> None:
        self._stopping = True
        self._capacity.set()
        if self._fetch is not None:
            self._fetch.cancel()


def _log_dlq_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    log.warning("DLQ publish failed; retrying", extra={"attempt": state.attempt_number, "error": repr(error)})


class _Pacer:
    """Admission pacing: a backlog enters the window as a steady flow, not in waves.

    Without it, a full window of requests admitted at once finishes at once, and the capacity it frees is
    refilled at once again: every request then queues behind the whole wave at each step after its call
    (measured with MAX_IN_FLIGHT=1000 and 1 s calls: waves 150-300 ms wide, 1.15-1.3 s per request). The
    rate allowed is 1.25 x window / (average time in the window), i.e. a quarter above what the window can
    sustain by Little's law, so it never limits steady throughput. Bursts are capped at what the window
    completes in 100 ms, between 1/10 and 1/3 of the window (at least 8), and admissions come in chunks
    of at least half a burst (or the room, when that is less). Calls of a second or more thus enter in
    bursts of 1/10 and chunks of 1/20 of the window: larger ones made start-up waves that lowered bench A
    (mock at 1 s) from 980-983 to 959-976 req/s. With fast requests each admission runs the fetch, Redis
    and publish steps, and each request's own code, for its group at once, and the larger the group the
    less CPU per request. Bench B (mock at 0 ms, 1000 in flight), alternating runs: chunks of 1/100 and
    bursts of 1/20 gave 48 records per fetch, 1/20 and 1/10 gave 83 and 8 % less CPU per request (10 of 12
    pairs); chunks of 1/5 and bursts of 1/3 against those, with Redis cleared between runs, less again in
    7 of 9 pairs (median 13 %; the chunk is now half a burst, 1/6 for fast requests).
    Until the first request finishes, the average is taken to be 1 s (the short end of LLM calls): a cold
    start with a backlog fills the window in 0.8 s rather than at once.
    """

    HEADROOM = 1.25

    def __init__(self, window: int) -> None:
        self.window = window
        self.floor = min(window, 8.0)  # a small window may still fill at once
        self.latency_s = 1.0
        self.observed = False
        self.tokens = self._burst(window / self.latency_s)
        self.refilled = time.monotonic()

    def finished(self, in_window_s: float) -> None:
        if not self.observed:
            self.latency_s, self.observed = in_window_s, True
        else:
            self.latency_s += 0.02 * (in_window_s - self.latency_s)

    def admitted(self) -> None:
        self.tokens -= 1

    def allowance(self, room: int) -> tuple[int, float]:
        """How many records may be admitted now, else how long to wait for the next one."""
        drain = self.window / max(self.latency_s, 1e-4)  # what the window completes per second
        rate = self.HEADROOM * drain
        burst = self._burst(drain)
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        want = min(max(1, int(burst / 2)), room)  # one getmany per chunk
        if self.tokens + 1e-9 >= want:  # (float rounding of the refill)
            return min(room, int(self.tokens + 1e-9)), 0.0
        return 0, min((want - self.tokens) / rate, 0.1)

    def _burst(self, drain: float) -> float:
        """What the window completes in 100 ms, between 1/10 and 1/3 of it (at least the floor)."""
        return max(self.floor, min(self.window / 3, max(self.window / 10, drain * 0.1)))


class _Listener(ConsumerRebalanceListener):
    def __init__(self, loop: ConsumeLoop) -> None:
        self.loop = loop

    # aiokafka passes sets.
    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.loop.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.loop.on_assigned(assigned)


def _log_context_of(record: ConsumerRecord) -> None:
    """Log context from the record itself: the Kafka key is the request id, the header the correlation id."""
    request_id_var.set(record.key.decode(errors="replace") if record.key else None)
    correlation_id_var.set(header_text(record.headers, "correlation_id"))
