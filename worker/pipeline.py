"""The common path of a request in stages: the records of a fetch are decoded together and looked up in the
outcome store with one command; each request then waits for its answer in a task of its own (the cache, the
provider: 1-60 s); the replies that arrive in one loop turn make their events, store them and publish them
together in the next; each request is finished when Kafka acknowledged its events.

What Handler.handle does for one record, without a coroutine per request around it: each stage runs
over a group of requests, and only the waiting is per request. Measured against a task per record (bench
B, mock at 0 ms): see the README's #3 section.

Everything else takes the per-record path (Handler.handle, with the consume loop's retries and DLQ): a
record that is not a valid request (DLQ, VALIDATION_ERROR), one whose outcome is stored (a redelivery), a
copy of a request running here (once that one is done), and one that failed here (an unexpected error,
a publish Kafka refused): that path looks its outcome up again, so what was stored here is sent, and a
request answered here is not called again.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from functools import partial
from typing import Any

from aiokafka import ConsumerRecord

from worker import metrics
from worker.emit import Outgoing
from worker.handle import Handler, Reply
from worker.logs import correlation_id_var, request_id_var
from worker.outcomes import StoredOutcome
from worker.validate import Job, decode_request

log = logging.getLogger(__name__)


class Flight(asyncio.Future[bool]):
    """One request on the staged path, as the consume loop holds it: True once its events were acknowledged
    (its outcome stored before), False for the per-record path, failed by an error that path retries.
    Cancelling it (revocation, shutdown) cancels what the request is waiting for, and it ends cancelled when
    that has ended (as a task does: a drain that waits for it waits for the call's own clean-up)."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.job = job
        #: What it waits for now: its task (the answer), then its publish.
        self.work: asyncio.Future[Any] | None = None

    def cancel(self, msg: object = None) -> bool:
        work = self.work
        if not self.done() and work is not None and not work.done():
            work.cancel(msg)  # its done-callback cancels this Flight (or finishes it, if it ends anyway)
            return True
        return super().cancel(msg)


class Pipeline:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        #: Replies that arrived this loop turn: their events are made together in the next.
        self._answered: list[tuple[Flight, Reply]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The Flight of each request id running here: dropped once its events are out; those done otherwise
        #: (failed, cancelled: rare) when the map reaches _prune_at.
        self._flying: dict[str, Flight] = {}
        self._prune_at = _FLYING_MAX

    def start(self, records: list[ConsumerRecord]) -> list[Flight | None]:
        """Decode the records and look the valid ones up, together. Per record its Flight, or None for one
        the per-record path takes (not a valid request: it says why, in a failure event or the DLQ)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        topics = self.handler.topics
        result_topic, not_callbacks = topics.comparison_result, topics.not_callbacks
        flights: list[Flight] = []
        out: list[Flight | None] = []
        for record in records:
            try:
                job = decode_request(record.value, record.headers, result_topic, not_callbacks)
            except Exception:  # Unparseable or Invalid (never anything else: else a bug, retried there)
                out.append(None)
                continue
            flight = Flight(job, loop)
            out.append(flight)
            first = self._flying.get(job.request_id)
            if first is not None and not first.done():
                # The same request again while it runs (a producer's retry, a second copy): it waits for
                # the first, then the per-record path answers it from the outcome store, not the provider
                # (when the first failed, nothing is stored: both are then tried again, as before).
                first.add_done_callback(partial(_after_the_first, flight))
                continue
            if len(self._flying) >= self._prune_at:
                self._flying = {k: f for k, f in self._flying.items() if not f.done()}
                self._prune_at = max(_FLYING_MAX, 2 * len(self._flying))
            self._flying[job.request_id] = flight
            flights.append(flight)
        if flights:
            found = self.handler.outcomes.get_many_soon([f.job.request_id for f in flights])
            found.add_done_callback(partial(self._looked_up, flights))
        return out

    def _looked_up(self, flights: list[Flight], found: asyncio.Future[list[StoredOutcome | None]]) -> None:
        # No answer (the store closing at shutdown, or a stored record it cannot read): each asks on its own.
        if found.cancelled() or found.exception() is not None:
            stored: list[StoredOutcome | None] | None = None
        else:
            stored = found.result()
        loop, respond = self._loop, self.handler.respond
        assert loop is not None
        for i, flight in enumerate(flights):
            if flight.done():  # cancelled meanwhile
                continue
            if stored is None or stored[i] is not None:  # a redelivery: replayed by the per-record path
                flight.set_result(False)
                continue
            job = flight.job
            context = contextvars.copy_context()  # its log lines name it
            context.run(_log_ids, job)
            task = flight.work = loop.create_task(respond(job), context=context)
            task.add_done_callback(partial(self._answer, flight))

    def _answer(self, flight: Flight, task: asyncio.Task[Reply]) -> None:
        if not self._succeeded(flight, task):
            return
        if not self._answered:
            assert self._loop is not None
            self._loop.call_soon(self._emit_answered)
        self._answered.append((flight, task.result()))

    def _emit_answered(self) -> None:
        """The events of this turn's replies: made, stored, published (each after its store), together,
        stage by stage."""
        answered, self._answered = self._answered, []
        outcomes, emitter = self.handler.outcomes, self.handler.emitter
        made: list[tuple[Flight, list[Outgoing]]] = []
        for flight, reply in answered:
            try:
                made.append((flight, reply()))
            except Exception as exc:  # a bug
                self._fail(flight, exc)
        for flight, events in made:
            try:
                stored = outcomes.put_soon(flight.job.request_id, events)
                if flight.done():
                    # Cancelled after its answer came (revocation, shutdown): stored, so that the next
                    # owner of the partition sends these events instead of calling the provider again.
                    continue
                sent = emitter.submit(events, after=stored)
            except Exception as exc:  # a bug
                self._fail(flight, exc)
                continue
            flight.work = sent
            sent.add_done_callback(partial(self._sent, flight))

    def _sent(self, flight: Flight, sent: asyncio.Future[None]) -> None:
        if not self._succeeded(flight, sent):  # e.g. a callback topic Kafka refuses: tried again on its own
            return
        # Marked even when the Flight was cancelled meanwhile: the events are out, so a redelivery re-sends
        # the result alone, not the cost event again.
        request_id = flight.job.request_id
        self.handler.outcomes.mark_emitted_soon(request_id)
        if self._flying.get(request_id) is flight:  # (the others, done otherwise, go at the next pruning)
            del self._flying[request_id]
        if not flight.done():
            flight.set_result(True)

    def _succeeded(self, flight: Flight, waited: asyncio.Future[Any]) -> bool:
        """Whether what the request waited for succeeded; if it did not, the Flight ends so too."""
        if waited.cancelled():
            flight.cancel()
            return False
        error = waited.exception()
        if error is not None:
            self._fail(flight, error)
            return False
        return True

    def _fail(self, flight: Flight, error: BaseException) -> None:
        """The per-record path retries it, this error counted as its first attempt (logged here, with the
        request's ids)."""
        if flight.done():
            return
        metrics.PROCESSING_ERRORS.inc()
        context = contextvars.copy_context()
        context.run(_log_ids, flight.job)
        context.run(log.error, "processing failed", exc_info=error, extra={"attempt": 1, "staged": True})
        flight.set_exception(error)


#: Past this many request ids (or twice those running after the last pass), the done Flights are dropped.
_FLYING_MAX = 8192


def _after_the_first(copy: Flight, first: asyncio.Future[bool]) -> None:
    if not copy.done():
        copy.set_result(False)


def _log_ids(job: Job) -> None:
    correlation_id_var.set(job.correlation_text)
    request_id_var.set(job.request_id)
