"""Fallback through the whole worker (real Kafka, real Redis, fake provider server over HTTP): only a
request that allows it is answered by the next provider, and the result says who answered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tests.conftest import make_settings, request_envelope, running_worker
from tests.unit.fake_providers import fake_server
from worker.fake_server import FakeProviderServer


@asynccontextmanager
async def worker(prefix: str, topics_for, kafka_for) -> AsyncIterator[tuple[FakeProviderServer, Any]]:
    async with fake_server() as (server, url):
        settings = make_settings(
            prefix,
            partitions=1,
            openai_api_key="sk-e2e",
            openai_base_url=f"{url}/v1",
            anthropic_api_key="sk-ant-e2e",
            anthropic_base_url=url,
            default_provider="openai",
            fallback_chain="anthropic",
            retry_max_attempts=1,
        )
        await topics_for(settings)
        kafka = await kafka_for(settings)
        async with running_worker(settings):
            yield server, kafka


async def test_request_allowing_fallback_is_answered_by_the_next_provider(
    prefix, topics_for, kafka_for
) -> None:
    async with worker(prefix, topics_for, kafka_for) as (server, kafka):
        server.enqueue("server_error")
        await kafka.send(request_envelope(allow_fallback=True))
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        [cost] = await kafka.wait_for(kafka.topics.cost_tracking, 1)
        await kafka.caught_up()  # for the failure topic checked empty below
    data = result["data"]
    assert data["winner"] in ("Essay A", "Essay B") and data["error_detail"] is None
    meta = data["request_metadata"]
    assert meta["resolved_provider"] == "openai"
    assert meta["answered_by_provider"] == "anthropic"
    assert meta["attempted_providers"] == ["openai", "anthropic"]
    assert meta["attempts"] == 2
    assert (data["provider"], data["model"]) == ("anthropic", meta["answered_by_model"])
    assert meta["answered_by_model"].startswith("claude")
    assert cost["data"]["provider"] == "anthropic"
    assert [r.api for r in server.requests] == ["openai", "anthropic"]
    assert kafka.of(kafka.topics.failure) == []


async def test_request_not_allowing_fallback_fails_with_the_provider_error(
    prefix, topics_for, kafka_for
) -> None:
    async with worker(prefix, topics_for, kafka_for) as (server, kafka):
        server.enqueue("server_error")
        await kafka.send(request_envelope())
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        [failure] = await kafka.wait_for(kafka.topics.failure, 1)
    assert result["data"]["error_detail"]["error_code"] == "EXTERNAL_SERVICE_ERROR"
    assert "answered_by_provider" not in result["data"]["request_metadata"]
    assert failure["data"]["attempts"] == 1
    assert [r.api for r in server.requests] == ["openai"]
