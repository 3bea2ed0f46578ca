"""Issue 4: Gemini generateContent over real HTTP: path, key header, schema, usage, safety blocks."""

from __future__ import annotations

import pytest

from contracts import ErrorCode, PromptBlock, ProviderName
from worker.errors import ProviderError
from worker.providers import build_provider
from worker.providers.gemini import RESPONSE_SCHEMA

from .fake_providers import failure_of, fake_server, make_call, settings_for


async def test_request_has_model_path_key_header_system_instruction_and_schema() -> None:
    blocks = (PromptBlock(target="user_content", content="the essays"),)
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.GOOGLE, settings_for(url))
        assert provider is not None
        call = make_call("google", "gemini-2.5-flash", *blocks, temperature=0.1, max_tokens=256)
        answer = await provider.compare(call)
        await provider.aclose()
    [req] = server.requests
    assert req.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert req.headers["x-goog-api-key"] == "gm-key"
    assert "key=" not in req.path
    assert req.body["systemInstruction"] == {"parts": [{"text": call.system_prompt}]}
    assert req.body["contents"] == [
        {"role": "user", "parts": [{"text": "the essays"}, {"text": call.user_prompt}]}
    ]
    assert req.body["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseSchema": RESPONSE_SCHEMA,
        "temperature": 0.1,
        "maxOutputTokens": 256,
    }
    assert answer.model == "gemini-2.5-flash"


async def test_usage_counts_thoughts_as_reasoning_output_and_reports_cached_tokens() -> None:
    async with fake_server() as (_, url):
        provider = build_provider(ProviderName.GOOGLE, settings_for(url))
        assert provider is not None
        call = make_call("google", "gemini-2.5-flash", system_prompt="A long shared rubric. " * 20)
        first = await provider.compare(call)
        second = await provider.compare(call)
        await provider.aclose()
    assert first.usage.completion_tokens == 75
    assert first.usage.reasoning_tokens == 20
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens > 0


@pytest.mark.parametrize(
    ("scenario", "code"),
    [
        ("refused", ErrorCode.CONTENT_POLICY),
        ("truncated", ErrorCode.PARSING_ERROR),
        ("malformed", ErrorCode.PARSING_ERROR),
        ("bad_answer", ErrorCode.PARSING_ERROR),
        ("auth", ErrorCode.AUTHENTICATION_ERROR),
        ("rate_limit", ErrorCode.RATE_LIMIT),
        ("context_length", ErrorCode.CONTENT_TOO_LONG),
        ("overloaded", ErrorCode.EXTERNAL_SERVICE_ERROR),
    ],
)
async def test_gemini_failures_are_classified(scenario: str, code: ErrorCode) -> None:
    error = await failure_of(ProviderName.GOOGLE, scenario, make_call("google", "gemini-2.5-flash"))
    assert error.code is code


async def test_a_safety_finish_reason_is_content_policy() -> None:
    provider = build_provider(ProviderName.GOOGLE, settings_for("http://unused"))
    assert provider is not None
    body = b'{"candidates": [{"content": {"parts": []}, "finishReason": "SAFETY"}], "usageMetadata": {}}'
    with pytest.raises(ProviderError) as caught:
        provider.read_answer(body, "gemini-2.5-flash")  # type: ignore[attr-defined]
    await provider.aclose()
    assert caught.value.code is ErrorCode.CONTENT_POLICY
    assert caught.value.details["provider_error_type"] == "SAFETY"


@pytest.mark.parametrize(
    ("model", "effort", "expected"),
    [
        ("gemini-2.5-flash", "none", {"thinkingBudget": 0}),
        ("gemini-2.5-pro", "none", {"thinkingBudget": 128}),
        ("gemini-2.5-flash-lite", "low", {"thinkingBudget": 1024}),
        ("gemini-2.5-pro", "high", {"thinkingBudget": 24576}),
        ("gemini-3-flash-preview", "none", {"thinkingLevel": "minimal"}),
        ("gemini-3-flash-preview", "medium", {"thinkingLevel": "medium"}),
        ("gemini-3-pro-preview", "medium", {"thinkingLevel": "high"}),
        ("gemini-3.1-pro", "low", {"thinkingLevel": "low"}),
        ("gemini-2.0-flash", "high", None),
    ],
)
async def test_reasoning_effort_becomes_the_models_thinking_config(model, effort, expected) -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.GOOGLE, settings_for(url))
        assert provider is not None
        await provider.compare(make_call("google", model, reasoning_effort=effort))
        await provider.aclose()
    [req] = server.requests
    assert req.body["generationConfig"].get("thinkingConfig") == expected


@pytest.mark.parametrize(("reason", "retryable"), [("LANGUAGE", False), ("OTHER", True)])
async def test_a_finish_reason_without_an_answer_is_named_in_the_error(reason: str, retryable: bool) -> None:
    provider = build_provider(ProviderName.GOOGLE, settings_for("http://unused"))
    assert provider is not None
    body = b'{"candidates": [{"content": {"parts": []}, "finishReason": "%s"}], "usageMetadata": {}}' % (
        reason.encode()
    )
    with pytest.raises(ProviderError) as caught:
        provider.read_answer(body, "gemini-2.5-flash")  # type: ignore[attr-defined]
    await provider.aclose()
    assert caught.value.code is ErrorCode.PARSING_ERROR
    assert caught.value.details["provider_error_type"] == reason
    assert caught.value.retryable is retryable
