"""Idempotent redelivery: the terminal outcome of each request, stored in Redis under its request_id (an
invalid request's under its record: see handle._record_key).

Order per request: put_soon(outcome events) -> publish them -> mark_emitted -> offset may be committed.
A redelivered request finds its record: if it was emitted, only the result is re-sent (no second
cost-tracking event); if the crash came between put and mark_emitted, everything is sent again with the
same event ids, so consumers can drop the copy. With Redis down the store answers "unknown" and the worker
falls back to plain at-least-once, counted in llm_worker_idempotency_degraded_total.

Cost per request is kept to a few microseconds: the lookups of all requests that ask in the same event-loop
turn go out as one MGET, and their writes (outcome and emitted marker alike) as one script call setting
every key with the TTL (an outcome only where none is stored yet: the first one recorded is kept), each
through the shared RedisBatch; the puts of a turn share one future, so the emitter releases their publishes
with one callback. The stored record is the events' own bytes behind a small JSON header, so nothing is
re-serialised. (The multi-key script assumes one Redis node, not Redis Cluster.)
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker import metrics
from worker.emit import Outgoing, dumps
from worker.redis_batch import RedisBatch

log = logging.getLogger(__name__)

#: How long aclose() waits for the writes still on their way.
CLOSE_WAIT_S = 5.0

# KEYS: the outcomes, then the emitted markers; ARGV: the outcomes' values, then the TTL. An outcome is
# set only where none is stored (NX): the first outcome recorded for a request stays, even when a later
# run of it (after a lookup Redis could not answer) ends otherwise. A marker is set to "1".
_SET_ALL = """
local ttl, outcomes = ARGV[#ARGV], #ARGV - 1
for i, key in ipairs(KEYS) do
  if i <= outcomes then redis.call('SET', key, ARGV[i], 'EX', ttl, 'NX')
  else redis.call('SET', key, '1', 'EX', ttl) end
end
return #KEYS
"""


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    messages: list[Outgoing]
    emitted: bool

    def to_replay(self) -> list[Outgoing]:
        if self.emitted:
            return [m for m in self.messages if m.kind == "result"]
        return self.messages


def encode_outcome(messages: list[Outgoing]) -> bytes:
    """One JSON line of [kind, topic, key, correlation_id, value length] per event, then the values."""
    header = [[m.kind, m.topic, m.key, m.correlation_id, len(m.value)] for m in messages]
    return b"".join([dumps(header), b"\n", *[m.value for m in messages]])


def decode_outcome(stored: bytes) -> list[Outgoing]:
    head, sep, body = stored.partition(b"\n")
    if not sep:  # the earlier format: a JSON list of [kind, topic, key, value text, correlation_id]
        return [Outgoing(k, t, key, v.encode(), c) for k, t, key, v, c in json.loads(stored)]
    out, at = [], 0
    for kind, topic, key, correlation_id, size in json.loads(head):
        out.append(Outgoing(kind, topic, key, body[at : at + size], correlation_id))
        at += size
    return out


class OutcomeStore:
    """Two keys per request, both with the TTL: `<prefix>:outcome:<id>` = the outcome's events, and
    `<prefix>:emitted:<id>` = "1" once Kafka acknowledged them. The id is the request id, or for an invalid
    request its record's key (handle._record_key)."""

    def __init__(self, redis: Redis, prefix: str, ttl_s: int) -> None:
        self.batch = RedisBatch(redis)
        self.prefix = f"{prefix}:outcome:"
        self.emitted_prefix = f"{prefix}:emitted:"
        self.ttl_s = ttl_s
        self._gets: list[tuple[str, asyncio.Future[Any]]] = []
        # This turn's writes, for its one script call: outcome keys and values, emitted-marker keys, and
        # the futures of markers someone awaits (mark_emitted).
        self._put_keys: list[str] = []
        self._put_values: list[bytes] = []
        self._mark_keys: list[str] = []
        self._mark_futures: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing: set[asyncio.Future[Any]] = set()
        #: The future of this turn's puts (one for all of them), until the turn's script call is sent.
        self._gate: asyncio.Future[None] | None = None

    async def get(self, request_id: str) -> StoredOutcome | None:
        loop = self._running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._gets:
            loop.call_soon(self._flush_gets)
        self._gets.append((request_id, future))
        try:
            stored, emitted = await future
        except (RedisError, OSError) as exc:
            self._degraded("get", exc)
            return None
        return _stored_outcome(stored, emitted)

    def get_many_soon(self, request_ids: list[str]) -> asyncio.Future[list[StoredOutcome | None]]:
        """get() of many requests as one future (one MGET): the stored outcome of each, or None. With Redis
        down every answer is None, each counted as degraded (as get's). Cancelled if the command was."""
        found: asyncio.Future[list[StoredOutcome | None]] = self._running_loop().create_future()
        reply = self.batch.submit("MGET", *self._lookup_keys(request_ids))
        reply.add_done_callback(partial(self._hand_out_many, found, len(request_ids)))
        return found

    def _hand_out_many(
        self, found: asyncio.Future[list[StoredOutcome | None]], n: int, reply: asyncio.Future[Any]
    ) -> None:
        if found.done():
            return
        if reply.cancelled():
            found.cancel()
            return
        exc = reply.exception()
        if exc is not None:
            if not isinstance(exc, RedisError | OSError):
                found.set_exception(exc)
                return
            for _ in range(n):
                self._degraded("get", exc)
            found.set_result([None] * n)
            return
        values = reply.result()
        try:
            found.set_result(
                [
                    _stored_outcome(stored, emitted)
                    for stored, emitted in zip(values[::2], values[1::2], strict=True)
                ]
            )
        except Exception as error:  # a stored record this code cannot read: the caller asks one by one
            found.set_exception(error)

    def put_soon(self, request_id: str, messages: list[Outgoing]) -> asyncio.Future[None]:
        """Store the events; the future to publish them after (Emitter.publish(after=...)). It is the
        future of this loop turn's script call, shared by every put of the turn: await it, never cancel
        it (that would cancel the others' publishes too)."""
        value = encode_outcome(messages)
        gate = self._gate
        if gate is None or gate.done():  # done: cancelled after all; the later puts get a future of their own
            gate = self._gate = self._running_loop().create_future()
        self._queue_write()
        self._put_keys.append(self.prefix + request_id)
        self._put_values.append(value)
        return gate

    async def mark_emitted(self, request_id: str) -> None:
        """Set the emitted marker; done when Redis stored it, or when it could not (Redis down: counted as
        degraded, at-least-once only); cancelled if the batch was."""
        future: asyncio.Future[None] = self._running_loop().create_future()
        self._queue_write()
        self._mark_keys.append(self.emitted_prefix + request_id)
        self._mark_futures.append(future)
        await future

    def mark_emitted_soon(self, request_id: str) -> None:
        """mark_emitted without waiting: the offset need not wait for it. Until it lands a redelivery
        re-sends every event with its original event id (as after a crash between publish and mark), and
        once the offset is committed there is no redelivery. aclose() waits for the ones still going."""
        self._queue_write()
        self._mark_keys.append(self.emitted_prefix + request_id)

    async def aclose(self) -> None:
        """Wait for the writes still on their way (emitted markers; outcomes nobody waits for, such as
        those of requests cancelled between their call and their events), at most CLOSE_WAIT_S (each is
        bounded by the client's timeouts, unless it was made without them), then close the connection."""
        if self._put_keys or self._mark_keys:  # queued this turn: send them now
            self._flush_sets()
        if self._writing:
            await asyncio.wait(self._writing, timeout=CLOSE_WAIT_S)
        await self.batch.aclose()

    def _queue_write(self) -> None:
        """The first write of a turn schedules the turn's script call."""
        if not self._put_keys and not self._mark_keys:
            self._running_loop().call_soon(self._flush_sets)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _flush_gets(self) -> None:
        gets, self._gets = self._gets, []
        keys = self._lookup_keys([request_id for request_id, _ in gets])
        self.batch.submit("MGET", *keys).add_done_callback(partial(_hand_out_gets, gets))

    def _lookup_keys(self, request_ids: list[str]) -> list[str]:
        """Each request's outcome key and emitted-marker key, in turn (what MGET reads)."""
        keys: list[str] = []
        for request_id in request_ids:
            keys += (self.prefix + request_id, self.emitted_prefix + request_id)
        return keys

    def _flush_sets(self) -> None:
        puts, values, marks, waiting = self._put_keys, self._put_values, self._mark_keys, self._mark_futures
        if not puts and not marks:  # flushed early by aclose()
            return
        self._put_keys, self._put_values, self._mark_keys, self._mark_futures = [], [], [], []
        gate, self._gate = (self._gate if puts else None), None
        n_keys = len(puts) + len(marks)
        reply = self.batch.submit("EVAL", _SET_ALL, n_keys, *puts, *marks, *values, self.ttl_s)
        reply.add_done_callback(partial(self._hand_out_sets, len(puts), len(marks), gate, waiting))
        self._writing.add(reply)  # aclose() waits for it
        reply.add_done_callback(self._writing.discard)

    def _hand_out_sets(
        self,
        puts: int,
        marks: int,
        gate: asyncio.Future[None] | None,
        waiting: list[asyncio.Future[None]],
        reply: asyncio.Future[Any],
    ) -> None:
        exc = None if reply.cancelled() else reply.exception()
        down = exc if isinstance(exc, RedisError | OSError) else None
        if down is not None:  # each write that was not made, puts and emitted marks alike
            for _ in range(puts):
                self._degraded("put", down)
            for _ in range(marks):
                self._degraded("mark_emitted", down)
        for future in (gate, *waiting) if gate is not None else waiting:
            if future.done():  # the caller gave up
                continue
            if reply.cancelled():
                future.cancel()
            elif exc is not None and down is None:
                future.set_exception(exc)
            else:
                future.set_result(None)

    def _degraded(self, op: str, exc: Exception) -> None:
        metrics.labelled(metrics.IDEMPOTENCY_DEGRADED, op).inc()
        log.warning("idempotency store unavailable; at-least-once only", extra={"op": op, "error": str(exc)})


def _stored_outcome(stored: bytes | None, emitted: bytes | None) -> StoredOutcome | None:
    """A request's outcome and emitted marker as MGET read them."""
    return None if stored is None else StoredOutcome(decode_outcome(stored), emitted=emitted == b"1")


def _hand_out_gets(gets: list[tuple[str, asyncio.Future[Any]]], reply: asyncio.Future[Any]) -> None:
    values = reply.result() if not reply.cancelled() and reply.exception() is None else None
    for i, (_, future) in enumerate(gets):
        if future.done():
            continue
        if values is None:
            _fail(future, reply)
        else:
            future.set_result((values[2 * i], values[2 * i + 1]))


def _fail(future: asyncio.Future[Any], reply: asyncio.Future[Any]) -> None:
    if reply.cancelled():
        future.cancel()
    else:
        future.set_exception(reply.exception() or RedisError("no reply"))
