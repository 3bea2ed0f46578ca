"""The HTTP edge shared by the real providers: one connection pool per provider, one POST per call, and the
one place where HTTP failures become ProviderErrors.

    no answer   httpx.TimeoutException      -> TIMEOUT
                httpx.TransportError        -> CONNECTION_ERROR
    bad answer  401/403 (and Gemini's 400 API_KEY_INVALID)          -> AUTHENTICATION_ERROR
                400/413 that says the prompt is too long            -> CONTENT_TOO_LONG
                400 that says the content was refused               -> CONTENT_POLICY
                other 400/422 -> VALIDATION_ERROR, 404 -> CONFIGURATION_ERROR (unknown model)
                408 -> TIMEOUT; 429 -> RATE_LIMIT (not retryable when the quota is spent)
                409, 5xx, 529 overloaded -> EXTERNAL_SERVICE_ERROR (retryable)

Requests use the aiohttp transport (httpx-aiohttp): httpx's own pool spends far more CPU per request at
high concurrency (encode/httpx#3215), which bench/bench_http.py measures.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import httpx
import pydantic_core
from httpx_aiohttp import AiohttpTransport
from pydantic import BaseModel, ValidationError

from contracts import ErrorCode, TokenUsage
from worker.errors import ProviderError
from worker.providers.base import Answer, parse_answer
from worker.settings import ProviderSettings

_M = TypeVar("_M", bound=BaseModel)

_MESSAGE_CHARS = 300
_MAX_CACHED_URLS = 256

_TOO_LONG_HINTS = (
    "context_length_exceeded",
    "maximum context length",
    "prompt is too long",
    "context window",
    "too many tokens",
    "input token count",
    "exceeds the maximum number of tokens",
    "request_too_large",
)
_POLICY_HINTS = ("content_policy_violation", "content_filter", "safety")
_QUOTA_SPENT_HINTS = ("insufficient_quota", "enforced_spend_limit_reached", "billing")


class AiohttpBodyTransport(AiohttpTransport):
    """httpx-aiohttp's transport, reading each (small, JSON) answer whole in one `read()` instead of
    streaming it through httpx's async byte iterators, and raising the right httpx error: the upstream
    map turns every aiohttp connection error (refused, reset, hung up) into httpx.ConnectTimeout."""

    def get_client(self) -> aiohttp.ClientSession:
        """No cookie jar: provider APIs are stateless, and the jar costs CPU on every call."""
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        timeout = request.extensions.get("timeout", {})
        try:
            async with self.client.request(
                request.method,
                str(request.url),
                headers=request.headers,
                data=request.content or None,
                allow_redirects=False,
                auto_decompress=False,  # httpx decodes by content-encoding when the body is read
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                    connect=timeout.get("pool"),
                ),
            ) as response:
                content = await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError is a TimeoutError too
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(response.status, headers=response.raw_headers, content=content, request=request)


@dataclass(slots=True)
class HttpEndpoint:
    """One provider's base URL, fixed headers (auth) and timeouts over a pooled httpx transport.

    Requests go straight to the transport (`handle_async_request`, httpx's one seam, so tests pass an
    httpx.MockTransport) rather than through httpx.AsyncClient: the client's cookie jar, redirect and
    auth machinery and per-call URL merging cost more CPU per call than the whole aiohttp request
    (bench/bench_http.py), and a provider call needs none of them."""

    transport: httpx.AsyncBaseTransport
    base_url: str
    headers: Mapping[str, str]  # an httpx.Headers in production: copied, not re-encoded, per request
    timeout: dict[str, float | None] = field(default_factory=dict)
    _urls: dict[str, httpx.URL] = field(default_factory=dict)

    def url(self, path: str) -> httpx.URL:
        """Parsed once per path (parsing is a third of httpx.Request's cost); bounded, since Gemini's
        path carries the model name."""
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(self.base_url + path)
            if len(self._urls) < _MAX_CACHED_URLS:
                self._urls[path] = url
        return url

    async def post_json(self, provider: str, path: str, payload: dict[str, Any]) -> bytes:
        """POST `payload` once; the 2xx body, or a classified ProviderError."""
        request = httpx.Request(
            "POST",
            self.url(path),
            content=pydantic_core.to_json(payload),  # a third of json.dumps' CPU
            headers=self.headers,
            extensions={"timeout": self.timeout},
        )
        try:
            response = await self.transport.handle_async_request(request)
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            raise classify_transport_error(provider, exc) from exc
        if response.status_code >= 300:
            raise classify_error(provider, response.status_code, body, response.headers)
        return body

    async def aclose(self) -> None:
        await self.transport.aclose()


def make_endpoint(settings: ProviderSettings, base_url: str, headers: Mapping[str, str]) -> HttpEndpoint:
    """An endpoint on the aiohttp transport with pool size and timeouts from the settings."""
    limits = httpx.Limits(
        max_connections=settings.http_max_connections,
        max_keepalive_connections=settings.http_max_connections,
        keepalive_expiry=settings.http_keepalive_expiry_s,
    )
    timeout: dict[str, float | None] = {
        "connect": settings.http_connect_timeout_s,
        "read": settings.http_read_timeout_s,
        "write": settings.http_read_timeout_s,
        "pool": settings.http_read_timeout_s,
    }
    return HttpEndpoint(
        AiohttpBodyTransport(limits=limits),
        base_url.rstrip("/"),
        httpx.Headers({**headers, "content-type": "application/json"}),
        timeout,
    )


def classify_transport_error(provider: str, exc: httpx.TransportError) -> ProviderError:
    """No answer: a timeout or a connection that failed. When the error came from aiohttp its cause
    decides (the stock httpx-aiohttp map calls a refused connection a ConnectTimeout)."""
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, TimeoutError):
        timed_out = False
    else:
        timed_out = isinstance(exc, httpx.TimeoutException)
    if timed_out:
        return ProviderError(
            ErrorCode.TIMEOUT, f"{provider} did not answer in time", provider=provider, retryable=True
        )
    return ProviderError(
        ErrorCode.CONNECTION_ERROR,
        f"{provider} could not be reached: {type(cause or exc).__name__}",
        provider=provider,
        retryable=True,
    )


def classify_error(
    provider: str, status: int, body: bytes | str, headers: Mapping[str, str]
) -> ProviderError:
    """A non-2xx answer -> ProviderError with retryable, provider, http_status, provider_error_type and
    retry_after_s. Reads the error bodies of OpenAI/OpenRouter ({"error": {type, code, message}}),
    Anthropic ({"type": "error", "error": {type, message}}) and Gemini ({"error": {status, message,
    details}})."""
    error_type, message, retry_delay_s = _error_fields(body)
    hints = f"{error_type} {message}".lower()
    retry_after_s = _retry_after_s(headers)
    if retry_after_s is None:
        retry_after_s = retry_delay_s
    code, retryable = _code_for(status, hints)
    return ProviderError(
        code,
        f"{provider} HTTP {status}: {message[:_MESSAGE_CHARS] or error_type or 'no message'}",
        provider=provider,
        http_status=status,
        provider_error_type=error_type or None,
        retry_after_s=retry_after_s,
        retryable=retryable,
    )


def _code_for(status: int, hints: str) -> tuple[ErrorCode, bool]:
    if status in (401, 403) or "api_key_invalid" in hints:
        return ErrorCode.AUTHENTICATION_ERROR, False
    if status == 429:
        return ErrorCode.RATE_LIMIT, not any(h in hints for h in _QUOTA_SPENT_HINTS)
    if status == 408:
        return ErrorCode.TIMEOUT, True
    if status >= 500 or status == 409:
        return ErrorCode.EXTERNAL_SERVICE_ERROR, True
    if status in (400, 413, 422) and any(h in hints for h in _TOO_LONG_HINTS):
        return ErrorCode.CONTENT_TOO_LONG, False
    if status == 400 and any(h in hints for h in _POLICY_HINTS):
        return ErrorCode.CONTENT_POLICY, False
    if status == 404:
        return ErrorCode.CONFIGURATION_ERROR, False
    if status in (400, 413, 422):
        return ErrorCode.VALIDATION_ERROR, False
    return ErrorCode.EXTERNAL_SERVICE_ERROR, False


def _error_fields(body: bytes | str) -> tuple[str, str, float | None]:
    """(provider error type, message, Gemini RetryInfo delay) from any of the providers' error bodies."""
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if isinstance(doc, list) and doc:  # Gemini sometimes wraps the error in a list
        doc = doc[0]
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return "", text.strip()[:_MESSAGE_CHARS], None
    kinds = [error.get(k) for k in ("code", "type", "status")]
    error_type = next((k for k in kinds if isinstance(k, str) and k), "")
    message = str(error.get("message") or "")
    retry_delay_s = None
    for detail in error.get("details") or ():
        if not isinstance(detail, dict):
            continue
        if detail.get("reason"):  # google.rpc.ErrorInfo, e.g. API_KEY_INVALID
            error_type = f"{error_type}:{detail['reason']}" if error_type else str(detail["reason"])
        delay = detail.get("retryDelay")  # google.rpc.RetryInfo, e.g. "30s"
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                retry_delay_s = float(delay[:-1])
            except ValueError:
                pass
    return error_type, message, retry_delay_s


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_response(model: type[_M], body: bytes, provider: str, what: str) -> _M:
    """A provider's 200 body as its response model; a body of another shape is PARSING_ERROR."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise ProviderError(ErrorCode.PARSING_ERROR, f"response is not {what}", provider=provider) from exc


def billed_failure(
    code: ErrorCode, provider: str, message: str, reason: str | None, usage: TokenUsage
) -> ProviderError:
    """A failed but billed call: the usage rides along under details["usage"] for the cost event.
    Truncation and refusals are not retried: the same request would end the same way."""
    details: dict[str, Any] = {"provider": provider, "usage": usage}
    if reason is not None:
        details["provider_error_type"] = reason
    if reason in ("length", "max_tokens", "MAX_TOKENS") or code is ErrorCode.CONTENT_POLICY:
        details["retryable"] = False
    return ProviderError(code, f"{provider}: {message}", **details)


def parse_billed_answer(obj: Any, model: str, usage: TokenUsage, provider: str) -> Answer:
    """parse_answer, keeping the usage of a billed call on the PARSING_ERROR."""
    try:
        return parse_answer(obj, model, usage, provider)
    except ProviderError as exc:
        exc.details["usage"] = usage
        raise
