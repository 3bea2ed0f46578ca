"""Outcome -> events, and the only publisher. Each event is serialised once; the bytes are what Redis
stores for idempotent replay and what Kafka gets."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from faststream.kafka import KafkaBroker
from pydantic import BaseModel

from contracts import EventEnvelope

Kind = Literal["result", "cost", "failure", "cache_hit", "cost_alert", "dlq"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    kind: Kind
    topic: str
    key: str | None
    value: bytes
    correlation_id: str

    def to_json(self) -> list[Any]:
        return [self.kind, self.topic, self.key, self.value.decode(), self.correlation_id]

    @classmethod
    def from_json(cls, item: list[Any]) -> Outgoing:
        kind, topic, key, value, correlation_id = item
        return cls(kind, topic, key, value.encode(), correlation_id)


def make_event(
    kind: Kind, topic: str, key: str | None, data: BaseModel, correlation_id: UUID, source_service: str
) -> Outgoing:
    envelope: EventEnvelope[BaseModel] = EventEnvelope[type(data)](  # type: ignore[misc,operator]
        correlation_id=correlation_id, data=data, source_service=source_service
    )
    return Outgoing(kind, topic, key, envelope.model_dump_json().encode(), str(correlation_id))


def make_dlq_record(
    topic: str, raw: bytes | None, error: str, headers: list[tuple[str, bytes]], source: dict[str, Any]
) -> Outgoing:
    """A DLQ record: raw bytes base64, the parse error, the original headers, where it came from."""
    import json

    body = {
        "error": error,
        "raw_base64": base64.b64encode(raw or b"").decode(),
        "headers": [[k, base64.b64encode(v or b"").decode()] for k, v in headers],
        "source": source,
    }
    cid = next((v.decode(errors="replace") for k, v in headers if k == "correlation_id" and v), "")
    return Outgoing("dlq", topic, None, json.dumps(body).encode(), cid)


class Emitter:
    """Publishes through the FastStream broker (acks=all) and waits for every acknowledgement."""

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker

    async def publish(self, messages: list[Outgoing]) -> None:
        if len(messages) == 1:
            await self._send(messages[0])
        else:
            await asyncio.gather(*(self._send(m) for m in messages))

    async def _send(self, m: Outgoing) -> None:
        await self.broker.publish(
            m.value,
            m.topic,
            key=m.key.encode() if m.key is not None else None,
            correlation_id=m.correlation_id or None,
            headers={"content-type": "application/json", "event-kind": m.kind},
        )
