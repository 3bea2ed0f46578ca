"""FastStream app and lifespan wiring, nothing else. Run with `faststream run worker.app:app` or
`llm-worker run`."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from faststream import FastStream
from faststream.kafka import KafkaBroker
from redis.asyncio import BlockingConnectionPool, Redis

from worker.cache import AnswerCache, RedisGuard
from worker.consume import ConsumeLoop, rebalance_timeout_ms
from worker.emit import Emitter
from worker.handle import Handler
from worker.logs import setup_logging
from worker.orchestrate import Orchestrator
from worker.outcomes import OutcomeStore
from worker.pipeline import Pipeline
from worker.pricing import PriceTable
from worker.probes import start_probe_server
from worker.providers import build_providers, unconfigured_providers
from worker.providers.base import Provider
from worker.settings import Settings, load_settings
from worker.spend import SpendTracker

log = logging.getLogger(__name__)


def make_broker(settings: Settings) -> KafkaBroker:
    """The FastStream broker hosts the app's lifecycle (CLI, signals, hooks). It subscribes to nothing and
    publishes nothing: FastStream's subscriber awaits one message at a time and commits everything read,
    so consume.py drives its own consumer and emit.py its own producer (see their docstrings)."""
    return KafkaBroker(
        settings.kafka.kafka_bootstrap_servers,
        client_id=settings.kafka.kafka_client_id,
        consumer_only=True,
        logger=None,
    )


class Runtime:
    """Everything one worker process holds, built on startup and closed on shutdown."""

    def __init__(
        self, settings: Settings, broker: KafkaBroker, on_fatal: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.broker = broker
        #: Called when the consume loop died (the app's exit): a process that consumes nothing must not
        #: look alive. The error is kept in `failure`, and `llm-worker run` exits 1.
        self.on_fatal = on_fatal
        self.failure: BaseException | None = None
        self.providers: dict[str, Provider] = {}
        self.unconfigured_providers: list[str] = []
        self.loop: ConsumeLoop | None = None
        self.orchestrator: Orchestrator | None = None
        self._task: asyncio.Task[None] | None = None
        self._redis: Redis | None = None
        self._producer: AIOKafkaProducer | None = None
        self._probes: web.AppRunner | None = None
        self.emitter: Emitter | None = None
        self.outcomes: OutcomeStore | None = None
        self.redis_guard: RedisGuard | None = None
        self.cache: AnswerCache | None = None

    async def health(self) -> dict[str, str]:
        """Readiness: "healthy", or "degraded" while Redis is unreachable (the cache answers from its
        local layer, spend is not counted). Probes Redis when its retry time has come. Also lists the
        real providers without an API key (their requests fail fast with CONFIGURATION_ERROR)."""
        if self.redis_guard is None or self._redis is None:
            return {"status": "starting", "redis": "unknown"}
        await self.redis_guard.probe(self._redis.ping)
        status = self.redis_guard.status
        unconfigured = ",".join(self.unconfigured_providers)
        return {"status": status, "redis": status, "unconfigured_providers": unconfigured}

    async def readiness(self) -> dict[str, Any]:
        """health() plus the consumer's state: owned partitions, requests in flight, paused or not."""
        report: dict[str, Any] = dict(await self.health())
        if self.loop is None or not self.loop.assigned.is_set():  # not in the consumer group yet
            report["status"] = "starting"
        if self.loop is not None:
            report.update(
                partitions=sorted(tp.partition for tp in self.loop.trackers),
                in_flight=self.loop.in_flight,
                paused=self.loop.paused,
            )
        return report

    async def start(self) -> None:
        """Build resources and start consuming; the broker must be connected."""
        s = self.settings
        if s.service.metrics_port:
            self._probes = await start_probe_server(
                s.service.metrics_host, s.service.metrics_port, self.readiness
            )
        # A blocking pool: with hundreds of requests in flight, callers wait for a connection instead of
        # failing with "Too many connections" (which would silently drop idempotency records).
        pool = BlockingConnectionPool.from_url(
            s.redis.redis_url,
            max_connections=s.redis.redis_max_connections,
            timeout=s.redis.redis_pool_timeout_s,
            socket_timeout=s.redis.redis_timeout_s,
            socket_connect_timeout=s.redis.redis_timeout_s,
        )
        self._redis = Redis.from_pool(pool)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka.kafka_bootstrap_servers,
            client_id=s.kafka.kafka_client_id,
            acks="all",
            enable_idempotence=True,
            # No linger: the Emitter batches per loop turn, and while a produce request is in flight the
            # next batches fill up anyway.
            linger_ms=0,
            # The Emitter fills one batch per partition per turn; a full batch makes the next one for that
            # partition wait a produce round trip, so batches may be large (the broker accepts up to 1 MB).
            max_batch_size=512 * 1024,
        )
        await self._producer.start()
        self.emitter = Emitter(self._producer)
        # The topics every answered request writes, asked for while the consumer joins its group: rounds for
        # a topic without metadata wait for it in a chain beside the pump (Emitter._send).
        self.emitter.prefetch_soon([s.kafka.topics.comparison_result, s.kafka.topics.cost_tracking])
        self.providers = build_providers(s)
        self.unconfigured_providers = unconfigured_providers(s.providers)
        log.info(
            "providers built",
            extra={"providers": sorted(self.providers), "unconfigured": self.unconfigured_providers},
        )
        self.orchestrator = orchestrator = Orchestrator.from_settings(
            s, self.providers, PriceTable.load(s.service.price_table_path), self._redis
        )
        prefix = s.redis.redis_key_prefix
        self.redis_guard = RedisGuard(s.cache.cache_redis_retry_s)
        self.cache = AnswerCache(self._redis, s.cache, prefix, self.redis_guard)
        if s.cache.cache_enabled:
            self.cache.start()
        self.outcomes = OutcomeStore(self._redis, s.redis.redis_key_prefix, s.redis.idempotency_ttl_s)
        handler = Handler(
            orchestrator=orchestrator,
            outcomes=self.outcomes,
            emitter=self.emitter,
            topics=s.kafka.topics,
            service_name=s.service.service_name,
            cache=self.cache,
            spend=SpendTracker(self._redis, s.spend, prefix, self.redis_guard),
        )
        rebalance_ms = rebalance_timeout_ms(
            s.flow, s.kafka.kafka_heartbeat_interval_ms, s.kafka.kafka_session_timeout_ms
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
            rebalance_timeout_ms=rebalance_ms,
            # A JoinGroup is answered when the rebalance completes: the client must wait that long for it.
            request_timeout_ms=max(40_000, rebalance_ms + 5_000),
            fetch_max_wait_ms=s.kafka.kafka_fetch_max_wait_ms,
        )
        await consumer.start()
        self.loop = ConsumeLoop(
            consumer,
            s.kafka.topics.comparison_request,
            handler.handle,
            handler.dead_letter_poison,
            s.flow,
            start=Pipeline(handler).start,
        )
        self._task = asyncio.create_task(self.loop.run())
        self._task.add_done_callback(self._loop_ended)
        gc.freeze()  # startup objects (modules, schemas) leave the collector: shorter gen-2 pauses
        # Young collections every 20 000 net allocations instead of 700: with hundreds of requests in flight
        # the default spent ~10 % of the worker's CPU in the collector (bench B: 1.2 s of 12 s -> 0.09 s).
        gc.set_threshold(20_000, 20, 10)
        log.info("worker consuming", extra={"topic": s.kafka.topics.comparison_request})

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is None:
            return
        self.failure = error
        log.critical("consume loop failed; the worker stops", exc_info=error)
        if self.on_fatal is not None:
            self.on_fatal()

    async def stop(self) -> None:
        """Stop fetching, drain in-flight work (bounded), commit, close the consumer and clients."""
        if self.loop is not None and self._task is not None:
            self.loop.stop()
            await asyncio.wait([self._task])  # a loop that failed was reported by _loop_ended
        if self.emitter is not None:
            await self.emitter.aclose()
        if self._producer is not None:
            await self._producer.stop()  # flushes anything still buffered
        if self.orchestrator is not None:
            await self.orchestrator.aclose()  # flushes queued limiter corrections, closes the providers
        if self.cache is not None:
            await self.cache.aclose()
        if self.outcomes is not None:
            await self.outcomes.aclose()  # waits for its writes (up to 5 s), closes its own connection
        if self._redis is not None:
            await self._redis.aclose()
        if self._probes is not None:
            await self._probes.cleanup()
        log.info("worker stopped")


def create_worker(settings: Settings | None = None) -> tuple[FastStream, Runtime]:
    settings = settings or load_settings()
    broker = make_broker(settings)
    runtime = Runtime(settings, broker)
    app = FastStream(
        broker,
        on_startup=[lambda: setup_logging(settings.service.log_level)],
        after_startup=[runtime.start],
        on_shutdown=[runtime.stop],
        logger=None,
    )
    runtime.on_fatal = app.exit
    return app, runtime


def create_app(settings: Settings | None = None) -> FastStream:
    return create_worker(settings)[0]


app = create_app()
