"""Issue 4: OpenAI, OpenRouter and openai_compatible over real HTTP against the fake provider server."""

from __future__ import annotations

import pytest

from contracts import ErrorCode, ProviderName, TokenUsage
from worker.providers import build_provider
from worker.providers.openai import STRICT_SCHEMA, OpenAIProvider, SchemaSupport, is_reasoning_model

from .fake_providers import failure_of, fake_server, make_call, settings_for


async def test_openai_request_has_path_bearer_auth_model_and_strict_json_schema() -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.OPENAI, settings_for(url))
        assert provider is not None
        answer = await provider.compare(make_call("openai", "gpt-4.1-mini", temperature=0.2, max_tokens=300))
        await provider.aclose()
    [req] = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-openai"
    assert req.body["model"] == "gpt-4.1-mini"
    assert req.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "essay_comparison", "strict": True, "schema": STRICT_SCHEMA},
    }
    assert req.body["messages"][0]["role"] == "system"
    assert req.body["temperature"] == 0.2
    assert req.body["max_tokens"] == 300
    assert "reasoning_effort" not in req.body
    assert answer.winner in ("Essay A", "Essay B")
    assert answer.model == "gpt-4.1-mini"


@pytest.mark.parametrize("model", ["o3-mini", "o4-mini", "gpt-5", "gpt-5-mini"])
async def test_reasoning_models_get_max_completion_tokens_and_effort_and_no_temperature(model: str) -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.OPENAI, settings_for(url))
        assert provider is not None
        call = make_call("openai", model, temperature=0.5, max_tokens=2000, reasoning_effort="low")
        answer = await provider.compare(call)
        await provider.aclose()
    body = server.requests[0].body
    assert body["max_completion_tokens"] == 2000
    assert body["reasoning_effort"] == "low"
    assert "temperature" not in body
    assert "max_tokens" not in body
    assert answer.usage.reasoning_tokens == 32


async def test_openai_usage_includes_cached_and_reasoning_tokens() -> None:
    async with fake_server() as (_, url):
        provider = build_provider(ProviderName.OPENAI, settings_for(url))
        assert provider is not None
        call = make_call("openai", "gpt-5-mini", system_prompt="A long shared rubric. " * 20)
        first = await provider.compare(call)
        second = await provider.compare(call)
        await provider.aclose()
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens > 0
    assert second.usage.reasoning_tokens == 32
    assert second.usage.total_tokens == second.usage.prompt_tokens + second.usage.completion_tokens


async def test_openrouter_sends_its_attribution_headers_on_its_path() -> None:
    async with fake_server() as (server, url):
        settings = settings_for(url, openrouter_referer="https://example.org", openrouter_title="Essays")
        provider = build_provider(ProviderName.OPENROUTER, settings)
        assert provider is not None
        await provider.compare(make_call("openrouter", "openai/gpt-4.1-mini"))
        await provider.aclose()
    [req] = server.requests
    assert req.path == "/api/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-or"
    assert req.headers["http-referer"] == "https://example.org"
    assert req.headers["x-title"] == "Essays"
    assert req.body["response_format"]["type"] == "json_schema"


async def test_openrouter_uses_json_object_for_models_without_schema_support() -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.OPENROUTER, settings_for(url))
        assert provider is not None
        answer = await provider.compare(make_call("openrouter", "meta-llama/llama-3.3-70b-instruct"))
        await provider.aclose()
    body = server.requests[0].body
    assert body["response_format"] == {"type": "json_object"}
    assert "JSON object" in body["messages"][0]["content"]
    assert answer.winner in ("Essay A", "Essay B")


async def test_openrouter_reasoning_effort_goes_in_its_reasoning_object() -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.OPENROUTER, settings_for(url))
        assert provider is not None
        await provider.compare(make_call("openrouter", "openai/o4-mini", reasoning_effort="high"))
        await provider.aclose()
    body = server.requests[0].body
    assert body["reasoning"] == {"effort": "high"}
    assert "reasoning_effort" not in body


async def test_openai_compatible_uses_its_own_base_url_and_key() -> None:
    async with fake_server() as (server, url):
        settings = settings_for(url, openai_compatible_default_model="qwen2.5-7b")
        provider = build_provider(ProviderName.OPENAI_COMPATIBLE, settings)
        assert provider is not None
        await provider.compare(make_call("openai_compatible", provider.default_model))
        await provider.aclose()
    [req] = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-local"
    assert req.body["model"] == "qwen2.5-7b"


@pytest.mark.parametrize(
    ("scenario", "code", "billed"),
    [
        ("truncated", ErrorCode.PARSING_ERROR, True),
        ("malformed", ErrorCode.PARSING_ERROR, True),
        ("bad_answer", ErrorCode.PARSING_ERROR, True),
        ("refused", ErrorCode.CONTENT_POLICY, True),
        ("not_json", ErrorCode.PARSING_ERROR, False),
        ("rate_limit", ErrorCode.RATE_LIMIT, False),
        ("auth", ErrorCode.AUTHENTICATION_ERROR, False),
        ("context_length", ErrorCode.CONTENT_TOO_LONG, False),
        ("server_error", ErrorCode.EXTERNAL_SERVICE_ERROR, False),
        ("overloaded", ErrorCode.EXTERNAL_SERVICE_ERROR, False),
    ],
)
async def test_openai_failures_are_classified_and_billed_ones_carry_usage(
    scenario: str, code: ErrorCode, billed: bool
) -> None:
    error = await failure_of(ProviderName.OPENAI, scenario, make_call("openai", "gpt-4.1-mini"))
    assert error.code is code
    assert isinstance(error.details.get("usage"), TokenUsage) is billed


async def test_truncated_output_is_not_retryable_and_reports_length() -> None:
    error = await failure_of(ProviderName.OPENAI, "truncated", make_call("openai", "gpt-4.1-mini"))
    assert error.retryable is False
    assert error.details["provider_error_type"] == "length"


async def test_rate_limit_carries_retry_after_from_the_header() -> None:
    error = await failure_of(ProviderName.OPENAI, "rate_limit", make_call("openai", "gpt-4.1-mini"))
    assert error.retry_after_s == 7.0
    assert error.details["http_status"] == 429


async def test_verbosity_is_sent_to_gpt_5_models_only() -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.OPENAI, settings_for(url))
        assert provider is not None
        await provider.compare(make_call("openai", "gpt-5-mini", output_verbosity="low"))
        await provider.compare(make_call("openai", "o4-mini", output_verbosity="low"))
        await provider.aclose()
    assert server.requests[0].body["verbosity"] == "low"
    assert "verbosity" not in server.requests[1].body


async def test_openrouter_takes_schema_support_from_its_model_list_fetched_once() -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.OPENROUTER, settings_for(url))
        assert provider is not None
        # Listed with structured_outputs though no prefix says so; and an openai/ model listed without.
        for model in ["mistralai/mistral-large", "openai/gpt-3.5-turbo-instruct"] * 3:
            await provider.compare(make_call("openrouter", model))
        await provider.aclose()
    formats = [r.body["response_format"]["type"] for r in server.requests]
    assert formats == ["json_schema", "json_object"] * 3
    assert server.catalog_served == 1


async def test_openrouter_falls_back_to_model_prefixes_while_its_model_list_is_unavailable() -> None:
    now = [1000.0]
    async with fake_server() as (server, url):
        server.catalog_status = 500
        provider = build_provider(ProviderName.OPENROUTER, settings_for(url))
        assert isinstance(provider, OpenAIProvider) and provider.schema_support is not None
        provider.schema_support.clock = lambda: now[0]
        for model in ["mistralai/mistral-large", "openai/gpt-4.1-mini"]:
            answer = await provider.compare(make_call("openrouter", model))
            assert answer.winner in ("Essay A", "Essay B")
        assert server.catalog_served == 1  # not asked again before RETRY_S
        server.catalog_status = 200
        now[0] += SchemaSupport.RETRY_S
        await provider.compare(make_call("openrouter", "mistralai/mistral-large"))  # starts a refetch
        if (refetch := provider.schema_support._fetching) is not None:
            await refetch
        assert provider.schema_support.models is not None
        await provider.compare(make_call("openrouter", "mistralai/mistral-large"))
        await provider.aclose()
    formats = [r.body["response_format"]["type"] for r in server.requests]
    assert formats == ["json_object", "json_schema", "json_object", "json_schema"]
    assert server.catalog_served == 2


async def test_a_reasoning_models_policy_refusal_is_content_policy() -> None:
    error = await failure_of(ProviderName.OPENAI, "flagged", make_call("openai", "o4-mini"))
    assert error.code is ErrorCode.CONTENT_POLICY and error.retryable is False
    assert error.details["provider_error_type"] == "invalid_prompt"


@pytest.mark.parametrize(
    ("scenario", "code", "retryable", "status"),
    [
        ("flagged", ErrorCode.CONTENT_POLICY, False, 403),  # moderation, not a bad key
        ("auth", ErrorCode.AUTHENTICATION_ERROR, False, 401),
        ("error_in_200", ErrorCode.EXTERNAL_SERVICE_ERROR, True, 502),
        ("choice_error", ErrorCode.RATE_LIMIT, True, 429),
    ],
)
async def test_openrouter_failures_are_classified_by_what_they_are(
    scenario: str, code: ErrorCode, retryable: bool, status: int
) -> None:
    """OpenRouter answers errors that come up during generation with HTTP 200: the error's own code
    classifies them (not a PARSING_ERROR), so they are retried, counted and fall back as such."""
    error = await failure_of(
        ProviderName.OPENROUTER, scenario, make_call("openrouter", "mistralai/mistral-large")
    )
    assert error.code is code
    assert error.retryable is retryable
    assert error.details["http_status"] == status


@pytest.mark.parametrize(
    ("model", "sent"),
    [("o4-mini", "low"), ("o3", "low"), ("gpt-5", "minimal"), ("gpt-5-mini", "minimal"), ("gpt-5.1", "none")],
)
def test_reasoning_effort_none_is_sent_as_the_lowest_effort_the_model_takes(model: str, sent: str) -> None:
    # Before gpt-5.1 OpenAI answers "none" with 400 unsupported_value.
    provider = build_provider(ProviderName.OPENAI, settings_for("http://unused"))
    assert isinstance(provider, OpenAIProvider)
    body = provider.build_payload(make_call("openai", model, reasoning_effort="none"))
    assert body["reasoning_effort"] == sent
    assert (
        provider.build_payload(make_call("openai", model, reasoning_effort="high"))["reasoning_effort"]
        == "high"
    )


@pytest.mark.parametrize("model", ["gpt-5-chat-latest", "gpt-5-search-api", "openai/gpt-5-chat"])
def test_gpt_5_chat_and_search_models_are_not_reasoning_models(model: str) -> None:
    # They refuse reasoning_effort and take temperature and max_tokens.
    assert not is_reasoning_model(model)
    assert is_reasoning_model("gpt-5-mini") and is_reasoning_model("openai/o4-mini")


async def test_openrouter_routes_a_json_schema_request_only_to_hosts_that_take_it() -> None:
    async with fake_server() as (server, url):
        provider = build_provider(ProviderName.OPENROUTER, settings_for(url))
        assert provider is not None
        await provider.compare(make_call("openrouter", "openai/gpt-4.1-mini"))
        await provider.compare(make_call("openrouter", "meta-llama/llama-3.3-70b-instruct"))
        await provider.aclose()
    schema, plain = (r.body for r in server.requests if r.path.endswith("/chat/completions"))
    assert schema["response_format"]["type"] == "json_schema"
    assert schema["provider"] == {"require_parameters": True}
    assert plain["response_format"] == {"type": "json_object"} and "provider" not in plain


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        ("o4-mini", {"temperature": 0.5}, "temperature"),
        ("o4-mini", {"max_tokens": 300}, "max_tokens"),
        ("o4-mini", {"reasoning_effort": "none"}, "reasoning_effort"),
        ("gpt-5", {"reasoning_effort": "none"}, "reasoning_effort"),
        ("gpt-4.1-mini", {"reasoning_effort": "low"}, "reasoning_effort"),
    ],
)
async def test_the_fake_openai_refuses_what_the_real_one_refuses_and_the_worker_sends_none_of_it(
    model: str, body: dict[str, object], param: str
) -> None:
    import httpx

    from worker.providers.http import classify_error

    async with fake_server() as (_, url):
        async with httpx.AsyncClient() as client:
            raw = {"model": model, "messages": [{"role": "user", "content": "x"}], **body}
            response = await client.post(f"{url}/v1/chat/completions", json=raw)
        provider = build_provider(ProviderName.OPENAI, settings_for(url))
        assert provider is not None
        effort = body.get("reasoning_effort")
        call = make_call(
            "openai",
            model,
            temperature=body.get("temperature"),  # type: ignore[arg-type]
            max_tokens=body.get("max_tokens"),  # type: ignore[arg-type]
            reasoning_effort=effort if effort is not None and model != "gpt-4.1-mini" else None,  # type: ignore[arg-type]
        )
        answer = await provider.compare(call)  # the same intent, as the worker words it: accepted
        await provider.aclose()
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert classify_error("openai", 400, response.content, {}).code is ErrorCode.VALIDATION_ERROR
    assert answer.winner in ("Essay A", "Essay B")
