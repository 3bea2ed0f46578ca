"""`llm-worker`: run the worker, send sample comparisons, manage topics."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from typing import Any

import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from contracts import EventEnvelope, LLMComparisonRequestV1
from worker.settings import KafkaSettings

SAMPLE_ESSAYS = (
    (
        "School uniforms help students focus. When everyone wears the same clothes, attention moves from "
        "fashion to learning, and studies of schools that adopted uniforms report fewer disciplinary cases.",
        "uniforms are bad because i dont like them and they are itchy and also expensive for parents",
    ),
    (
        "Homework has value when it is short and purposeful: practice consolidates what was taught in class.",
        "Homework should be abolished. Children need rest, play and family time, and research on young "
        "pupils shows little benefit from long assignments, while stress and inequality grow.",
    ),
    (
        "Cities should invest in cycling lanes, which reduce traffic, cut emissions and improve health.",
        "Cars are important. Many people drive. Roads are for cars so bikes should not be on them.",
    ),
)


def sample_request(i: int, **overrides: Any) -> EventEnvelope[LLMComparisonRequestV1]:
    essay_a, essay_b = SAMPLE_ESSAYS[i % len(SAMPLE_ESSAYS)]
    prompt = f"Compare these two essays.\n\nEssay A:\n{essay_a}\n\nEssay B:\n{essay_b}\n\n(sample {i})"
    data = LLMComparisonRequestV1(
        request_id=f"sample-{uuid.uuid4()}", user_prompt=prompt, metadata={"sample": i}, **overrides
    )
    return EventEnvelope[LLMComparisonRequestV1](correlation_id=uuid.uuid4(), data=data)


async def create_topics(kafka: KafkaSettings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.kafka_bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        topics = kafka.topics
        configured = {
            name: kafka.request_topic_partitions
            if name == topics.comparison_request
            else kafka.topic_partitions
            for name in topics.all()
        }
        wanted = [
            NewTopic(name, configured[name], kafka.topic_replication_factor)
            for name in topics.all()
            if name not in existing
        ]
        if wanted:
            try:
                response = await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
            else:  # errors come per topic, not raised: a refused topic would only show as never led
                refused = [
                    f"{t[0]}: {t[2] if len(t) > 2 and t[2] else for_code(t[1]).__name__}"
                    for t in response.topic_errors
                    if t[1] not in (0, TopicAlreadyExistsError.errno)
                ]
                if refused:
                    raise RuntimeError(f"topics not created: {'; '.join(refused)}")
        if wanted:
            await _until_led(admin, {t.name: t.num_partitions for t in wanted})
        present = [name for name in topics.all() if name in existing]
        short = [
            f"{t['topic']} has {len(t['partitions'])}, {configured[t['topic']]} configured"
            for t in (await admin.describe_topics(present) if present else [])
            if t["error_code"] == 0 and len(t["partitions"]) < configured[t["topic"]]
        ]
        if short:  # e.g. made by the broker's auto-creation (num.partitions) when a client used it first
            raise RuntimeError(
                f"topics exist with fewer partitions than configured: {'; '.join(short)} "
                "(add partitions with kafka-topics.sh --alter, or delete and create them again)"
            )
        for name in topics.all():
            print(f"{name}: {'created' if name not in existing else 'exists'}")
    finally:
        await admin.close()


async def _until_led(admin: AIOKafkaAdminClient, partitions: dict[str, int], timeout_s: float = 30) -> None:
    """Wait until the metadata names a leader for every partition of the new topics. A client using them
    at once may still meet NotLeaderForPartition for a moment (the leader takes the partition up a little
    after the metadata says so); aiokafka retries that."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = await admin.describe_topics(list(partitions))
        led = {
            t["topic"]: sum(1 for p in t["partitions"] if p["error_code"] == 0 and p["leader"] >= 0)
            for t in described
            if t["error_code"] == 0
        }
        if all(led.get(name, 0) >= n for name, n in partitions.items()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics without a leader after {timeout_s:.0f} s: {sorted(partitions)}")
        await asyncio.sleep(0.05)


async def send(kafka: KafkaSettings, count: int, timeout_s: float, bypass_cache: bool) -> int:
    """Publish `count` sample comparisons and wait for their results by correlation id."""
    from rich.progress import Progress

    topics = kafka.topics
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        partitions = consumer.partitions_for_topic(topics.comparison_result) or set()
        if not partitions:
            await consumer._client.force_metadata_update()  # topic may be new
            partitions = consumer.partitions_for_topic(topics.comparison_result) or {0}
        tps = [TopicPartition(topics.comparison_result, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        sent: dict[str, float] = {}
        for i in range(count):
            env = sample_request(i, cache="bypass" if bypass_cache else "use")
            cid = str(env.correlation_id)
            sent[cid] = time.perf_counter()
            await producer.send(
                topics.comparison_request,
                env.model_dump_json().encode(),
                key=(env.data.request_id or cid).encode(),
                headers=[("correlation_id", cid.encode())],
            )
        await producer.flush()
        results: dict[str, tuple[float, dict[str, Any]]] = {}
        deadline = time.monotonic() + timeout_s
        with Progress(disable=count <= 1) as progress:
            bar = progress.add_task("results", total=count)
            while len(results) < count and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        doc = json.loads(record.value)
                        cid = doc.get("correlation_id")
                        if cid in sent and cid not in results:
                            results[cid] = (time.perf_counter() - sent[cid], doc["data"])
                            progress.advance(bar)
        _summarise(count, results)
        return 0 if len(results) == count else 1
    finally:
        await producer.stop()
        await consumer.stop()


def _summarise(count: int, results: dict[str, tuple[float, dict[str, Any]]]) -> None:
    ok = [d for _, d in results.values() if d.get("winner")]
    failed = [d for _, d in results.values() if d.get("error_detail")]
    latencies = sorted(t for t, _ in results.values())
    print(f"sent {count}, results {len(results)}: {len(ok)} completed, {len(failed)} failed")
    for d in ok[:3]:
        print(f"  {d['request_id']}: {d['winner']} (confidence {d['confidence']}): {d['justification']}")
    for d in failed[:3]:
        print(f"  {d['request_id']}: {d['error_detail']['error_code']}: {d['error_detail']['message']}")
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    if len(results) < count:
        print(f"TIMED OUT waiting for {count - len(results)} results", file=sys.stderr)


async def check_provider(name: str, model: str | None) -> int:
    """Send one tiny comparison to a configured provider; print latency and usage, or the error."""
    from contracts import ProviderName
    from worker.errors import ProviderError
    from worker.providers import build_provider
    from worker.providers.base import DEFAULT_SYSTEM_PROMPT, ComparisonCall
    from worker.settings import ProviderSettings

    try:
        provider = build_provider(ProviderName(name), ProviderSettings())
    except ValueError:
        print(f"unknown provider {name!r}", file=sys.stderr)
        return 2
    if provider is None:
        print(f"{name}: not configured (set its API key)", file=sys.stderr)
        return 2
    essay_a, essay_b = SAMPLE_ESSAYS[0]
    call = ComparisonCall(
        provider=name,
        model=model or provider.default_model,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        user_prompt=f"Essay A:\n{essay_a}\n\nEssay B:\n{essay_b}",
    )
    t0 = time.perf_counter()
    try:
        answer = await provider.compare(call)
    except ProviderError as exc:
        details = {k: v for k, v in exc.details.items() if k != "usage"}
        print(
            f"{name} {call.model}: {exc.code.value} after {(time.perf_counter() - t0) * 1000:.0f} ms: "
            f"{exc.message} {details}"
        )
        return 1
    finally:
        await provider.aclose()
    print(
        f"{name} {call.model}: {answer.winner} (confidence {answer.confidence}) in "
        f"{(time.perf_counter() - t0) * 1000:.0f} ms; usage {answer.usage.model_dump()}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-worker")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the worker (same as `faststream run worker.app:app`)")
    p_send = sub.add_parser("send", help="publish N sample comparisons and await their results")
    p_send.add_argument("-n", "--count", type=int, default=10)
    p_send.add_argument("--timeout", type=float, default=60.0)
    p_send.add_argument("--bypass-cache", action="store_true")
    p_topics = sub.add_parser("topics", help="topic management")
    p_topics.add_argument("action", choices=["create"])
    p_providers = sub.add_parser("providers", help="check a real provider with one tiny comparison")
    p_providers.add_argument("action", choices=["test"])
    p_providers.add_argument("name", help="openai, anthropic, google, openrouter or openai_compatible")
    p_providers.add_argument("--model", default=None)
    p_fake = sub.add_parser("fake-server", help="serve the fake provider APIs on loopback")
    p_fake.add_argument("--port", type=int, default=8099)
    p_fake.add_argument("--latency-ms", type=float, default=0.0)
    p_fake.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    if args.command == "run":
        from worker.app import create_worker

        app, runtime = create_worker()
        uvloop.run(app.run())
        return 1 if runtime.failure is not None else 0
    if args.command == "send":
        return asyncio.run(send(KafkaSettings(), args.count, args.timeout, args.bypass_cache))
    if args.command == "topics":
        asyncio.run(create_topics(KafkaSettings()))
        return 0
    if args.command == "providers":
        return asyncio.run(check_provider(args.name, args.model))
    if args.command == "fake-server":
        from worker.fake_server import serve

        try:  # on uvloop like the worker: the stand-in provider should add as little of its own as it can
            uvloop.run(serve(args.port, args.latency_ms, args.host))
        except KeyboardInterrupt:
            pass
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
