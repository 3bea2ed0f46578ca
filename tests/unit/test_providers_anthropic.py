"""Issue 4: Anthropic Messages API over real HTTP: forced tool use, cache_control placement, usage."""

from __future__ import annotations

import pytest

from contracts import ErrorCode, PromptBlock, ProviderName, TokenUsage
from worker.breaker import BreakerPolicy, Breakers, BreakerState
from worker.errors import RequestRejected
from worker.orchestrate import Orchestrator
from worker.pricing import PriceTable
from worker.providers import build_provider
from worker.providers.anthropic import TOOL_NAME, AnthropicProvider
from worker.providers.base import COMPARISON_SCHEMA

from .fake_providers import failure_of, fake_server, make_call, settings_for


def block(target: str, text: str, ttl: str | None = None) -> PromptBlock:
    if ttl is None:
        return PromptBlock(target=target, content=text)  # type: ignore[arg-type]
    return PromptBlock(target=target, content=text, cacheable=True, ttl=ttl)  # type: ignore[arg-type]


async def test_request_has_path_key_version_model_and_forced_tool() -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.ANTHROPIC, settings_for(url, anthropic_version="2023-06-01"))
        assert provider is not None
        answer = await provider.compare(make_call("anthropic", "claude-haiku-4-5", max_tokens=400))
        await provider.aclose()
    [req] = server.requests
    assert req.path == "/v1/messages"
    assert req.headers["x-api-key"] == "sk-ant"
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert req.headers["anthropic-beta"] == "extended-cache-ttl-2025-04-11"  # ttl "1h" blocks need it
    assert "authorization" not in req.headers
    assert req.body["model"] == "claude-haiku-4-5"
    assert req.body["max_tokens"] == 400
    assert req.body["tools"][0]["name"] == TOOL_NAME
    assert req.body["tools"][0]["input_schema"] == COMPARISON_SCHEMA
    assert req.body["tool_choice"] == {"type": "tool", "name": TOOL_NAME}
    assert answer.winner in ("Essay A", "Essay B")


async def test_prompt_blocks_become_cached_content_blocks_with_1h_before_5m() -> None:
    blocks = (
        block("system", "plain instructions"),
        block("system", "rubric five minutes", "5m"),
        block("system", "rubric one hour", "1h"),
        block("user_content", "essay a (5m)", "5m"),
        block("user_content", "essay b (5m)", "5m"),
    )
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.ANTHROPIC, settings_for(url))
        assert provider is not None
        await provider.compare(make_call("anthropic", "claude-haiku-4-5", *blocks))
        await provider.aclose()
    body = server.requests[0].body
    assert body["system"] == [
        {"type": "text", "text": "rubric one hour", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "text", "text": "rubric five minutes", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
        {"type": "text", "text": "plain instructions"},
    ]
    # One breakpoint closes a run of same-TTL blocks; the prompt itself is last and uncached.
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "essay a (5m)"},
        {"type": "text", "text": "essay b (5m)", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
        {"type": "text", "text": "Essay A: cats.\n\nEssay B: dogs."},
    ]


async def test_a_1h_user_block_after_a_5m_system_block_is_cached_for_5m() -> None:
    blocks = (block("system", "rubric", "5m"), block("user_content", "essays", "1h"))
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.ANTHROPIC, settings_for(url))
        assert provider is not None
        await provider.compare(make_call("anthropic", "claude-haiku-4-5", *blocks))
        await provider.aclose()
    content = server.requests[0].body["messages"][0]["content"]
    assert content[0]["cache_control"] == {"type": "ephemeral", "ttl": "5m"}


async def test_a_system_prompt_override_replaces_the_system_blocks() -> None:
    blocks = (block("system", "rubric", "1h"),)
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.ANTHROPIC, settings_for(url))
        assert provider is not None
        await provider.compare(make_call("anthropic", "claude-haiku-4-5", *blocks, system_prompt="Override."))
        await provider.aclose()
    assert server.requests[0].body["system"] == "Override."


async def test_usage_counts_cache_writes_and_reads_as_prompt_tokens() -> None:
    blocks = (block("system", "a long rubric " * 40, "1h"),)
    async with fake_server() as (_, url):
        provider = build_provider(ProviderName.ANTHROPIC, settings_for(url))
        assert provider is not None
        call = make_call("anthropic", "claude-haiku-4-5", *blocks)
        first = await provider.compare(call)
        second = await provider.compare(call)
        await provider.aclose()
    assert first.usage.cached_tokens == 0
    assert (first.cache_write_tokens, first.cache_write_1h_tokens) == (140, 140)  # written for an hour
    assert (second.cache_write_tokens, second.cache_write_1h_tokens) == (0, 0)
    assert second.usage.cached_tokens == 140  # the rubric, read from the cache the first call wrote
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.usage.total_tokens == second.usage.prompt_tokens + 70


async def test_temperature_above_1_is_rejected_without_a_call() -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.ANTHROPIC, settings_for(url))
        assert provider is not None
        with pytest.raises(RequestRejected) as caught:
            await provider.compare(make_call("anthropic", "claude-haiku-4-5", temperature=1.5))
        await provider.aclose()
    assert caught.value.code is ErrorCode.VALIDATION_ERROR
    assert server.requests == []


@pytest.mark.parametrize(
    ("scenario", "code", "retryable"),
    [
        ("truncated", ErrorCode.PARSING_ERROR, False),
        ("malformed", ErrorCode.PARSING_ERROR, True),
        ("bad_answer", ErrorCode.PARSING_ERROR, True),
        ("refused", ErrorCode.CONTENT_POLICY, False),
        ("overloaded", ErrorCode.EXTERNAL_SERVICE_ERROR, True),
        ("rate_limit", ErrorCode.RATE_LIMIT, True),
        ("auth", ErrorCode.AUTHENTICATION_ERROR, False),
        ("context_length", ErrorCode.CONTENT_TOO_LONG, False),
    ],
)
async def test_anthropic_failures_are_classified(scenario: str, code: ErrorCode, retryable: bool) -> None:
    error = await failure_of(ProviderName.ANTHROPIC, scenario, make_call("anthropic", "claude-haiku-4-5"))
    assert error.code is code
    assert error.retryable is retryable


async def test_max_tokens_stop_is_a_billed_error_not_a_parsed_answer() -> None:
    error = await failure_of(ProviderName.ANTHROPIC, "truncated", make_call("anthropic", "claude-haiku-4-5"))
    assert error.details["provider_error_type"] == "max_tokens"
    assert isinstance(error.details["usage"], TokenUsage)
    assert error.details["usage"].completion_tokens == 70


async def test_529_overloaded_is_retryable_with_its_error_type() -> None:
    error = await failure_of(ProviderName.ANTHROPIC, "overloaded", make_call("anthropic", "claude-haiku-4-5"))
    assert error.details["http_status"] == 529
    assert error.details["provider_error_type"] == "overloaded_error"


async def test_a_stop_at_the_context_window_is_a_billed_content_too_long_not_retried() -> None:
    error = await failure_of(
        ProviderName.ANTHROPIC, "context_window", make_call("anthropic", "claude-sonnet-4-5")
    )
    assert error.code is ErrorCode.CONTENT_TOO_LONG and error.retryable is False
    assert error.details["provider_error_type"] == "model_context_window_exceeded"
    assert isinstance(error.details["usage"], TokenUsage)


class NoHttp:
    async def post_json(self, *args: object) -> bytes:
        raise AssertionError("nothing is sent")


async def test_a_call_the_provider_refuses_before_sending_is_no_attempt_and_no_probe_success() -> None:
    # Anthropic takes temperature 0-1: the provider refuses 1.5 before anything is sent. In half-open that
    # must not close the breaker (nothing is known of the provider) nor count as a call.
    now = [0.0]
    breakers = Breakers(BreakerPolicy(failure_threshold=1, recovery_s=5), clock=lambda: now[0])
    orchestrator = Orchestrator(
        {"anthropic": AnthropicProvider("claude-haiku-4-5", http=NoHttp())},  # type: ignore[arg-type]
        PriceTable.load(),
        ProviderName.ANTHROPIC,
        breakers=breakers,
    )
    breaker = breakers["anthropic"]
    ticket = breaker.try_acquire()
    assert ticket is not None
    breaker.record(ErrorCode.EXTERNAL_SERVICE_ERROR, ticket)
    now[0] += 5
    assert breaker.state is BreakerState.HALF_OPEN
    outcome = await orchestrator.run(make_call("anthropic", "claude-haiku-4-5", temperature=1.5), None)
    assert outcome.error is not None and outcome.error.code is ErrorCode.VALIDATION_ERROR
    assert outcome.attempts == []
    assert breaker.state is BreakerState.HALF_OPEN and breaker.try_acquire() is not None  # probe slot free
