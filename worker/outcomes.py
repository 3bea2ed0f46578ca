"""Idempotent redelivery: the terminal outcome of each request, stored in Redis under its request_id.

Order per request: put(outcome events) -> publish them -> mark_emitted -> offset may be committed.
A redelivered request finds its record: if it was emitted, only the result is re-sent (no second
cost-tracking event); if the crash came between put and mark_emitted, everything is sent again with the
same event ids, so consumers can drop the copy. With Redis down the store answers "unknown" and the worker
falls back to plain at-least-once, counted in llm_worker_idempotency_degraded_total.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker import metrics
from worker.emit import Outgoing
from worker.redis_batch import RedisBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    messages: list[Outgoing]
    emitted: bool

    def to_replay(self) -> list[Outgoing]:
        if self.emitted:
            return [m for m in self.messages if m.kind == "result"]
        return self.messages


class OutcomeStore:
    """Two keys per request, both with the TTL: `<prefix>:outcome:<id>` = the outcome's events, and
    `<prefix>:emitted:<id>` = "1" once Kafka acknowledged them. Three commands per request (MGET, SET,
    SET), sent through a RedisBatch so concurrent requests share round trips."""

    def __init__(self, redis: Redis, prefix: str, ttl_s: int) -> None:
        self.batch = RedisBatch(redis)
        self.prefix = f"{prefix}:outcome:"
        self.emitted_prefix = f"{prefix}:emitted:"
        self.ttl_s = ttl_s

    async def get(self, request_id: str) -> StoredOutcome | None:
        try:
            stored, emitted = await self.batch.execute(
                "MGET", self.prefix + request_id, self.emitted_prefix + request_id
            )
        except (RedisError, OSError) as exc:
            self._degraded("get", exc)
            return None
        if stored is None:
            return None
        messages = [Outgoing.from_json(item) for item in json.loads(stored)]
        return StoredOutcome(messages, emitted=emitted == b"1")

    async def put(self, request_id: str, messages: list[Outgoing]) -> None:
        """Store the events before publishing them."""
        value = json.dumps([m.to_json() for m in messages])
        try:
            await self.batch.execute("SET", self.prefix + request_id, value, "EX", self.ttl_s)
        except (RedisError, OSError) as exc:
            self._degraded("put", exc)

    async def mark_emitted(self, request_id: str) -> None:
        try:
            await self.batch.execute("SET", self.emitted_prefix + request_id, "1", "EX", self.ttl_s)
        except (RedisError, OSError) as exc:
            self._degraded("mark_emitted", exc)

    def _degraded(self, op: str, exc: Exception) -> None:
        metrics.IDEMPOTENCY_DEGRADED.labels(op).inc()
        log.warning("idempotency store unavailable; at-least-once only", extra={"op": op, "error": str(exc)})
