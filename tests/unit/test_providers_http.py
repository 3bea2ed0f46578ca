"""Issue 4: the one classification of provider HTTP failures (status + body + headers, and no-answer)."""

from __future__ import annotations

import json
import socket
import uuid

import aiohttp
import httpx
import pytest

from contracts import ErrorCode, ErrorDetail, LLMProviderFailureV1
from worker.errors import ProviderError
from worker.orchestrate import falls_back
from worker.providers.http import (
    HttpEndpoint,
    HttpxSender,
    classify_error,
    classify_transport_error,
    make_endpoint,
)
from worker.settings import ProviderSettings

from .fake_providers import fake_server

OPENAI_429 = {
    "error": {
        "message": "Rate limit reached",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
ANTHROPIC_529 = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
GEMINI_429 = {
    "error": {
        "code": 429,
        "message": "Resource has been exhausted",
        "status": "RESOURCE_EXHAUSTED",
        "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"}],
    }
}


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_authentication_errors_and_not_retryable(status: int) -> None:
    err = classify_error(
        "openai", status, body({"error": {"message": "bad key", "code": "invalid_api_key"}}), {}
    )
    assert err.code is ErrorCode.AUTHENTICATION_ERROR
    assert err.retryable is False
    assert err.details["http_status"] == status
    assert err.details["provider_error_type"] == "invalid_api_key"


def test_gemini_invalid_key_400_is_an_authentication_error() -> None:
    doc = {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
        }
    }
    err = classify_error("google", 400, body(doc), {})
    assert err.code is ErrorCode.AUTHENTICATION_ERROR
    assert err.details["provider_error_type"] == "INVALID_ARGUMENT:API_KEY_INVALID"


@pytest.mark.parametrize(
    ("provider", "doc"),
    [
        (
            "openai",
            {
                "error": {
                    "message": "maximum context length is 128000 tokens",
                    "code": "context_length_exceeded",
                }
            },
        ),
        (
            "anthropic",
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "prompt is too long: 210000 tokens > 200000 maximum",
                },
            },
        ),
        (
            "google",
            {
                "error": {
                    "code": 400,
                    "message": "The input token count (2100000) exceeds the maximum number of tokens "
                    "allowed (1048576).",
                    "status": "INVALID_ARGUMENT",
                }
            },
        ),
    ],
)
def test_400_context_length_is_content_too_long(provider: str, doc: dict[str, object]) -> None:
    err = classify_error(provider, 400, body(doc), {})
    assert err.code is ErrorCode.CONTENT_TOO_LONG
    assert err.retryable is False


def test_anthropic_413_request_too_large_is_content_too_long() -> None:
    doc = {
        "type": "error",
        "error": {"type": "request_too_large", "message": "Request exceeds the maximum size"},
    }
    assert classify_error("anthropic", 413, body(doc), {}).code is ErrorCode.CONTENT_TOO_LONG


def test_other_400_is_a_validation_error_and_404_a_configuration_error() -> None:
    bad = body({"error": {"message": "Invalid value for temperature", "code": "invalid_value"}})
    assert classify_error("openai", 400, bad, {}).code is ErrorCode.VALIDATION_ERROR
    missing = body({"type": "error", "error": {"type": "not_found_error", "message": "model: claude-x"}})
    assert classify_error("anthropic", 404, missing, {}).code is ErrorCode.CONFIGURATION_ERROR


def test_429_is_rate_limit_with_retry_after_seconds() -> None:
    err = classify_error("openai", 429, body(OPENAI_429), {"retry-after": "20"})
    assert err.code is ErrorCode.RATE_LIMIT
    assert err.retryable is True
    assert err.retry_after_s == 20.0
    assert err.details["provider_error_type"] == "rate_limit_exceeded"


def test_retry_after_ms_wins_over_retry_after() -> None:
    err = classify_error("openai", 429, body(OPENAI_429), {"retry-after-ms": "1500", "retry-after": "2"})
    assert err.retry_after_s == 1.5


def test_retry_after_as_http_date_is_seconds_from_now() -> None:
    err = classify_error("anthropic", 429, b"", {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert err.retry_after_s == 0.0


def test_gemini_retry_info_delay_is_used_without_a_retry_after_header() -> None:
    err = classify_error("google", 429, body(GEMINI_429), {})
    assert err.code is ErrorCode.RATE_LIMIT
    assert err.retry_after_s == 12.0


@pytest.mark.parametrize("delay", ["NaNs", "nans", "infs", "-infs"])
def test_a_retry_delay_that_is_not_a_finite_number_is_ignored(delay: str) -> None:
    doc = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [{"retryDelay": delay}]}}
    assert classify_error("google", 429, body(doc), {}).retry_after_s is None
    assert classify_error("openai", 429, b"", {"retry-after": delay[:-1]}).retry_after_s is None
    assert classify_error("openai", 429, b"", {"retry-after-ms": delay[:-1]}).retry_after_s is None


@pytest.mark.parametrize(
    "raw",
    [
        body({"error": {"message": "m", "details": 7}}),
        body({"error": {"message": "m", "details": True}}),
        b'{"error": ' + b"[" * 5000,
    ],
    ids=["details a number", "details a boolean", "nested too deep"],
)
def test_odd_error_bodies_are_still_classified_by_status(raw: bytes) -> None:
    err = classify_error("openai", 503, raw, {})
    assert err.code is ErrorCode.EXTERNAL_SERVICE_ERROR and err.retryable is True


def test_429_for_a_spent_quota_is_not_retryable() -> None:
    doc = {
        "error": {
            "message": "You exceeded your current quota",
            "type": "insufficient_quota",
            "code": "insufficient_quota",
        }
    }
    err = classify_error("openai", 429, body(doc), {})
    assert err.code is ErrorCode.RATE_LIMIT
    assert err.retryable is False


_FREE_TIER_REQUESTS = "generativelanguage.googleapis.com/generate_content_free_tier_requests"


def _gemini_quota_429(quota_id: str) -> bytes:
    """Gemini's 429 as it is sent today: the same message for every quota, the quota in QuotaFailure."""
    return body(
        {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": _FREE_TIER_REQUESTS,
                                "quotaId": quota_id,
                                "quotaDimensions": {"location": "global", "model": "gemini-2.0-flash"},
                                "quotaValue": "15",
                            }
                        ],
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.Help",
                        "links": [{"description": "Learn more"}],
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "26s"},
                ],
            }
        }
    )


def test_gemini_per_minute_429_is_retryable_after_its_delay_though_its_message_mentions_billing() -> None:
    err = classify_error(
        "google", 429, _gemini_quota_429("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"), {}
    )
    assert err.code is ErrorCode.RATE_LIMIT
    assert err.retryable is True and err.retry_after_s == 26.0


def test_gemini_per_day_429_is_a_spent_quota() -> None:
    err = classify_error(
        "google", 429, _gemini_quota_429("GenerateRequestsPerDayPerProjectPerModel-FreeTier"), {}
    )
    assert err.code is ErrorCode.RATE_LIMIT
    assert err.retryable is False


def test_openrouter_402_for_spent_credits_is_a_spent_quota_not_a_provider_fault() -> None:
    doc = {
        "error": {
            "code": 402,
            "message": "Insufficient credits. Add more using https://openrouter.ai/credits",
        }
    }
    err = classify_error("openrouter", 402, body(doc), {})
    assert (
        err.code is ErrorCode.RATE_LIMIT and err.retryable is False
    )  # falls back; the breaker does not count it


def _anthropic_400(message: str) -> bytes:
    """Anthropic's body for an invalid_request_error (HTTP 400)."""
    return body({"type": "error", "error": {"type": "invalid_request_error", "message": message}})


def test_anthropic_400_for_a_credit_balance_too_low_is_a_spent_quota_not_a_bad_request() -> None:
    raw = _anthropic_400(
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade "
        "or purchase credits."
    )
    err = classify_error("anthropic", 400, raw, {})
    assert err.code is ErrorCode.RATE_LIMIT and err.retryable is False
    assert falls_back(err)


@pytest.mark.parametrize("limit", ["free-models-per-day", "free-models-per-day-high-balance"])
def test_openrouter_429_for_its_daily_free_model_limit_is_a_spent_quota(limit: str) -> None:
    doc = {"error": {"message": f"Rate limit exceeded: {limit}. Add 10 credits", "code": 429}}
    err = classify_error("openrouter", 429, body(doc), {})
    assert err.code is ErrorCode.RATE_LIMIT and err.retryable is False
    per_minute = {"error": {"message": "Rate limit exceeded: free-models-per-min.", "code": 429}}
    assert classify_error("openrouter", 429, body(per_minute), {}).retryable is True


def test_anthropic_400_for_input_plus_max_tokens_over_the_context_is_content_too_long() -> None:
    raw = _anthropic_400(
        "input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, decrease input length "
        "or `max_tokens` and try again"
    )
    err = classify_error("anthropic", 400, raw, {})
    assert err.code is ErrorCode.CONTENT_TOO_LONG and err.retryable is False


def test_openai_429_for_a_request_larger_than_the_whole_minute_quota_is_not_retried() -> None:
    doc = {
        "error": {
            "message": "Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit "
            "30000, Requested 45000. The input or output tokens must be reduced in order to run "
            "successfully.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    err = classify_error("openai", 429, body(doc), {"retry-after": "1"})
    assert err.code is ErrorCode.RATE_LIMIT and err.retryable is False
    assert classify_error("openai", 429, body(OPENAI_429), {}).retryable is True


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_5xx_and_529_are_retryable_external_service_errors(status: int) -> None:
    err = classify_error("anthropic", status, body(ANTHROPIC_529), {})
    assert err.code is ErrorCode.EXTERNAL_SERVICE_ERROR
    assert err.retryable is True
    assert err.details["http_status"] == status


def test_a_non_json_error_body_is_still_classified_by_status() -> None:
    err = classify_error("openai", 502, b"<html>Bad Gateway</html>", {})
    assert err.code is ErrorCode.EXTERNAL_SERVICE_ERROR
    assert err.details["provider_error_type"] is None
    assert "Bad Gateway" in err.message


@pytest.mark.parametrize(
    ("failure", "code"),
    [(httpx.ReadTimeout, ErrorCode.TIMEOUT), (httpx.ConnectError, ErrorCode.CONNECTION_ERROR)],
)
async def test_an_httpx_transport_failure_is_classified(failure: type[httpx.TransportError], code) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise failure("no answer", request=request)

    endpoint = HttpEndpoint(HttpxSender(httpx.MockTransport(handler), {}), "http://provider")
    with pytest.raises(ProviderError) as caught:
        await endpoint.post_json("openai", "/chat/completions", {})
    assert caught.value.code is code
    assert caught.value.retryable is True


async def test_a_slow_answer_over_the_read_timeout_is_timeout_on_the_aiohttp_transport() -> None:
    async with fake_server(slow_ms=600) as (server, url):
        endpoint = make_endpoint(ProviderSettings(http_read_timeout_s=0.2), url, {})
        server.enqueue("slow")
        with pytest.raises(ProviderError) as caught:
            await endpoint.post_json("openai", "/v1/chat/completions", {"model": "m", "messages": []})
        await endpoint.aclose()
    assert caught.value.code is ErrorCode.TIMEOUT
    assert caught.value.details.get("unanswered") is True  # sent, then no answer read in time


@pytest.mark.parametrize(
    ("failure", "sent"),
    [
        (aiohttp.SocketTimeoutError(), True),
        (httpx.ReadTimeout("slow"), True),
        (aiohttp.ConnectionTimeoutError(), False),  # connecting, or waiting for a pooled connection
        (httpx.ConnectTimeout("slow"), False),
        (httpx.PoolTimeout("busy"), False),
    ],
)
def test_only_a_timeout_after_the_request_went_out_counts_as_unanswered(
    failure: Exception, sent: bool
) -> None:
    err = classify_transport_error("openai", failure)
    assert err.code is ErrorCode.TIMEOUT and bool(err.details.get("unanswered")) is sent


async def test_a_refused_connection_is_connection_error_not_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    endpoint = make_endpoint(ProviderSettings(), f"http://127.0.0.1:{port}", {})
    with pytest.raises(ProviderError) as caught:
        await endpoint.post_json("openai", "/v1/chat/completions", {})
    await endpoint.aclose()
    assert caught.value.code is ErrorCode.CONNECTION_ERROR
    assert caught.value.retryable is True


async def test_a_server_that_hangs_up_is_connection_error() -> None:
    async with fake_server() as (server, url):
        endpoint = make_endpoint(ProviderSettings(), url, {})
        server.enqueue("hangup")
        with pytest.raises(ProviderError) as caught:
            await endpoint.post_json("anthropic", "/v1/messages", {"model": "m"})
        await endpoint.aclose()
    assert caught.value.code is ErrorCode.CONNECTION_ERROR


async def test_the_endpoint_sends_one_post_with_fixed_headers_and_json_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b'{"ok": true}')

    endpoint = HttpEndpoint(
        HttpxSender(httpx.MockTransport(handler), {"authorization": "Bearer k"}), "http://provider/v1"
    )
    assert await endpoint.post_json("openai", "/chat/completions", {"model": "m"}) == b'{"ok": true}'
    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == "http://provider/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k"
    assert json.loads(request.content) == {"model": "m"}


async def test_a_non_2xx_answer_is_classified_from_its_status_body_and_headers() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, content=body(OPENAI_429), headers={"retry-after": "3"})

    endpoint = HttpEndpoint(HttpxSender(httpx.MockTransport(handler), {}), "http://provider")
    with pytest.raises(ProviderError) as caught:
        await endpoint.post_json("openai", "/chat/completions", {})
    assert caught.value.code is ErrorCode.RATE_LIMIT
    assert caught.value.retry_after_s == 3.0


async def test_the_aiohttp_endpoint_posts_json_with_the_fixed_headers() -> None:
    async with fake_server() as (server, url):
        endpoint = make_endpoint(ProviderSettings(), f"{url}/v1", {"authorization": "Bearer k"})
        await endpoint.post_json("openai", "/chat/completions", {"model": "m", "messages": []})
        await endpoint.aclose()
    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k"
    assert request.headers["content-type"] == "application/json"
    assert request.body == {"model": "m", "messages": []}


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (
            "openai",
            b'{"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}],'
            b' "usage": {"prompt_tokens": -5, "completion_tokens": 3}}',
        ),
        (
            "anthropic",
            b'{"content": [], "stop_reason": "tool_use", "usage": {"input_tokens": 10, "output_tokens": -1}}',
        ),
        ("gemini", b'{"candidates": [], "usageMetadata": {"promptTokenCount": -3}}'),
    ],
)
def test_negative_token_counts_are_a_parsing_error_not_a_crash(model: str, body: bytes) -> None:
    from worker.providers import anthropic, gemini, openai
    from worker.providers.http import parse_response

    shape = {"openai": openai._Completion, "anthropic": anthropic._Message, "gemini": gemini._Response}[model]
    with pytest.raises(ProviderError) as caught:
        parse_response(shape, body, model, "a response")
    assert caught.value.code is ErrorCode.PARSING_ERROR


@pytest.mark.parametrize("confidence", [10**400, float("nan"), float("inf")], ids=["huge int", "nan", "inf"])
def test_a_confidence_no_float_can_hold_is_a_parsing_error_not_a_crash(confidence: object) -> None:
    from contracts import TokenUsage
    from worker.providers.base import parse_answer

    answer = {"winner": "Essay A", "justification": "Clearer.", "confidence": confidence}
    with pytest.raises(ProviderError) as raised:
        parse_answer(answer, "m", TokenUsage(), "openai")
    assert raised.value.code is ErrorCode.PARSING_ERROR


async def test_a_body_that_decompresses_past_the_cap_is_an_error_not_all_the_memory() -> None:
    import gzip

    from aiohttp import web

    from worker.providers.http import MAX_BODY_BYTES

    bomb = gzip.compress(b"0" * (MAX_BODY_BYTES + 1))  # some kB on the wire

    async def answer(_: web.Request) -> web.Response:
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return web.Response(body=bomb, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    endpoint = make_endpoint(ProviderSettings(), f"http://127.0.0.1:{port}", {})
    try:
        with pytest.raises(ProviderError) as caught:
            await endpoint.post_json("openai", "/v1/chat/completions", {"model": "m"})
    finally:
        await endpoint.aclose()
        await runner.cleanup()
    assert len(bomb) < 20_000
    assert caught.value.code is ErrorCode.EXTERNAL_SERVICE_ERROR and caught.value.retryable is False


def test_a_lone_surrogate_in_an_error_body_does_not_reach_the_events() -> None:
    # json.loads accepts "\ud83d" alone; no JSON writer takes it, so the failure event could not be built.
    raw = b'{"error": {"message": "bad \\ud83d thing", "type": "server_error\\udc00"}}'
    err = classify_error("openai", 500, raw, {})
    assert err.message == "openai HTTP 500: bad ? thing"
    assert err.details["provider_error_type"] == "server_error?"
    detail = ErrorDetail.from_code(err.code, err.message, uuid.uuid4(), **err.details)
    LLMProviderFailureV1(
        request_id="r", correlation_id=uuid.uuid4(), provider="openai", model="m", error_detail=detail
    ).model_dump_json()  # serialisable
