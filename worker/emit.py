"""Outcome -> events, and the only publisher. Each event is serialised once; the bytes are what Redis
stores for idempotent replay and what Kafka gets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import uuid
from collections import deque
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

Kind = Literal["result", "cost", "failure", "cache_hit", "cost_alert", "dlq"]


class Outgoing:
    """One event ready for Kafka: topic, key, serialised value, correlation id."""

    __slots__ = ("correlation_id", "key", "kind", "topic", "value")

    def __init__(self, kind: Kind, topic: str, key: str | None, value: bytes, correlation_id: str) -> None:
        self.kind = kind
        self.topic = topic
        self.key = key
        self.value = value
        self.correlation_id = correlation_id

    def to_json(self) -> list[Any]:
        return [self.kind, self.topic, self.key, self.value.decode(), self.correlation_id]

    @classmethod
    def from_json(cls, item: list[Any]) -> Outgoing:
        kind, topic, key, value, correlation_id = item
        return cls(kind, topic, key, value.encode(), correlation_id)


def make_event(
    kind: Kind, topic: str, key: str | None, data: BaseModel, correlation_id: UUID, source_service: str
) -> Outgoing:
    """Serialise `data` in an EventEnvelope. The envelope's own fields are written directly around the
    data's JSON (same shape as `EventEnvelope[T].model_dump_json()`, checked by a test) so the hot path
    validates and serialises each event exactly once."""
    now = datetime.now(UTC).isoformat()
    cid = str(correlation_id)
    value = (
        f'{{"event_id":"{uuid.uuid4()}","event_type":"{type(data).__name__}","event_timestamp":"{now}",'
        f'"source_service":{_json_str(source_service)},"schema_version":1,'
        f'"correlation_id":"{cid}","data":{data.model_dump_json()},"metadata":{{}}}}'
    ).encode()
    return Outgoing(kind, topic, key, value, cid)


@functools.lru_cache(maxsize=16)
def _json_str(text: str) -> str:
    return json.dumps(text)


def make_dlq_record(
    topic: str, raw: bytes | None, error: str, headers: list[tuple[str, bytes]], source: dict[str, Any]
) -> Outgoing:
    """A DLQ record: raw bytes base64, the parse error, the original headers, where it came from."""
    body = {
        "error": error,
        "raw_base64": base64.b64encode(raw or b"").decode(),
        "headers": [[k, base64.b64encode(v or b"").decode()] for k, v in headers],
        "source": source,
    }
    cid = next((v.decode(errors="replace") for k, v in headers if k == "correlation_id" and v), "")
    return Outgoing("dlq", topic, None, json.dumps(body).encode(), cid)


class Emitter:
    """Publishes with acks=all and waits for every acknowledgement.

    All sends go through one pump task. aiokafka's `send()` called from hundreds of tasks at once makes
    every caller wait and retry on the same full batch (measured here: 490 us CPU per message with 1000
    concurrent senders vs 41 us from a single sender), so callers enqueue and await a future instead.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._pending: deque[tuple[Outgoing, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None

    async def publish(self, messages: list[Outgoing]) -> None:
        if self._pump_task is None:
            self._pump_task = asyncio.create_task(self._pump())
        loop = asyncio.get_running_loop()
        futures = []
        for m in messages:
            future: asyncio.Future[None] = loop.create_future()
            self._pending.append((m, future))
            futures.append(future)
        self._wake.set()
        if len(futures) == 1:
            await futures[0]
        else:
            await asyncio.gather(*futures)

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                m, future = self._pending.popleft()
                headers = [("correlation_id", m.correlation_id.encode()), ("event-kind", m.kind.encode())]
                try:
                    delivery = await self.producer.send(
                        m.topic, m.value, key=m.key.encode() if m.key is not None else None, headers=headers
                    )
                except Exception as exc:  # handed to the waiting caller, which fails its request
                    if not future.done():
                        future.set_exception(exc)
                    continue
                delivery.add_done_callback(functools.partial(_settle, future))

    async def aclose(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task


def _settle(future: asyncio.Future[None], delivery: asyncio.Future[Any]) -> None:
    if future.done():
        return
    if delivery.cancelled():
        future.cancel()
    elif (exc := delivery.exception()) is not None:
        future.set_exception(exc)
    else:
        future.set_result(None)
