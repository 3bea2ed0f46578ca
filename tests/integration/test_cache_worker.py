"""Issue 5 through the worker on the real broker and Redis: cache hits (result at cost 0 plus an
LLMCacheHitV1, no cost event), bypass and refresh, the global switch, budgets and cost alerts."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from tests.conftest import REDIS_URL, make_settings, request_envelope, running_worker

PROMPT = "Essay A: cats are great.\n\nEssay B: dogs are great."


def same(**data: Any) -> Any:
    """A request identical in everything that changes the answer; new request and correlation ids."""
    return request_envelope(user_prompt=PROMPT, **data)


async def test_identical_request_is_answered_from_the_cache(prefix, topics_for, kafka_for) -> None:
    settings = make_settings(prefix)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    first, second = same(user_id="u1", metadata={"n": 1}), same(user_id="u2", organization_id="o2")
    async with running_worker(settings) as runtime:
        await kafka.send(first)
        await kafka.wait_for(kafka.topics.comparison_result, 1)
        await kafka.send(second)
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
        [hit] = await kafka.wait_for(kafka.topics.cache_hit, 1)
        calls = runtime.providers["mock"].calls
    by_id = {r["data"]["request_id"]: r["data"] for r in results}
    original, cached = by_id[first.data.request_id], by_id[second.data.request_id]
    assert calls == 1
    assert original["request_metadata"]["cache"] == "miss"
    assert cached["request_metadata"]["cache"] == "hit"
    assert cached["request_metadata"]["cache_layer"] == "local"
    assert cached["cost_estimate"] == 0.0
    assert (cached["winner"], cached["justification"]) == (original["winner"], original["justification"])
    assert hit["data"]["request_id"] == second.data.request_id
    assert hit["data"]["organization_id"] == "o2"
    assert hit["data"]["tokens_saved"] == original["token_usage"]["total_tokens"]
    assert hit["data"]["cache_key"].startswith(f"{prefix}:cache:v2:")
    costs = kafka.of(kafka.topics.cost_tracking)
    assert [c["data"]["request_id"] for c in costs] == [first.data.request_id]


async def test_another_process_finds_the_answer_in_redis(prefix, topics_for, kafka_for) -> None:
    settings = make_settings(prefix)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings):
        await kafka.send(same())
        await kafka.wait_for(kafka.topics.comparison_result, 1)
    async with running_worker(settings) as fresh:  # empty local layer
        await kafka.send(same())
        [hit] = await kafka.wait_for(kafka.topics.cache_hit, 1)
        assert fresh.providers["mock"].calls == 0
    assert hit["data"]["cache_layer"] == "redis"


async def test_bypass_neither_reads_nor_writes_the_cache(prefix, topics_for, kafka_for) -> None:
    settings = make_settings(prefix)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        await kafka.send(same(cache="bypass"))
        await kafka.wait_for(kafka.topics.comparison_result, 1)
        await kafka.send(same(cache="bypass"))
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
        await kafka.send(same())  # nothing was written, so a miss
        await kafka.wait_for(kafka.topics.comparison_result, 3)
        calls = runtime.providers["mock"].calls
    assert calls == 3
    assert [r["data"]["request_metadata"]["cache"] for r in results] == ["bypass", "bypass"]
    assert kafka.of(kafka.topics.cache_hit) == []
    assert len(kafka.of(kafka.topics.cost_tracking)) == 3


async def test_refresh_calls_the_provider_and_the_next_request_hits(prefix, topics_for, kafka_for) -> None:
    settings = make_settings(prefix)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        await kafka.send(same())
        await kafka.wait_for(kafka.topics.comparison_result, 1)
        await kafka.send(same(cache="refresh"))
        await kafka.wait_for(kafka.topics.comparison_result, 2)
        await kafka.send(same())
        await kafka.wait_for(kafka.topics.cache_hit, 1)
        calls = runtime.providers["mock"].calls
    assert calls == 2
    assert len(kafka.of(kafka.topics.cost_tracking)) == 2


async def test_caching_disabled_globally_calls_the_provider_every_time(prefix, topics_for, kafka_for) -> None:
    settings = make_settings(prefix, cache_enabled=False)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        for n in range(1, 3):
            await kafka.send(same())
            await kafka.wait_for(kafka.topics.comparison_result, n)
        calls = runtime.providers["mock"].calls
    assert calls == 2
    assert kafka.of(kafka.topics.cache_hit) == []


async def test_budget_stops_the_request_before_the_provider_call(
    prefix, topics_for, kafka_for, tmp_path
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"mock-comparator-1": {"input": 1000.0, "output": 1000.0}}}))
    # At 1000 USD / 1M tokens a call is estimated at ~0.09 USD (its prompt) and costs 0.13..0.19 USD
    # (~90 prompt + 40..99 completion tokens): the first fits a 0.15 budget, the second would exceed it.
    settings = make_settings(prefix, price_table_path=str(prices), org_budget_usd=0.15)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings) as runtime:
        await kafka.send(request_envelope(1, organization_id="org1"))
        await kafka.wait_for(kafka.topics.comparison_result, 1)
        await kafka.send(request_envelope(2, organization_id="org1"))
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
        calls = runtime.providers["mock"].calls
    assert calls == 1
    refused = results[1]["data"]
    assert refused["error_detail"]["error_code"] == "LLM_COST_LIMIT_EXCEEDED"
    assert refused["error_detail"]["details"]["retryable"] is False
    assert refused["cost_estimate"] == 0.0
    assert len(kafka.of(kafka.topics.cost_tracking)) == 1


async def test_cost_alert_is_emitted_once_when_the_threshold_is_crossed(
    prefix, topics_for, kafka_for, tmp_path
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"mock-comparator-1": {"input": 1000.0, "output": 1000.0}}}))
    settings = make_settings(prefix, price_table_path=str(prices), org_cost_alert_threshold_usd=0.25)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    async with running_worker(settings):
        for n in range(1, 5):  # 0.13..0.19 USD each: the second call crosses 0.25
            await kafka.send(request_envelope(n, organization_id="org1"))
            await kafka.wait_for(kafka.topics.comparison_result, n)
        await kafka.wait_for(kafka.topics.cost_tracking, 4)
    [alert] = kafka.of(kafka.topics.cost_alert)
    assert alert["event_type"] == "LLMCostAlertV1"
    assert (alert["data"]["scope"], alert["data"]["organization_id"]) == ("organization", "org1")
    assert alert["data"]["spend_usd"] >= 0.25
    assert kafka.raw[kafka.topics.cost_alert][0].key == b"org1"


async def test_a_crash_before_the_outcome_was_stored_replays_the_calls_cost_from_the_cache(
    prefix, topics_for, kafka_for
) -> None:
    settings = make_settings(prefix)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    env = same(organization_id="org1")
    request_id = env.data.request_id
    redis = Redis.from_url(REDIS_URL)
    try:
        async with running_worker(settings) as runtime:
            await kafka.send(env)
            await kafka.wait_for(kafka.topics.comparison_result, 1)
            # As if the worker died after the call stored its answer, before the outcome was recorded.
            await redis.delete(f"{prefix}:outcome:{request_id}", f"{prefix}:emitted:{request_id}")
            await kafka.send(env)
            results = await kafka.wait_for(kafka.topics.comparison_result, 2)
            costs = await kafka.wait_for(kafka.topics.cost_tracking, 2)
            await kafka.caught_up()  # for the cache-hit topic checked empty below
            calls = runtime.providers["mock"].calls
    finally:
        await redis.aclose()
    assert calls == 1
    assert costs[0]["data"] == costs[1]["data"]  # the same call's cost, not a second call
    replayed = results[1]["data"]
    assert replayed["request_metadata"]["cache"] == "miss"
    assert replayed["cost_estimate"] == results[0]["data"]["cost_estimate"]
    assert kafka.of(kafka.topics.cache_hit) == []
