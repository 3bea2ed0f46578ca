"""The HTTP edge shared by the real providers: one connection pool per provider, one POST per call, and the
one place where HTTP failures become ProviderErrors.

    no answer   a timeout (TimeoutError, httpx.TimeoutException)               -> TIMEOUT
                no connection or a broken one (aiohttp.ClientError, httpx.TransportError) -> CONNECTION_ERROR
    bad answer  401/403 (and Gemini's 400 API_KEY_INVALID)          -> AUTHENTICATION_ERROR
                400/413 that says the prompt is too long            -> CONTENT_TOO_LONG
                400 that says the content was refused               -> CONTENT_POLICY
                other 400/422 -> VALIDATION_ERROR, 404 -> CONFIGURATION_ERROR (unknown model)
                408 -> TIMEOUT; 429 -> RATE_LIMIT (not retryable when the quota is spent)
                409, 5xx, 529 overloaded -> EXTERNAL_SERVICE_ERROR (retryable)

Requests go through one aiohttp.ClientSession per provider, called directly: httpx's own pool spends far
more CPU per request at high concurrency (encode/httpx#3215), and httpx.AsyncClient over the aiohttp
transport (httpx-aiohttp) still doubles the CPU of a call; bench/bench_http.py measures all three. Any
httpx transport can stand in (HttpxSender), which is how tests inject httpx.MockTransport.
"""

from __future__ import annotations

import email.utils
import functools
import json
import math
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp
import httpx
import pydantic_core
import yarl
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
    "exceed context limit",  # Anthropic: "input length and `max_tokens` exceed context limit: a + b > c"
)
# invalid_prompt: OpenAI's reasoning models' "your prompt was flagged as potentially violating our usage
# policy".
_POLICY_HINTS = ("content_policy_violation", "content_filter", "safety", "invalid_prompt")
# A 429 for a spent quota: codes, not words of the message (Gemini's per-minute 429 says "check your plan
# and billing details" too). Gemini's is told by its QuotaFailure: a per-day quota.
# OpenAI's "Request too large for <model> ... on tokens per min" is a request bigger than the whole
# per-minute quota: never admitted, however long it waits. OpenRouter's daily limit of free-model requests
# says "free-models-per-day" (or "...-per-day-high-balance").
_QUOTA_SPENT_HINTS = (
    "insufficient_quota",
    "enforced_spend_limit_reached",
    "perday",
    "per-day",
    "request too large",
)
# Anthropic's account out of credit is a 400 invalid_request_error: "Your credit balance is too low to access
# the Anthropic API...". A spent quota, like OpenRouter's 402, not a fault of the request.
_CREDIT_SPENT_HINTS = ("credit balance is too low",)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """The CAs httpx trusts (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), loaded once: ~50 ms each time."""
    return httpx.create_ssl_context()


class AiohttpSender:
    """One provider's pooled connections: an aiohttp.ClientSession with the provider's fixed headers and
    timeouts, opened on first use (it must be created inside the running loop).

    The session's own defaults carry headers and timeouts, so a call passes only the URL and the body; no
    cookie jar (provider APIs are stateless, and the jar costs CPU on every call), no redirects."""

    def __init__(
        self,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
        max_connections: int,
        keepalive_expiry_s: float,
    ) -> None:
        self.headers = dict(headers)
        self.timeout = timeout
        self.max_connections = max_connections
        self.keepalive_expiry_s = keepalive_expiry_s
        self.ssl_context = _ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, yarl.URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections,
            keepalive_timeout=self.keepalive_expiry_s,
            ssl=self.ssl_context,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers,
            timeout=self.timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    def _url(self, url: str) -> yarl.URL:
        """Parsed once per URL; bounded, since Gemini's path carries the model name."""
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = yarl.URL(url)
            if len(self._urls) < _MAX_CACHED_URLS:
                self._urls[url] = parsed
        return parsed

    async def post(self, url: str, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        """Raises TimeoutError (no answer in time), aiohttp.ClientError (no connection, or it broke) or
        BodyTooLarge."""
        session = self._session or self._open()
        async with session.post(self._url(url), data=body, allow_redirects=False) as response:
            return response.status, response.headers, await _read_capped(response.content.iter_any())

    async def get(self, url: str) -> tuple[int, Mapping[str, str], bytes]:
        session = self._session or self._open()
        async with session.get(url, allow_redirects=False) as response:
            return response.status, response.headers, await _read_capped(response.content.iter_any())

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


#: Largest response body read from a provider (after decompression). An answer is a few kB; more is a
#: broken endpoint, or a compressed body that would decompress into all the memory there is.
MAX_BODY_BYTES = 8 * 1024 * 1024


class BodyTooLarge(Exception):
    pass


async def _read_capped(chunks: AsyncIterator[bytes]) -> bytes:
    """A response body (aiohttp's or httpx's chunks, decompressed), up to MAX_BODY_BYTES."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge(f"response body over {MAX_BODY_BYTES} bytes")
    return bytes(body)


class HttpxSender:
    """Any httpx transport: httpx.MockTransport in tests, httpx's own pool in the benchmark. Raises
    httpx.TransportError (httpx.TimeoutException for no answer in time)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        headers: Mapping[str, str],
        timeout: Mapping[str, float | None] | None = None,
    ) -> None:
        self.transport = transport
        self.headers = httpx.Headers({**headers, "content-type": "application/json"})
        self.timeout = dict(timeout or {})

    async def post(self, url: str, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        return await self._send("POST", url, body)

    async def get(self, url: str) -> tuple[int, Mapping[str, str], bytes]:
        return await self._send("GET", url, None)

    async def _send(self, method: str, url: str, body: bytes | None) -> tuple[int, Mapping[str, str], bytes]:
        extensions = {"timeout": self.timeout}
        request = httpx.Request(method, url, content=body, headers=self.headers, extensions=extensions)
        response = await self.transport.handle_async_request(request)
        try:
            content = await _read_capped(response.aiter_bytes())
        finally:
            await response.aclose()
        return response.status_code, response.headers, content

    async def aclose(self) -> None:
        await self.transport.aclose()


class Sender(Protocol):
    """The seam under HttpEndpoint: one POST of a JSON body (or a GET), answered with (status, headers,
    body)."""

    async def post(self, url: str, body: bytes) -> tuple[int, Mapping[str, str], bytes]: ...

    async def get(self, url: str) -> tuple[int, Mapping[str, str], bytes]: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class HttpEndpoint:
    """One provider's base URL over a Sender that holds its pooled connections, fixed headers (auth) and
    timeouts. In production the sender is aiohttp, called directly: httpx.AsyncClient (on any transport,
    httpx-aiohttp's included) costs more CPU per call than the whole aiohttp request, and a provider call
    needs none of its cookie, redirect, auth or URL-merging machinery (bench/bench_http.py measures it)."""

    sender: Sender
    base_url: str

    async def post_json(self, provider: str, path: str, payload: dict[str, Any]) -> bytes:
        """POST `payload` once; the 2xx body, or a classified ProviderError."""
        content = pydantic_core.to_json(payload)  # a third of json.dumps' CPU
        del payload  # not held while the call is in flight: fewer live objects for the collector to walk
        try:
            status, headers, body = await self.sender.post(self.base_url + path, content)
        except (TimeoutError, aiohttp.ClientError, httpx.TransportError) as exc:
            raise classify_transport_error(provider, exc) from exc
        except BodyTooLarge as exc:
            raise _too_large(provider, exc) from exc
        if status >= 300:
            raise classify_error(provider, status, body, headers)
        return body

    async def get(self, provider: str, path: str) -> bytes:
        """GET once; the 2xx body, or a classified ProviderError."""
        try:
            status, headers, body = await self.sender.get(self.base_url + path)
        except (TimeoutError, aiohttp.ClientError, httpx.TransportError) as exc:
            raise classify_transport_error(provider, exc) from exc
        except BodyTooLarge as exc:
            raise _too_large(provider, exc) from exc
        if status >= 300:
            raise classify_error(provider, status, body, headers)
        return body

    async def aclose(self) -> None:
        await self.sender.aclose()


def make_endpoint(settings: ProviderSettings, base_url: str, headers: Mapping[str, str]) -> HttpEndpoint:
    """An endpoint on its own aiohttp session with pool size and timeouts from the settings."""
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.http_read_timeout_s,  # waiting for a free pooled connection, plus connecting
        sock_connect=settings.http_connect_timeout_s,
        sock_read=settings.http_read_timeout_s,
    )
    sender = AiohttpSender(
        {**headers, "content-type": "application/json"},
        timeout,
        settings.http_max_connections,
        settings.http_keepalive_expiry_s,
    )
    return HttpEndpoint(sender, base_url.rstrip("/"))


def _too_large(provider: str, exc: BodyTooLarge) -> ProviderError:
    return ProviderError(
        ErrorCode.EXTERNAL_SERVICE_ERROR, f"{provider}: {exc}", provider=provider, retryable=False
    )


def classify_transport_error(provider: str, exc: Exception) -> ProviderError:
    """No answer: a timeout, or a connection that could not be made or broke (refused, reset, hung up)."""
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        # Timed out reading the answer: the request was sent, so the provider had the prompt (and may bill
        # it). Not so for a connect timeout, or a wait for a pooled connection.
        sent = isinstance(exc, aiohttp.SocketTimeoutError | httpx.ReadTimeout)
        return ProviderError(
            ErrorCode.TIMEOUT,
            f"{provider} did not answer in time",
            provider=provider,
            retryable=True,
            **({"unanswered": True} if sent else {}),
        )
    return ProviderError(
        ErrorCode.CONNECTION_ERROR,
        f"{provider} could not be reached: {type(exc).__name__}",
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
    error_type, message, retry_delay_s, quota_ids = _error_fields(body)
    hints = f"{error_type} {message} {quota_ids}".lower()
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
    if status == 403 and "moderation" in hints and "flagged" in hints:  # OpenRouter's moderation refusal
        return ErrorCode.CONTENT_POLICY, False
    if status in (401, 403) or "api_key_invalid" in hints:
        return ErrorCode.AUTHENTICATION_ERROR, False
    if status == 429:
        return ErrorCode.RATE_LIMIT, not any(h in hints for h in _QUOTA_SPENT_HINTS)
    if status == 402 or (status == 400 and any(h in hints for h in _CREDIT_SPENT_HINTS)):
        # Credits spent (OpenRouter's 402, Anthropic's 400): a spent quota (falls back), not an unhealthy
        # provider nor a bad request.
        return ErrorCode.RATE_LIMIT, False
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


def _error_fields(body: bytes | str) -> tuple[str, str, float | None, str]:
    """(provider error type, message, Gemini RetryInfo delay, Gemini QuotaFailure quota ids) from any of the
    providers' error bodies."""
    try:
        doc = json.loads(body) if body else None
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, list) and doc:  # Gemini sometimes wraps the error in a list
        doc = doc[0]
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return "", text.strip()[:_MESSAGE_CHARS], None, ""
    kinds = [error.get(k) for k in ("code", "type", "status")]
    # json.loads lets a lone surrogate escape through ("\ud83d"): no JSON writer takes it, so the event
    # carrying the message could not be built. It becomes "?".
    error_type = next((k for k in kinds if isinstance(k, str) and k), "")
    message = _utf8(str(error.get("message") or ""))
    retry_delay_s = None
    quota_ids: list[str] = []
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict):
            continue
        if detail.get("reason"):  # google.rpc.ErrorInfo, e.g. API_KEY_INVALID
            error_type = f"{error_type}:{detail['reason']}" if error_type else str(detail["reason"])
        violations = detail.get("violations")  # google.rpc.QuotaFailure
        for violation in violations if isinstance(violations, list) else ():
            if isinstance(violation, dict) and isinstance(violation.get("quotaId"), str):
                quota_ids.append(violation["quotaId"])  # e.g. GenerateRequestsPerDayPerProjectPerModel
        delay = detail.get("retryDelay")  # google.rpc.RetryInfo, e.g. "30s"
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                retry_delay_s = _finite(float(delay[:-1]))
            except ValueError:
                pass
    return _utf8(error_type), message, retry_delay_s, " ".join(quota_ids)


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _finite(value: float) -> float | None:
    """A delay a provider sent, unless it is NaN or infinite (float() accepts "nan" and "inf")."""
    return value if math.isfinite(value) else None


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            seconds = _finite(float(ms) / 1000)
            if seconds is not None:
                return max(0.0, seconds)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = _finite(float(value))
        return max(0.0, seconds) if seconds is not None else None
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


_NOT_AGAIN = (ErrorCode.CONTENT_POLICY, ErrorCode.CONTENT_TOO_LONG)


def billed_failure(
    code: ErrorCode, provider: str, message: str, reason: str | None, usage: TokenUsage
) -> ProviderError:
    """A failed but billed call: the usage rides along under details["usage"] for the cost event.
    Truncation and refusals are not retried: the same request would end the same way."""
    details: dict[str, Any] = {"provider": provider, "usage": usage}
    if reason is not None:
        details["provider_error_type"] = reason
    # LANGUAGE: Gemini does not answer in the prompt's language; asking again ends the same way.
    if reason in ("length", "max_tokens", "MAX_TOKENS", "LANGUAGE") or code in _NOT_AGAIN:
        details["retryable"] = False
    return ProviderError(code, f"{provider}: {message}", **details)


def parse_billed_answer(obj: Any, model: str, usage: TokenUsage, provider: str) -> Answer:
    """parse_answer, keeping the usage of a billed call on the PARSING_ERROR."""
    try:
        return parse_answer(obj, model, usage, provider)
    except ProviderError as exc:
        exc.details["usage"] = usage
        raise
