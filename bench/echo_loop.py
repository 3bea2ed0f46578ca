"""The baseline: a bare aiokafka consume-then-produce loop (no validation, no Redis, no provider).
Reads the request topic in a consumer group, copies each value to the result topic, awaits the acks,
commits, repeats. Usage: python bench/echo_loop.py REQUEST_TOPIC RESULT_TOPIC GROUP"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def main(request_topic: str, result_topic: str, group: str) -> None:
    consumer = AIOKafkaConsumer(
        request_topic,
        bootstrap_servers="127.0.0.1:9092",
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9092", acks="all", linger_ms=1)
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
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
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
