"""Issue 4: requests through the worker on the real broker reach a real HTTP provider (the fake provider
server on a loopback port) and come back as results, classified failures and cost events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tests.conftest import make_settings, request_envelope, running_worker
from tests.unit.fake_providers import fake_server
from worker.fake_server import FakeProviderServer


@asynccontextmanager
async def worker_with_providers(
    prefix: str, topics_for, kafka_for
) -> AsyncIterator[tuple[FakeProviderServer, Any, Any]]:
    async with fake_server() as (server, url):
        settings = make_settings(
            prefix,
            partitions=1,
            openai_api_key="sk-e2e",
            openai_base_url=f"{url}/v1",
            openai_default_model="gpt-4.1-mini",
            anthropic_api_key="sk-ant-e2e",
            anthropic_base_url=url,
            default_provider="openai",
        )
        await topics_for(settings)
        kafka = await kafka_for(settings)
        async with running_worker(settings) as runtime:
            yield server, kafka, runtime


async def test_openai_request_goes_over_http_and_yields_a_result_and_cost_event(
    prefix, topics_for, kafka_for
) -> None:
    async with worker_with_providers(prefix, topics_for, kafka_for) as (server, kafka, _):
        env = request_envelope(organization_id="org1")
        await kafka.send(env)
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        [cost] = await kafka.wait_for(kafka.topics.cost_tracking, 1)
    data = result["data"]
    assert data["winner"] in ("Essay A", "Essay B")
    assert data["provider"] == "openai"
    assert data["model"] == "gpt-4.1-mini"
    assert data["token_usage"]["completion_tokens"] == 60
    assert cost["data"]["provider"] == "openai"
    assert cost["data"]["cost_estimate_usd"] > 0
    [req] = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-e2e"
    assert req.body["messages"][1]["content"] == env.data.user_prompt


async def test_anthropic_auth_failure_becomes_a_classified_failure_result(
    prefix, topics_for, kafka_for
) -> None:
    async with worker_with_providers(prefix, topics_for, kafka_for) as (server, kafka, _):
        server.enqueue("auth")
        await kafka.send(request_envelope(llm_config_overrides={"provider_override": "anthropic"}))
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
    detail = result["data"]["error_detail"]
    assert detail["error_code"] == "AUTHENTICATION_ERROR"
    assert detail["details"]["http_status"] == 401
    assert detail["details"]["provider"] == "anthropic"
    assert detail["details"]["provider_error_type"] == "authentication_error"
    assert detail["details"]["retryable"] is False
    assert len(server.requests) == 1


async def test_truncated_output_fails_with_parsing_error_and_is_still_billed(
    prefix, topics_for, kafka_for
) -> None:
    async with worker_with_providers(prefix, topics_for, kafka_for) as (server, kafka, _):
        server.enqueue("truncated")
        env = request_envelope(llm_config_overrides={"provider_override": "anthropic"})
        await kafka.send(env)
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        [cost] = await kafka.wait_for(kafka.topics.cost_tracking, 1)
    detail = result["data"]["error_detail"]
    assert detail["error_code"] == "PARSING_ERROR"
    assert detail["details"]["provider_error_type"] == "max_tokens"
    assert "usage" not in detail["details"]
    assert cost["data"]["request_id"] == env.data.request_id
    assert cost["data"]["token_usage"]["completion_tokens"] == 70


async def test_a_provider_without_a_key_fails_fast_with_configuration_error(
    prefix, topics_for, kafka_for
) -> None:
    async with worker_with_providers(prefix, topics_for, kafka_for) as (server, kafka, _):
        await kafka.send(request_envelope(llm_config_overrides={"provider_override": "google"}))
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
    assert result["data"]["error_detail"]["error_code"] == "CONFIGURATION_ERROR"
    assert server.requests == []


async def test_readiness_lists_the_providers_without_a_key(prefix, topics_for, kafka_for) -> None:
    async with worker_with_providers(prefix, topics_for, kafka_for) as (_, _, runtime):
        health = await runtime.health()
        assert sorted(runtime.providers) == ["anthropic", "mock", "openai"]
    assert health["unconfigured_providers"] == "google,openrouter,openai_compatible"
