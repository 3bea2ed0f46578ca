"""Anthropic Messages API: the answer comes as a forced tool call; prompt blocks become system/user content
blocks with cache_control."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import BaseModel, NonNegativeInt

from contracts import ErrorCode, PromptBlock, TokenUsage
from worker.errors import ProviderError, RequestRejected
from worker.providers.base import COMPARISON_SCHEMA, Answer, ComparisonCall
from worker.providers.http import HttpEndpoint, billed_failure, parse_billed_answer, parse_response

TOOL_NAME = "record_comparison"
DEFAULT_MAX_TOKENS = 1024

_TOOL = {
    "name": TOOL_NAME,
    "description": "Record which essay is better, why, and how confident you are.",
    "input_schema": COMPARISON_SCHEMA,
}


def sent_order(blocks: list[PromptBlock]) -> list[PromptBlock]:
    """The order Anthropic gets one target's blocks in: cacheable 1h, cacheable 5m, then the rest (stable
    within each group; see content_blocks). The cache key follows it: the hints change the text's order."""
    return sorted(blocks, key=lambda b: _TTL_RANK[b.ttl] if b.cacheable else 2)


_TTL_RANK = {"1h": 0, "5m": 1}


def content_blocks(blocks: list[PromptBlock], min_ttl: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Text content blocks with cache breakpoints, and the shortest TTL used (for the next target).

    Anthropic caches the prefix up to each block carrying cache_control, allows 4 breakpoints, and
    requires longer-TTL breakpoints before shorter ones. So: cacheable 1h blocks first, then cacheable
    5m blocks, then the rest (stable order within each group); one breakpoint at the end of each cached
    group. When an earlier target (system) already used 5m, a later 1h group is cached for 5m instead."""
    ordered = sent_order(blocks)
    out: list[dict[str, Any]] = []
    shortest = min_ttl or "1h"
    for i, block in enumerate(ordered):
        item: dict[str, Any] = {"type": "text", "text": block.content}
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        if block.cacheable and (nxt is None or not nxt.cacheable or nxt.ttl != block.ttl):
            ttl = "5m" if shortest == "5m" else block.ttl
            shortest = ttl
            item["cache_control"] = {"type": "ephemeral", "ttl": ttl}
        out.append(item)
    return out, shortest


class _Block(BaseModel):
    type: str
    name: str | None = None
    input: Any = None


class _CacheCreation(BaseModel):
    """The cache writes by lifetime (usage.cache_creation): a 1h write is billed at 2x input, 5m at 1.25x."""

    ephemeral_1h_input_tokens: NonNegativeInt | None = 0
    ephemeral_5m_input_tokens: NonNegativeInt | None = 0


class _Usage(BaseModel):
    input_tokens: NonNegativeInt = 0
    output_tokens: NonNegativeInt = 0
    cache_creation_input_tokens: NonNegativeInt | None = 0
    cache_read_input_tokens: NonNegativeInt | None = 0
    cache_creation: _CacheCreation | None = None

    def normalised(self) -> TokenUsage:
        """prompt_tokens counts every input token (uncached, cache writes, cache reads)."""
        created, read = self.cache_creation_input_tokens or 0, self.cache_read_input_tokens or 0
        prompt = self.input_tokens + created + read
        return TokenUsage(
            prompt_tokens=prompt,
            completion_tokens=self.output_tokens,
            total_tokens=prompt + self.output_tokens,
            cached_tokens=read,
        )


class _Message(BaseModel):
    model: str | None = None
    content: list[_Block]
    stop_reason: str | None = None
    usage: _Usage | None = None


class AnthropicProvider:
    def __init__(self, default_model: str, http: HttpEndpoint, name: str = "anthropic") -> None:
        self.name = name
        self.default_model = default_model
        self.http = http

    def build_payload(self, call: ComparisonCall) -> dict[str, Any]:
        system_blocks = [b for b in call.prompt_blocks if b.target == "system"]
        user_blocks = [b for b in call.prompt_blocks if b.target == "user_content"]
        shortest: str | None = None
        system: str | list[dict[str, Any]] = call.system_prompt
        # The orchestrator joins the system blocks into system_prompt unless an override replaced them.
        if system_blocks and call.system_prompt == "\n\n".join(b.content for b in system_blocks):
            system, shortest = content_blocks(system_blocks)
        user: str | list[dict[str, Any]] = call.user_prompt
        if user_blocks:
            blocks, _ = content_blocks(user_blocks, shortest)
            user = [*blocks, {"type": "text", "text": call.user_prompt}]
        payload: dict[str, Any] = {
            "model": call.model,
            "max_tokens": call.max_tokens or DEFAULT_MAX_TOKENS,
            "system": system,
            "messages": [{"role": "user", "content": user}],
            "tools": [_TOOL],
            "tool_choice": {"type": "tool", "name": TOOL_NAME},
        }
        if call.temperature is not None:
            if call.temperature > 1.0:
                raise RequestRejected(  # before anything is sent: no call is made
                    ErrorCode.VALIDATION_ERROR,
                    "anthropic accepts temperature 0-1",
                    provider=self.name,
                    retryable=False,
                )
            payload["temperature"] = call.temperature
        return payload

    async def compare(self, call: ComparisonCall) -> Answer:
        body = await self.http.post_json(self.name, "/v1/messages", self.build_payload(call))
        return self.read_answer(body, call.model)

    def read_answer(self, body: bytes, requested_model: str) -> Answer:
        message = parse_response(_Message, body, self.name, "a message")
        usage = message.usage.normalised() if message.usage else TokenUsage()
        written = (message.usage.cache_creation_input_tokens or 0) if message.usage else 0
        by_ttl = message.usage.cache_creation if message.usage else None
        written_1h = min(written, (by_ttl.ephemeral_1h_input_tokens or 0) if by_ttl else 0)
        try:
            if message.stop_reason == "max_tokens":
                raise billed_failure(
                    ErrorCode.PARSING_ERROR, self.name, "output truncated at max_tokens", "max_tokens", usage
                )
            if message.stop_reason == "model_context_window_exceeded":  # no room left to answer in
                raise billed_failure(
                    ErrorCode.CONTENT_TOO_LONG,
                    self.name,
                    "output stopped at the model's context window",
                    message.stop_reason,
                    usage,
                )
            if message.stop_reason == "refusal":
                raise billed_failure(ErrorCode.CONTENT_POLICY, self.name, "model refused", "refusal", usage)
            tool = next((b for b in message.content if b.type == "tool_use" and b.name == TOOL_NAME), None)
            if tool is None:
                raise billed_failure(
                    ErrorCode.PARSING_ERROR, self.name, "no tool call in the answer", "no_tool_use", usage
                )
            answer = parse_billed_answer(tool.input, requested_model, usage, self.name)
        except ProviderError as exc:
            exc.details["cache_write_tokens"] = written
            exc.details["cache_write_1h_tokens"] = written_1h
            raise
        return replace(answer, cache_write_tokens=written, cache_write_1h_tokens=written_1h)

    async def aclose(self) -> None:
        await self.http.aclose()
