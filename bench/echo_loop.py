"""The baseline: a bare aiokafka consume-then-produce loop (no validation, no Redis, no provider).
Reads the request topic in a consumer group, copies each value to the result topic and awaits the acks,
repeats; commits what it copied every 200 ms in the background. Usage: python bench/echo_loop.py
REQUEST_TOPIC RESULT_TOPIC GROUP

It runs as the worker does where that is not the worker's own work: on uvloop, with linger_ms=0, and
with the offset commit off the path from fetch to publish (the worker commits every COMMIT_INTERVAL_MS,
200 ms by default). Before November 24 it ran on asyncio, lingered 1 ms, and committed after every batch
before fetching again: in alternating runs that baseline was 3-10 % slower in scenario B (11 529 and
12 258 msg/s against 12 908 and 12 551) and its p99 in scenario C was 29.7 and 29.6 ms against 11.2 and
5.0 ms (p50 19 against 3-4 ms), so the worker's latency was compared with a slower loop than a bare one."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

COMMIT_INTERVAL_S = 0.2


async def main(request_topic: str, result_topic: str, group: str) -> None:
    consumer = AIOKafkaConsumer(
        request_topic,
        bootstrap_servers="127.0.0.1:9092",
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9092", acks="all", linger_ms=0)
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    copied: dict[TopicPartition, int] = {}  # next offset per partition, past what Kafka acknowledged

    async def commit_periodically() -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            if copied:
                await consumer.commit(dict(copied))

    committer = asyncio.create_task(commit_periodically())
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=1000)
            futures = [
                await producer.send(result_topic, r.value, key=r.key)
                for records in batch.values()
                for r in records
            ]
            if futures:
                await asyncio.gather(*futures)
                for tp, records in batch.items():
                    copied[tp] = records[-1].offset + 1
    finally:
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        if copied:
            await consumer.commit(dict(copied))
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    uvloop.run(main(*sys.argv[1:4]))
