"""Coalesce Redis commands issued by concurrent requests into one pipeline per event-loop turn.

With hundreds of requests in flight, a command per request per step costs a pooled-connection checkout,
a round trip and redis-py's per-call overhead each time. Here callers enqueue a command and await its
reply; the first caller of a turn schedules a flush, which sends everything queued so far as one
non-transactional pipeline. A failing command fails only its own caller; a failing pipeline fails all
callers of that flush with the same error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

MAX_BATCH = 512


class RedisBatch:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def execute(self, *command: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((command, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        self._scheduled = False
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            task = asyncio.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command, _ in batch:
                    pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # handed to every caller of this flush
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
