"""Issue 5: 20 identical concurrent requests spread over two real worker processes (`llm-worker run`) cause
one provider call and 20 results, 19 of them marked as answered by the cache or an in-flight call."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.asyncio import Redis

from contracts import LLMComparisonRequestV1
from tests.conftest import REDIS_URL, WorkerProcess, make_settings, request_envelope, worker_env
from worker.cache import make_cache_key
from worker.orchestrate import Orchestrator
from worker.pricing import PriceTable
from worker.providers import build_providers
from worker.settings import Settings

PROMPT = "Essay A: trains are better than planes.\n\nEssay B: planes are better than trains."


def latest_assignment(worker: WorkerProcess) -> set[int] | None:
    lines = [json.loads(x) for x in worker.log_text().splitlines() if '"partitions assigned"' in x]
    return set(lines[-1]["partitions"]) if lines else None


async def until_split(workers: list[WorkerProcess], partitions: int, timeout_s: float = 60) -> None:
    """Until every partition is owned and each worker owns some (the group has settled)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        owned = [latest_assignment(w) for w in workers]
        if (
            all(owned)
            and set().union(*owned) == set(range(partitions))
            and sum(map(len, owned)) == partitions
        ):  # type: ignore[arg-type]
            return
        if loop.time() > end or any(w.proc.poll() is not None for w in workers):
            raise AssertionError(f"partitions never split over the workers: {owned}")
        await asyncio.sleep(0.1)


async def test_twenty_identical_requests_over_two_processes_make_one_call(
    prefix, topics_for, kafka_for, tmp_path
) -> None:
    partitions = 4
    settings = make_settings(prefix, partitions=partitions, mock_latency_ms=1500)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    env = worker_env(settings, single_flight_poll_ms=50)
    workers = [WorkerProcess(env, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        await until_split(workers, partitions)
        envelopes = [request_envelope(user_prompt=PROMPT) for _ in range(20)]
        metas = await asyncio.gather(*(kafka.send(e) for e in envelopes))
        results = await kafka.wait_for(kafka.topics.comparison_result, 20)
        await kafka.wait_for(kafka.topics.cache_hit, 19)
    finally:
        for w in workers:
            w.kill()
    owners = [latest_assignment(w) or set() for w in workers]
    used = {m.partition for m in metas}
    assert all(owned & used for owned in owners), "the requests did not reach both processes"
    data: dict[str, Any] = {r["data"]["request_id"]: r["data"] for r in results}
    assert set(data) == {e.data.request_id for e in envelopes}
    assert all(d["winner"] for d in data.values())
    assert len({(d["winner"], d["justification"]) for d in data.values()}) == 1
    costs = kafka.of(kafka.topics.cost_tracking)
    assert len(costs) == 1, "more than one provider call"
    [leader] = [d for d in data.values() if d["request_metadata"]["cache"] != "hit"]
    assert leader["request_id"] == costs[0]["data"]["request_id"]
    hits = [d["request_metadata"] for d in data.values() if d["request_metadata"]["cache"] == "hit"]
    assert len(hits) == 19
    assert (
        sum(h.get("single_flight_scope") == "replica" for h in hits) == 1
    )  # the other process waited on the lease
    assert all(d["cost_estimate"] == 0.0 for d in data.values() if d is not leader)


async def send_to(kafka: Any, env: Any, partition: int) -> None:
    await kafka._producer.send_and_wait(
        kafka.topics.comparison_request,
        env.model_dump_json().encode(),
        key=env.data.request_id.encode(),
        partition=partition,
        headers=[("correlation_id", str(env.correlation_id).encode())],
    )


async def test_when_the_leading_process_dies_its_lease_expires_and_a_waiter_takes_over(
    prefix, topics_for, kafka_for, tmp_path
) -> None:
    settings = make_settings(
        prefix,
        partitions=2,
        mock_latency_ms=2000,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=500,
    )
    await topics_for(settings)
    kafka = await kafka_for(settings)
    env = worker_env(settings, single_flight_lease_ms=2000, single_flight_poll_ms=50)
    workers = [WorkerProcess(env, tmp_path / f"w{i}.log") for i in range(2)]
    redis = Redis.from_url(REDIS_URL)
    try:
        await until_split(workers, 2)
        [p0], [p1] = (sorted(latest_assignment(w) or ()) for w in workers)
        first, second = request_envelope(user_prompt=PROMPT), request_envelope(user_prompt=PROMPT)
        await send_to(kafka, first, p0)
        await until_leased(redis, lease_key(settings, first.data))  # worker 0 calls and holds the lease
        await send_to(kafka, second, p1)
        # Worker 1 needs a moment to fetch the request and find the lease taken; the assertion on its
        # response time below fails if it led without waiting.
        await asyncio.sleep(0.5)
        workers[0].kill()
        results = await kafka.wait_for(kafka.topics.comparison_result, 2, timeout_s=45)
    finally:
        for w in workers:
            w.kill()
        await redis.aclose()
    data = {r["data"]["request_id"]: r["data"] for r in results}
    took_over, redelivered = data[second.data.request_id], data[first.data.request_id]
    assert took_over["request_metadata"]["cache"] == "miss"
    assert took_over["response_time_ms"] >= 3000  # waited out the dead leader's lease, then called (2 s)
    assert redelivered["request_metadata"]["cache"] == "hit"
    [cost] = kafka.of(kafka.topics.cost_tracking)
    assert cost["data"]["request_id"] == second.data.request_id


def lease_key(settings: Settings, request: LLMComparisonRequestV1) -> str:
    """The single-flight lease key of a request, as the worker makes it: looked up directly, since a SCAN
    for it takes seconds over the millions of keys benchmarks leave in a developer's Redis."""
    orchestrator = Orchestrator.from_settings(settings, build_providers(settings), PriceTable.load(), None)
    return f"{make_cache_key(orchestrator.resolve(request), settings.redis.redis_key_prefix)}:lease"


async def until_leased(redis: Redis, key: str, timeout_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not await redis.exists(key):
        if loop.time() > end:
            raise AssertionError("no single-flight lease was taken")
        await asyncio.sleep(0.02)
