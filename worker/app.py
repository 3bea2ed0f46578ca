"""FastStream app and lifespan wiring, nothing else. Run with `faststream run worker.app:app` or
`llm-worker run`."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from faststream import FastStream
from faststream.kafka import KafkaBroker
from prometheus_client import start_http_server
from redis.asyncio import BlockingConnectionPool, Redis

from worker.consume import ConsumeLoop
from worker.emit import Emitter
from worker.handle import Handler
from worker.logs import setup_logging
from worker.orchestrate import Orchestrator
from worker.outcomes import OutcomeStore
from worker.pricing import PriceTable
from worker.providers import build_providers, unconfigured_providers
from worker.providers.base import Provider
from worker.settings import Settings, load_settings

log = logging.getLogger(__name__)


def make_broker(settings: Settings) -> KafkaBroker:
    return KafkaBroker(
        settings.kafka.kafka_bootstrap_servers,
        client_id=settings.kafka.kafka_client_id,
        acks="all",
        linger_ms=1,
        logger=None,
    )


class Runtime:
    """Everything one worker process holds, built on startup and closed on shutdown."""

    def __init__(self, settings: Settings, broker: KafkaBroker) -> None:
        self.settings = settings
        self.broker = broker
        self.providers: dict[str, Provider] = {}
        self.unconfigured_providers: list[str] = []
        self.loop: ConsumeLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._redis: Redis | None = None

    async def start(self) -> None:
        """Build resources and start consuming; the broker must be connected."""
        s = self.settings
        if s.service.metrics_port:
            start_http_server(s.service.metrics_port, addr="127.0.0.1")
        # A blocking pool: with hundreds of requests in flight, callers wait for a connection instead of
        # failing with "Too many connections" (which would silently drop idempotency records).
        pool = BlockingConnectionPool.from_url(
            s.redis.redis_url,
            max_connections=s.redis.redis_max_connections,
            timeout=s.redis.redis_timeout_s,
            socket_timeout=s.redis.redis_timeout_s,
            socket_connect_timeout=s.redis.redis_timeout_s,
        )
        self._redis = Redis.from_pool(pool)
        self.providers = build_providers(s)
        self.unconfigured_providers = unconfigured_providers(s.providers)
        log.info(
            "providers built",
            extra={"providers": sorted(self.providers), "unconfigured": self.unconfigured_providers},
        )
        orchestrator = Orchestrator.from_settings(
            s, self.providers, PriceTable.load(s.service.price_table_path), self._redis
        )
        handler = Handler(
            orchestrator=orchestrator,
            outcomes=OutcomeStore(self._redis, s.redis.redis_key_prefix, s.redis.idempotency_ttl_s),
            emitter=Emitter(self.broker),
            topics=s.kafka.topics,
            service_name=s.service.service_name,
        )
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka.kafka_bootstrap_servers,
            group_id=s.kafka.consumer_group,
            client_id=s.kafka.kafka_client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(StickyPartitionAssignor,),
            max_poll_records=s.flow.max_in_flight,
            session_timeout_ms=s.kafka.kafka_session_timeout_ms,
            heartbeat_interval_ms=s.kafka.kafka_heartbeat_interval_ms,
        )
        await consumer.start()
        self.loop = ConsumeLoop(
            consumer, s.kafka.topics.comparison_request, handler.handle, handler.dead_letter_poison, s.flow
        )
        self._task = asyncio.create_task(self.loop.run())
        log.info("worker consuming", extra={"topic": s.kafka.topics.comparison_request})

    async def stop(self) -> None:
        """Stop fetching, drain in-flight work (bounded), commit, close the consumer and clients."""
        if self.loop is not None and self._task is not None:
            self.loop.stop()
            await self._task
        for provider in self.providers.values():
            await provider.aclose()
        if self._redis is not None:
            await self._redis.aclose()
        log.info("worker stopped")


def create_app(settings: Settings | None = None) -> FastStream:
    settings = settings or load_settings()
    broker = make_broker(settings)
    runtime = Runtime(settings, broker)
    return FastStream(
        broker,
        on_startup=[lambda: setup_logging(settings.service.log_level)],
        after_startup=[runtime.start],
        on_shutdown=[runtime.stop],
        logger=None,
    )


app = create_app()
