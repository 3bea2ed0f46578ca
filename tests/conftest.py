"""Shared fixtures. Integration tests run against the real local Kafka and Redis started by
deploy/local/infra.sh; when either is missing the run FAILS (never skips)."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from contracts import EventEnvelope, LLMComparisonRequestV1
from worker.cli import create_topics
from worker.settings import (
    CacheSettings,
    FlowSettings,
    KafkaSettings,
    MockSettings,
    ProviderSettings,
    RedisSettings,
    ResilienceSettings,
    ServiceSettings,
    Settings,
    SpendSettings,
)

BOOTSTRAP = "127.0.0.1:9092"
REDIS_URL = "redis://127.0.0.1:6379/0"


def _require(port: int, what: str) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        pytest.fail(f"{what} is not running on 127.0.0.1:{port}: start it with deploy/local/infra.sh up")


@pytest.fixture(scope="session")
def infra() -> None:
    _require(9092, "Kafka")
    _require(6379, "Redis")


@pytest.fixture
def prefix(infra: None) -> str:
    """A fresh topic prefix (and Redis key prefix) per test, so tests never see each other's events."""
    return f"t{uuid.uuid4().hex[:10]}"


def make_settings(prefix: str, partitions: int = 3, **overrides: Any) -> Settings:
    """Settings for a test worker; overrides are setting names (lower case) of any group."""
    groups: dict[str, Any] = {
        "kafka": KafkaSettings,
        "redis": RedisSettings,
        "flow": FlowSettings,
        "service": ServiceSettings,
        "mock": MockSettings,
        "resilience": ResilienceSettings,
        "providers": ProviderSettings,
        "cache": CacheSettings,
        "spend": SpendSettings,
    }
    base: dict[str, dict[str, Any]] = {
        "kafka": {
            "kafka_bootstrap_servers": BOOTSTRAP,
            "topic_prefix": prefix,
            "consumer_group": f"{prefix}-group",
            "request_topic_partitions": partitions,
            "topic_partitions": 1,
        },
        "redis": {"redis_url": REDIS_URL, "redis_key_prefix": prefix},
        "flow": {"commit_interval_ms": 50, "shutdown_grace_seconds": 5, "rebalance_grace_seconds": 2},
        "service": {},
        "mock": {},
        "resilience": {},
        "providers": {},
        "cache": {},
        "spend": {},
    }
    for key, value in overrides.items():
        owner = next(name for name, cls in groups.items() if key in cls.model_fields)
        base[owner][key] = value
    return Settings(**{name: cls(**base[name]) for name, cls in groups.items()})


@pytest.fixture
async def topics_for(infra: None) -> Callable[[Settings], Any]:
    async def create(settings: Settings) -> None:
        await create_topics(settings.kafka)

    return create


def request_envelope(i: int = 0, **data: Any) -> EventEnvelope[LLMComparisonRequestV1]:
    fields: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4()}",
        "user_prompt": f"Essay A: the first essay ({i}).\n\nEssay B: the second essay ({i}).",
    }
    fields.update(data)
    return EventEnvelope[LLMComparisonRequestV1](
        correlation_id=uuid.uuid4(), data=LLMComparisonRequestV1(**fields)
    )


class Kafka:
    """A producer for requests and a reader of every topic of one prefix, from the beginning."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = settings.kafka.topics
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.raw: dict[str, list[Any]] = {}
        self._producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
        self._consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        tps = []
        for name in self.topics.all():
            if name == self.topics.comparison_request:
                continue
            for p in await self._partitions(name):
                tps.append(TopicPartition(name, p))
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._reader = asyncio.create_task(self._read())

    async def _partitions(self, topic: str) -> set[int]:
        for _ in range(50):
            parts = self._consumer.partitions_for_topic(topic)
            if parts:
                return parts
            await self._consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise AssertionError(f"topic {topic} has no partitions")

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            for tp, records in batch.items():
                for r in records:
                    self.raw.setdefault(tp.topic, []).append(r)
                    self.events.setdefault(tp.topic, []).append(json.loads(r.value))

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
        await self._producer.stop()
        await self._consumer.stop()

    async def send(self, env: EventEnvelope[Any], topic: str | None = None) -> Any:
        return await self.send_raw(
            env.model_dump_json().encode(),
            key=getattr(env.data, "request_id", None),
            correlation_id=str(env.correlation_id),
            topic=topic,
        )

    async def send_raw(
        self,
        value: bytes,
        key: str | None = None,
        correlation_id: str | None = None,
        topic: str | None = None,
    ) -> Any:
        """Publish and wait for the broker's ack; returns the RecordMetadata (partition, offset)."""
        headers = [("correlation_id", correlation_id.encode())] if correlation_id else []
        return await self._producer.send_and_wait(
            topic or self.topics.comparison_request,
            value,
            key=key.encode() if key else None,
            headers=headers,
        )

    def of(self, topic: str) -> list[dict[str, Any]]:
        return self.events.get(topic, [])

    async def caught_up(self, timeout_s: float = 10) -> None:
        """Until every topic is read up to its end as of this call: an event absent then was not on Kafka
        (acknowledged) when it was called. For "nothing else arrived" checks, which otherwise pass when
        the reader lags behind."""
        tps = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            behind = [tp for tp in tps if await self._consumer.position(tp) < ends[tp]]
            if not behind:
                return
            if loop.time() > deadline:
                raise AssertionError(f"reader still behind on {behind} after {timeout_s}s")
            await asyncio.sleep(0.05)

    async def wait_for(
        self,
        topic: str,
        count: int,
        timeout_s: float = 30,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Wait until `count` events (matching `where`) are on `topic`; fail with what arrived otherwise."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            found = [e for e in self.of(topic) if where is None or where(e)]
            if len(found) >= count:
                return found
            if loop.time() > end:
                raise AssertionError(f"{len(found)}/{count} events on {topic} after {timeout_s}s")
            await asyncio.sleep(0.05)


@pytest.fixture
async def kafka_for() -> AsyncIterator[Callable[[Settings], Any]]:
    started: list[Kafka] = []

    async def make(settings: Settings) -> Kafka:
        k = Kafka(settings)
        await k.start()
        started.append(k)
        return k

    yield make
    for k in started:
        await k.stop()


@asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Any]:
    """An in-process worker: the same Runtime the FastStream app runs, on the real broker and Redis."""
    from worker.app import Runtime, make_broker

    broker = make_broker(settings)
    await broker.start()
    runtime = Runtime(settings, broker)
    await runtime.start()
    try:
        assert runtime.loop is not None
        await asyncio.wait_for(runtime.loop.assigned.wait(), 30)
        yield runtime
    finally:
        await runtime.stop()
        await broker.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(settings: Settings, **extra: Any) -> dict[str, str]:
    """Environment for a `llm-worker run` subprocess equivalent to `settings` plus `extra` overrides."""
    import os

    env = dict(os.environ)
    for group in (settings.kafka, settings.redis, settings.flow, settings.service, settings.mock):
        for name, value in group.model_dump(mode="json").items():
            if value is not None:
                env[name.upper()] = str(value)
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env


class WorkerProcess:
    """A real worker process (`python -m worker.cli run`), logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Any) -> None:
        import subprocess
        import sys

        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_assigned(self, timeout_s: float = 30) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while "partitions assigned" not in self.log_text():
            if self.proc.poll() is not None or loop.time() > end:
                raise AssertionError(f"worker never got partitions:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout_s: float = 30) -> int:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while (code := self.proc.poll()) is None:
            if loop.time() > end:
                raise AssertionError("worker did not exit")
            await asyncio.sleep(0.05)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


async def committed_offsets(settings: Settings, partitions: int) -> dict[int, int | None]:
    """The consumer group's committed offset of each request-topic partition."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=BOOTSTRAP, group_id=settings.kafka.consumer_group, enable_auto_commit=False
    )
    await reader.start()
    try:
        topic = settings.kafka.topics.comparison_request
        return {p: await reader.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await reader.stop()
