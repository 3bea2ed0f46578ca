"""A loopback fake of the four provider APIs, for tests, the demo and the benchmarks.

Paths and bodies follow the real APIs:
    POST /v1/chat/completions and /api/v1/chat/completions    OpenAI, OpenAI-compatible, OpenRouter
    POST /v1/messages                                          Anthropic
    POST /v1beta/models/{model}:generateContent                Gemini

Every request is answered after `latency_ms` with the scenario taken from the queue (`enqueue`), else the
`x-fake-scenario` request header, else `default_scenario`:
    ok            a valid structured answer with realistic usage (prompt-cache reads on repeats)
    rate_limit    429 with Retry-After and the provider's rate-limit error body
    server_error  500;  overloaded  529 (Anthropic) / 503 (others);  auth  401
    context_length  400 with the provider's prompt-too-long error
    truncated     200 cut at the token limit (finish_reason length / stop_reason max_tokens / MAX_TOKENS)
    malformed     200 whose answer text is not JSON;  bad_answer  200 with confidence 7
    refused       200 refusal (OpenAI refusal / Anthropic stop_reason refusal / Gemini finishReason SAFETY)
    not_json      200 whose body is not JSON;  slow  answers after `slow_ms`;  hangup  closes the socket
    flagged       OpenAI 400 invalid_prompt (reasoning models' policy refusal) / OpenRouter 403 moderation
    error_in_200  OpenRouter 200 whose body is an upstream error;  choice_error  OpenRouter 200 with
                  finish_reason "error" and the error in the choice
    context_window  Anthropic 200 with stop_reason model_context_window_exceeded
Received requests are recorded (`requests`) unless `record=False`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import pydantic_core
from aiohttp import web

_STRUCTURED = ["max_tokens", "temperature", "response_format", "structured_outputs"]
_CATALOG = [
    ("openai/gpt-4.1-mini", _STRUCTURED),
    ("openai/o4-mini", [*_STRUCTURED, "reasoning"]),
    ("google/gemini-2.5-flash", _STRUCTURED),
    ("anthropic/claude-sonnet-4.5", _STRUCTURED),
    ("mistralai/mistral-large", _STRUCTURED),
    ("meta-llama/llama-3.3-70b-instruct", ["max_tokens", "temperature", "response_format"]),
    ("openai/gpt-3.5-turbo-instruct", ["max_tokens", "temperature"]),
]
_JUSTIFICATION = "It argues its thesis more clearly and supports it with better evidence."


@dataclass(frozen=True, slots=True)
class Received:
    """One request the fake server received."""

    api: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any


class FakeProviderServer:
    def __init__(self, latency_ms: float = 0.0, slow_ms: float = 5000.0, record: bool = True) -> None:
        self.latency_ms = latency_ms
        self.slow_ms = slow_ms
        self.record = record
        self.default_scenario = "ok"
        self.requests: list[Received] = []
        self.served = 0
        self._queue: deque[str] = deque()
        self.catalog_status = 200  # answer of OpenRouter's GET /models (500: unavailable)
        self.catalog_served = 0
        self._seen_prefixes: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def enqueue(self, *scenarios: str) -> None:
        """Answer the next requests with these scenarios, in order."""
        self._queue.extend(scenarios)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/api/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_post("/v1beta/models/{target}", self._gemini)
        app.router.add_get("/api/v1/models", self._openrouter_models)
        return app

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve on host:port (0 = any free port); returns the base URL."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=4096)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- request handling ----------------------------------------------------------------------------

    async def _begin(self, api: str, request: web.Request) -> tuple[str, Any] | web.StreamResponse:
        raw = await request.read()
        try:
            body = pydantic_core.from_json(raw)
        except ValueError:
            body = None
        if self.record:
            self.requests.append(
                Received(api, request.path, {k.lower(): v for k, v in request.headers.items()}, body)
            )
        self.served += 1
        scenario = (
            self._queue.popleft()
            if self._queue
            else request.headers.get("x-fake-scenario", self.default_scenario)
        )
        delay_ms = self.slow_ms if scenario == "slow" else self.latency_ms
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if scenario == "hangup":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        if scenario == "not_json":
            return web.Response(
                status=200, text="<html>upstream proxy error</html>", content_type="text/html"
            )
        if not isinstance(body, dict):
            return _error(api, 400, "invalid_request_error", "request body is not JSON")
        return scenario, body

    async def _openrouter_models(self, request: web.Request) -> web.StreamResponse:
        """OpenRouter's model list: each model's id and the request parameters it supports."""
        self.catalog_served += 1
        if self.catalog_status != 200:
            return _error("openai", self.catalog_status, "server_error", "catalog unavailable")
        return _json_response({"data": [{"id": m, "supported_parameters": p} for m, p in _CATALOG]})

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        begun = await self._begin("openai", request)
        if isinstance(begun, web.StreamResponse):
            return begun
        scenario, body = begun
        if request.path.startswith("/api/") and (failure := _openrouter_failure(scenario)) is not None:
            return failure
        if (failure := _failure("openai", scenario)) is not None:
            return failure
        if not request.path.startswith("/api/") and (refused := _openai_parameters(body)) is not None:
            return refused
        messages = body.get("messages") or []
        text = "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        system = next((str(m.get("content")) for m in messages if m.get("role") == "system"), "")
        prompt = _tokens(text)
        cached = _tokens(system) if self._seen(f"openai:{system}") and _tokens(system) >= 32 else 0
        completion = 60
        content: str | None = _answer_text(text, scenario)
        refusal = None
        finish = {"truncated": "length"}.get(scenario, "stop")
        if scenario == "truncated":
            content = content[:20] if content else content
        if scenario == "refused":
            content, refusal = None, "I can't help with that."
        reasoning = (
            32 if str(body.get("model", "")).rsplit("/", 1)[-1].startswith(("o1", "o3", "o4", "gpt-5")) else 0
        )
        return _json_response(
            {
                "id": f"chatcmpl-{_digest(text)[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": refusal},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion + reasoning,
                    "total_tokens": prompt + completion + reasoning,
                    "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
                },
                "system_fingerprint": "fp_fake",
            }
        )

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        begun = await self._begin("anthropic", request)
        if isinstance(begun, web.StreamResponse):
            return begun
        scenario, body = begun
        if (failure := _failure("anthropic", scenario)) is not None:
            return failure
        blocks = _anthropic_blocks(body)
        text = "".join(b.get("text", "") for b in blocks)
        created = created_1h = read = uncached = 0
        prefix = ""
        pending = 0
        for block in blocks:
            prefix += block.get("text", "")
            pending += _tokens(block.get("text", ""))
            if "cache_control" in block:
                if self._seen(f"anthropic:{prefix}"):
                    read += pending
                else:
                    created += pending
                    if block["cache_control"].get("ttl") == "1h":
                        created_1h += pending
                pending = 0
        uncached = pending
        answer = _answer_obj(text, scenario)
        tool_name = (body.get("tool_choice") or {}).get("name", "record_comparison")
        content: list[dict[str, Any]] = [
            {"type": "tool_use", "id": f"toolu_{_digest(text)[:20]}", "name": tool_name, "input": answer}
        ]
        stop = "tool_use"
        if scenario == "truncated":
            stop, content = "max_tokens", [{"type": "text", "text": "Essay A is"}]
        elif scenario == "malformed":
            content = [{"type": "text", "text": "I think Essay A is better."}]
            stop = "end_turn"
        elif scenario == "refused":
            stop, content = "refusal", []
        elif scenario == "context_window":
            stop, content = "model_context_window_exceeded", [{"type": "text", "text": "Essay A"}]
        return _json_response(
            {
                "id": f"msg_{_digest(text)[:24]}",
                "type": "message",
                "role": "assistant",
                "model": body.get("model"),
                "content": content,
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": uncached,
                    "cache_creation_input_tokens": created,
                    "cache_read_input_tokens": read,
                    "cache_creation": {
                        "ephemeral_5m_input_tokens": created - created_1h,
                        "ephemeral_1h_input_tokens": created_1h,
                    },
                    "output_tokens": 70,
                },
            }
        )

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        if not request.match_info["target"].endswith(":generateContent"):
            return _error("gemini", 404, "NOT_FOUND", "method not found")
        begun = await self._begin("gemini", request)
        if isinstance(begun, web.StreamResponse):
            return begun
        scenario, body = begun
        if (failure := _failure("gemini", scenario)) is not None:
            return failure
        parts = [p for c in body.get("contents") or [] for p in c.get("parts") or []]
        system = "".join(p.get("text", "") for p in (body.get("systemInstruction") or {}).get("parts") or [])
        text = system + "".join(p.get("text", "") for p in parts)
        prompt = _tokens(text)
        cached = _tokens(system) if self._seen(f"gemini:{system}") and _tokens(system) >= 32 else 0
        usage = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": 55,
            "thoughtsTokenCount": 20,
            "totalTokenCount": prompt + 75,
        }
        if cached:
            usage["cachedContentTokenCount"] = cached
        version = request.match_info["target"].split(":")[0]
        if scenario == "refused":
            return _json_response(
                {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage, "modelVersion": version}
            )
        answer = _answer_text(text, scenario)
        finish = "STOP"
        if scenario == "truncated":
            answer, finish = answer[:20], "MAX_TOKENS"
        return _json_response(
            {
                "candidates": [
                    {
                        "content": {"parts": [{"text": answer}], "role": "model"},
                        "finishReason": finish,
                        "index": 0,
                    }
                ],
                "usageMetadata": usage,
                "modelVersion": version,
                "responseId": _digest(text)[:20],
            }
        )

    def _seen(self, key: str) -> bool:
        digest = _digest(key)
        if digest in self._seen_prefixes:
            return True
        self._seen_prefixes.add(digest)
        return False


def _anthropic_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """System then message content as a list of text blocks (strings become one block)."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    out += [{"text": system}] if isinstance(system, str) else list(system or [])
    for message in body.get("messages") or []:
        content = message.get("content")
        out += [{"text": content}] if isinstance(content, str) else list(content or [])
    return out


def _failure(api: str, scenario: str) -> web.Response | None:
    if scenario == "rate_limit":
        headers = {"retry-after": "7"}
        if api == "openai":
            return _error(api, 429, "rate_limit_exceeded", "Rate limit reached for requests", headers)
        if api == "anthropic":
            return _error(
                api, 429, "rate_limit_error", "Number of request tokens has exceeded your rate limit", headers
            )
        return _error(
            api,
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
            headers,
        )
    if scenario == "server_error":
        kind = {"openai": "server_error", "anthropic": "api_error", "gemini": "INTERNAL"}[api]
        return _error(api, 500, kind, "An internal error has occurred.")
    if scenario == "overloaded":
        if api == "anthropic":
            return _error(api, 529, "overloaded_error", "Overloaded")
        kind = "server_error" if api == "openai" else "UNAVAILABLE"
        return _error(api, 503, kind, "The model is overloaded. Please try again later.")
    if scenario == "auth":
        if api == "gemini":
            return _error(api, 400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
        kind = "invalid_api_key" if api == "openai" else "authentication_error"
        return _error(api, 401, kind, "Invalid API key provided.")
    if scenario == "flagged" and api == "openai":
        return _error(
            api,
            400,
            "invalid_prompt",
            "Invalid prompt: your prompt was flagged as potentially violating our usage policy. Please try "
            "again with a different prompt.",
        )
    if scenario == "context_length":
        message = {
            "openai": "This model's maximum context length is 128000 tokens. However, your messages resulted "
            "in 210000 tokens.",
            "anthropic": "prompt is too long: 210000 tokens > 200000 maximum",
            "gemini": "The input token count (2100000) exceeds the maximum number of tokens allowed "
            "(1048576).",
        }[api]
        kind = {"openai": "context_length_exceeded", "anthropic": "invalid_request_error"}.get(
            api, "INVALID_ARGUMENT"
        )
        return _error(api, 400, kind, message)
    return None


def _openrouter_failure(scenario: str) -> web.Response | None:
    """OpenRouter's own failures: moderation (403), and errors it answers with HTTP 200."""
    if scenario == "flagged":
        error = {
            "code": 403,
            "message": "Your chosen model requires moderation and your input was flagged",
            "metadata": {"reasons": ["harassment"], "flagged_input": "...", "provider_name": "OpenAI"},
        }
        return _json_response({"error": error}, status=403)
    if scenario == "error_in_200":
        error = {"code": 502, "message": "Provider returned error", "metadata": {"provider_name": "Fake"}}
        return _json_response({"error": error, "user_id": "user_fake"})
    if scenario == "choice_error":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": ""},
            "finish_reason": "error",
            "native_finish_reason": "error",
            "error": {"code": 429, "message": "Rate limit exceeded upstream", "metadata": {}},
        }
        return _json_response(
            {
                "id": "gen-fake",
                "object": "chat.completion",
                "model": "openai/gpt-4.1-mini",
                "choices": [choice],
            }
        )
    return None


def _error(
    api: str, status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The provider's real error body shape."""
    body: dict[str, Any]
    if api == "anthropic":
        body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}
    elif api == "gemini":
        error: dict[str, Any] = {"code": status, "message": message, "status": kind}
        if "API key" in message:
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ]
        if status == 429:  # a per-minute limit, as Gemini words it (the message mentions billing too)
            quota = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": quota,
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                        }
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"},
            ]
        body = {"error": error}
    else:
        body = {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "param": None,
                "code": kind,
            }
        }
    return _json_response(body, status=status, headers=headers)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _answer_obj(text: str, scenario: str) -> dict[str, Any]:
    digest = _digest(text)
    winner = "Essay A" if int(digest[0], 16) % 2 == 0 else "Essay B"
    confidence = 7 if scenario == "bad_answer" else 1 + int(digest[1], 16) % 5
    return {"winner": winner, "justification": f"{winner}: {_JUSTIFICATION}", "confidence": confidence}


def _answer_text(text: str, scenario: str) -> str:
    if scenario == "malformed":
        return "Essay A is better, confidence high"
    return pydantic_core.to_json(_answer_obj(text, scenario)).decode()


async def serve(port: int, latency_ms: float, host: str = "127.0.0.1") -> None:
    """Run until cancelled (the `llm-worker fake-server` command)."""
    server = FakeProviderServer(latency_ms=latency_ms, record=False)
    url = await server.start(port, host)
    print(f"fake provider server on {url} (latency {latency_ms:.0f} ms)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """web.json_response through pydantic_core (a third of json.dumps' CPU): the stand-in provider shares
    the machine's two cores with the worker it serves."""
    return web.Response(
        body=pydantic_core.to_json(body), status=status, headers=headers, content_type="application/json"
    )


def _openai_parameters(body: dict[str, Any]) -> web.Response | None:
    """OpenAI's 400s for parameters a model does not take, as its API words them: reasoning models (o-series,
    gpt-5 but its chat and search models) take max_completion_tokens, no max_tokens, only the default
    temperature, and reasoning_effort values by family ("none" from gpt-5.1 on, "minimal" on gpt-5 only);
    other models refuse reasoning_effort."""
    model = str(body.get("model", "")).rsplit("/", 1)[-1]
    reasoning = model.startswith(("o1", "o3", "o4", "gpt-5")) and not model.startswith(
        ("gpt-5-chat", "gpt-5-search")
    )

    def refuse(message: str, param: str, code: str | None) -> web.Response:
        error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
        return web.json_response({"error": error}, status=400)

    if not reasoning:
        if "reasoning_effort" in body:
            return refuse(
                "Unrecognized request argument supplied: reasoning_effort", "reasoning_effort", None
            )
        return None
    if "max_tokens" in body:
        return refuse(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    if body.get("temperature", 1) != 1:
        return refuse(
            f"Unsupported value: 'temperature' does not support {body['temperature']} with this model. "
            "Only the default (1) value is supported.",
            "temperature",
            "unsupported_value",
        )
    effort = body.get("reasoning_effort")
    takes = {"low", "medium", "high"} | ({"minimal"} if model.startswith("gpt-5") else set())
    if model.startswith("gpt-5."):
        takes |= {"none"}
    if effort is not None and effort not in takes:
        return refuse(
            f"Unsupported value: '{effort}' is not supported with the '{model}' model. "
            f"Supported values are: {', '.join(repr(v) for v in sorted(takes))}.",
            "reasoning_effort",
            "unsupported_value",
        )
    return None
