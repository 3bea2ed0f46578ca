"""OpenAI Chat Completions, and every endpoint that speaks it: OpenRouter and any OpenAI-compatible base URL
(vLLM, DeepSeek, Ollama, Together). Structured output via response_format json_schema (strict), or
json_object where a model can't do schemas."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, NonNegativeInt

from contracts import ErrorCode, TokenUsage
from worker.errors import ProviderError, WorkerError
from worker.providers.base import COMPARISON_SCHEMA, Answer, ComparisonCall
from worker.providers.http import (
    HttpEndpoint,
    billed_failure,
    classify_error,
    parse_billed_answer,
    parse_response,
)

#: The comparison schema in the strictest common subset of strict mode (OpenAI and OpenAI-compatible
#: servers): no length or range keywords, which some reject; parse_answer enforces both.
STRICT_SCHEMA: dict[str, Any] = {
    **COMPARISON_SCHEMA,
    "properties": {
        "winner": {"type": "string", "enum": ["Essay A", "Essay B"]},
        "justification": {"type": "string", "description": "At most 500 characters."},
        "confidence": {"type": "number", "description": "From 1 (guess) to 5 (certain)."},
    },
}

_JSON_OBJECT_INSTRUCTION = (
    "\n\nAnswer with only a JSON object with the keys winner ('Essay A' or 'Essay B'), justification "
    "(at most 500 characters) and confidence (a number from 1 to 5)."
)

_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")

log = logging.getLogger(__name__)


#: Named like the gpt-5 family but not reasoning models: ChatGPT's chat snapshot and the search model
#: refuse reasoning_effort and take temperature and max_tokens.
_NOT_REASONING_PREFIXES = ("gpt-5-chat", "gpt-5-search")


def is_reasoning_model(model: str) -> bool:
    """o-series and gpt-5 family (OpenRouter's `openai/` prefix ignored): no temperature, reasoning
    effort and max_completion_tokens instead."""
    bare = _bare(model)
    return bare.startswith(_REASONING_PREFIXES) and not bare.startswith(_NOT_REASONING_PREFIXES)


def openai_effort(model: str, effort: str) -> str:
    """The request's effort as the model takes it: "none" exists from gpt-5.1 on; before it, the lowest is
    "minimal" for gpt-5 (and -mini, -nano) and "low" for the o-series (they answer 400 unsupported_value)."""
    if effort != "none":
        return effort
    bare = _bare(model)
    if bare.startswith("gpt-5."):
        return "none"
    return "minimal" if bare.startswith("gpt-5") else "low"


def _bare(model: str) -> str:
    return model.rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class OpenAIDialect:
    """What differs between the endpoints on the OpenAI code path."""

    #: "json_schema" always, "json_object" always, or "by_model" (OpenRouter): as the provider's model list
    #: says (SchemaSupport), else json_schema for model ids that start with one of `json_schema_prefixes`.
    structured_output: Literal["json_schema", "json_object", "by_model"] = "json_schema"
    json_schema_prefixes: tuple[str, ...] = ()
    #: OpenRouter takes reasoning as {"reasoning": {"effort": ...}}; OpenAI as reasoning_effort.
    reasoning_object: bool = False
    #: OpenRouter: a json_schema request is routed only to hosts that take every parameter sent
    #: (provider.require_parameters), else a host that ignores the schema may answer free text.
    require_parameters: bool = False

    def uses_json_schema(self, model: str) -> bool:
        if self.structured_output == "by_model":
            return model.startswith(self.json_schema_prefixes)
        return self.structured_output == "json_schema"


OPENAI = OpenAIDialect()
OPENROUTER = OpenAIDialect(
    structured_output="by_model",
    json_schema_prefixes=("openai/", "google/", "anthropic/"),
    reasoning_object=True,
    require_parameters=True,
)


class _Message(BaseModel):
    content: str | None = None
    refusal: str | None = None


class _Choice(BaseModel):
    message: _Message
    finish_reason: str | None = None
    error: dict[str, Any] | None = None  # OpenRouter: an error mid-generation (finish_reason "error")


class _PromptDetails(BaseModel):
    cached_tokens: NonNegativeInt | None = 0


class _CompletionDetails(BaseModel):
    reasoning_tokens: NonNegativeInt | None = 0


class _Usage(BaseModel):
    prompt_tokens: NonNegativeInt = 0
    completion_tokens: NonNegativeInt = 0
    total_tokens: NonNegativeInt = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None

    def normalised(self) -> TokenUsage:
        pd, cd = self.prompt_tokens_details, self.completion_tokens_details
        return TokenUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens or self.prompt_tokens + self.completion_tokens,
            cached_tokens=(pd.cached_tokens or 0) if pd else 0,
            reasoning_tokens=(cd.reasoning_tokens or 0) if cd else 0,
        )


class _Completion(BaseModel):
    model: str | None = None
    choices: list[_Choice]
    usage: _Usage | None = None


class _ListedModel(BaseModel):
    id: str
    supported_parameters: list[str] = []


class _ModelList(BaseModel):
    data: list[_ListedModel]


class SchemaSupport:
    """Which models take response_format json_schema, from OpenRouter's GET /models: those listing
    "structured_outputs" among their supported_parameters. Fetched on first use (the first calls wait for
    it, at most FETCH_TIMEOUT_S) and again every REFRESH_S in the background; after a failed fetch the
    dialect's model-id prefixes decide until a retry RETRY_S later succeeds, as they do for a model the
    list does not name."""

    REFRESH_S = 3600.0
    RETRY_S = 60.0
    FETCH_TIMEOUT_S = 5.0

    def __init__(self, http: HttpEndpoint, provider: str, clock: Callable[[], float] = time.monotonic):
        self.http = http
        self.provider = provider
        self.clock = clock
        self.models: dict[str, bool] | None = None
        self.next_fetch = 0.0
        self._fetching: asyncio.Task[None] | None = None
        self._first: asyncio.Task[None] | None = None

    async def json_schema(self, model: str) -> bool | None:
        """True or False as listed; None when the list is unavailable or does not name the model."""
        if self._fetching is None and self.clock() >= self.next_fetch:
            self._fetching = asyncio.create_task(self._fetch())
            self._first = self._first or self._fetching
        first = self._first
        if first is not None and not first.done():  # only the first fetch is waited for
            await asyncio.shield(first)
        return self.models.get(model) if self.models is not None else None

    async def _fetch(self) -> None:
        try:
            async with asyncio.timeout(self.FETCH_TIMEOUT_S):
                body = await self.http.get(self.provider, "/models")
            listed = parse_response(_ModelList, body, self.provider, "a model list")
            self.models = {m.id: "structured_outputs" in m.supported_parameters for m in listed.data}
            self.next_fetch = self.clock() + self.REFRESH_S
        except (WorkerError, TimeoutError) as exc:
            log.warning("model list unavailable; model-id prefixes decide", extra={"error": repr(exc)})
            self.next_fetch = self.clock() + self.RETRY_S
        finally:
            self._fetching = None

    async def aclose(self) -> None:
        if self._fetching is not None:
            self._fetching.cancel()


class OpenAIProvider:
    """One Chat Completions endpoint. `http` carries base URL, auth and provider headers."""

    def __init__(
        self, name: str, default_model: str, http: HttpEndpoint, dialect: OpenAIDialect = OPENAI
    ) -> None:
        self.name = name
        self.default_model = default_model
        self.http = http
        self.dialect = dialect
        self.schema_support = SchemaSupport(http, name) if dialect.structured_output == "by_model" else None

    def build_payload(self, call: ComparisonCall, json_schema: bool | None = None) -> dict[str, Any]:
        """`json_schema` as the model list says; None: as the dialect says."""
        if json_schema is None:
            json_schema = self.dialect.uses_json_schema(call.model)
        system = call.system_prompt if json_schema else call.system_prompt + _JSON_OBJECT_INSTRUCTION
        user_blocks = [b.content for b in call.prompt_blocks if b.target == "user_content"]
        payload: dict[str, Any] = {
            "model": call.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "\n\n".join([*user_blocks, call.user_prompt])},
            ],
        }
        if json_schema:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "essay_comparison", "strict": True, "schema": STRICT_SCHEMA},
            }
            if self.dialect.require_parameters:
                payload["provider"] = {"require_parameters": True}
        else:
            payload["response_format"] = {"type": "json_object"}
        if is_reasoning_model(call.model):
            if call.max_tokens is not None:
                payload["max_completion_tokens"] = call.max_tokens
            if call.reasoning_effort is not None:
                if self.dialect.reasoning_object:
                    payload["reasoning"] = {"effort": call.reasoning_effort}
                else:
                    payload["reasoning_effort"] = openai_effort(call.model, call.reasoning_effort)
            if call.output_verbosity is not None and _bare(call.model).startswith("gpt-5"):
                payload["verbosity"] = call.output_verbosity
        else:
            if call.temperature is not None:
                payload["temperature"] = call.temperature
            if call.max_tokens is not None:
                payload["max_tokens"] = call.max_tokens
        return payload

    async def compare(self, call: ComparisonCall) -> Answer:
        listed = await self.schema_support.json_schema(call.model) if self.schema_support else None
        body = await self.http.post_json(self.name, "/chat/completions", self.build_payload(call, listed))
        return self.read_answer(body, call.model)

    def read_answer(self, body: bytes, requested_model: str) -> Answer:
        try:
            completion = parse_response(_Completion, body, self.name, "a chat completion")
        except WorkerError:
            error = _error_in_200(self.name, body)
            if error is None:
                raise
            raise error from None
        usage = completion.usage.normalised() if completion.usage else TokenUsage()
        if not completion.choices:
            raise billed_failure(ErrorCode.PARSING_ERROR, self.name, "no choices", "no_choices", usage)
        choice = completion.choices[0]
        if choice.error is not None or choice.finish_reason == "error":
            raise _classified(self.name, choice.error or {})
        if choice.message.refusal or choice.finish_reason == "content_filter":
            raise billed_failure(
                ErrorCode.CONTENT_POLICY,
                self.name,
                "model refused",
                "content_filter" if choice.finish_reason == "content_filter" else "refusal",
                usage,
            )
        if choice.finish_reason == "length":
            raise billed_failure(
                ErrorCode.PARSING_ERROR, self.name, "output truncated at max tokens", "length", usage
            )
        try:
            obj = pydantic_core.from_json(choice.message.content or "")
        except ValueError as exc:
            raise billed_failure(
                ErrorCode.PARSING_ERROR, self.name, "answer is not JSON", None, usage
            ) from exc
        return parse_billed_answer(obj, requested_model, usage, self.name)

    async def aclose(self) -> None:
        if self.schema_support is not None:
            await self.schema_support.aclose()
        await self.http.aclose()


def _error_in_200(provider: str, body: bytes) -> ProviderError | None:
    """OpenRouter answers an error that came up once generation had started with HTTP 200 and a body of
    {"error": {"code", "message"}}: classified as that status would be, else None."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return _classified(provider, error) if isinstance(error, dict) else None


def _classified(provider: str, error: dict[str, Any]) -> ProviderError:
    """An error object inside a 200 body, by its code (an HTTP status), else as a 502 from upstream."""
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else 502
    return classify_error(provider, status, json.dumps({"error": error}).encode(), {})
