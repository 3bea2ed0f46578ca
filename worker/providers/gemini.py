"""Google Gemini generateContent: systemInstruction, JSON output constrained by responseSchema."""

from __future__ import annotations

import re
from typing import Any

import pydantic_core
from pydantic import BaseModel, NonNegativeInt

from contracts import ErrorCode, TokenUsage
from worker.providers.base import Answer, ComparisonCall
from worker.providers.http import HttpEndpoint, billed_failure, parse_billed_answer, parse_response

#: The comparison schema in Gemini's Schema dialect (OpenAPI subset: upper-case types, no
#: additionalProperties, explicit property order).
RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "OBJECT",
    "properties": {
        "winner": {"type": "STRING", "enum": ["Essay A", "Essay B"]},
        "justification": {"type": "STRING", "maxLength": 500},
        "confidence": {"type": "NUMBER", "minimum": 1, "maximum": 5},
    },
    "required": ["winner", "justification", "confidence"],
    "propertyOrdering": ["winner", "justification", "confidence"],
}

#: finishReason values that mean the content was refused.
_REFUSED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})


class _Part(BaseModel):
    text: str | None = None
    thought: bool | None = None


class _Content(BaseModel):
    parts: list[_Part] = []


class _Candidate(BaseModel):
    content: _Content | None = None
    finishReason: str | None = None


class _Feedback(BaseModel):
    blockReason: str | None = None


class _Usage(BaseModel):
    promptTokenCount: NonNegativeInt = 0
    candidatesTokenCount: NonNegativeInt = 0
    cachedContentTokenCount: NonNegativeInt = 0
    thoughtsTokenCount: NonNegativeInt = 0

    def normalised(self) -> TokenUsage:
        """Thought tokens are billed as output but not counted in candidatesTokenCount."""
        completion = self.candidatesTokenCount + self.thoughtsTokenCount
        return TokenUsage(
            prompt_tokens=self.promptTokenCount,
            completion_tokens=completion,
            total_tokens=self.promptTokenCount + completion,
            cached_tokens=self.cachedContentTokenCount,
            reasoning_tokens=self.thoughtsTokenCount,
        )


class _Response(BaseModel):
    candidates: list[_Candidate] = []
    promptFeedback: _Feedback | None = None
    usageMetadata: _Usage | None = None
    modelVersion: str | None = None


#: Gemini 2.5 thinking budgets (tokens) per reasoning_effort; "none" turns thinking off where the model
#: allows it (Flash, Flash-Lite) and is the smallest budget on Pro (which always thinks: 128-32768).
_BUDGETS = {"low": 1024, "medium": 8192, "high": 24576}
_VERSION = re.compile(r"gemini-(\d+)(?:\.(\d+))?")


def thinking_config(model: str, effort: str) -> dict[str, Any] | None:
    """reasoning_effort in Gemini's terms: thinkingBudget on 2.5, thinkingLevel from 3 on (the two together
    are a 400), nothing for models that do not think (1.x, 2.0)."""
    found = _VERSION.search(model)
    if found is None:
        return None
    major, minor = int(found.group(1)), int(found.group(2) or 0)
    flash = "flash" in model
    if major >= 3:
        if flash:  # minimal, low, medium, high
            return {"thinkingLevel": "minimal" if effort == "none" else effort}
        return {"thinkingLevel": {"none": "low", "medium": "high"}.get(effort, effort)}  # Pro: low, high
    if (major, minor) == (2, 5):
        return {"thinkingBudget": (0 if flash else 128) if effort == "none" else _BUDGETS[effort]}
    return None


class GeminiProvider:
    def __init__(self, default_model: str, http: HttpEndpoint, name: str = "google") -> None:
        self.name = name
        self.default_model = default_model
        self.http = http

    def build_payload(self, call: ComparisonCall) -> dict[str, Any]:
        user_parts = [{"text": b.content} for b in call.prompt_blocks if b.target == "user_content"]
        config: dict[str, Any] = {
            "responseMimeType": "application/json",
            "responseSchema": RESPONSE_SCHEMA,
        }
        if call.temperature is not None:
            config["temperature"] = call.temperature
        if call.max_tokens is not None:
            config["maxOutputTokens"] = call.max_tokens
        thinking = thinking_config(call.model, call.reasoning_effort) if call.reasoning_effort else None
        if thinking is not None:
            config["thinkingConfig"] = thinking
        return {
            "systemInstruction": {"parts": [{"text": call.system_prompt}]},
            "contents": [{"role": "user", "parts": [*user_parts, {"text": call.user_prompt}]}],
            "generationConfig": config,
        }

    async def compare(self, call: ComparisonCall) -> Answer:
        path = f"/v1beta/models/{call.model}:generateContent"
        body = await self.http.post_json(self.name, path, self.build_payload(call))
        return self.read_answer(body, call.model)

    def read_answer(self, body: bytes, requested_model: str) -> Answer:
        response = parse_response(_Response, body, self.name, "a generateContent answer")
        usage = response.usageMetadata.normalised() if response.usageMetadata else TokenUsage()
        feedback = response.promptFeedback
        if feedback is not None and feedback.blockReason:
            raise billed_failure(
                ErrorCode.CONTENT_POLICY, self.name, "prompt blocked", feedback.blockReason, usage
            )
        if not response.candidates:
            raise billed_failure(ErrorCode.PARSING_ERROR, self.name, "no candidates", "no_candidates", usage)
        candidate = response.candidates[0]
        reason = candidate.finishReason
        if reason in _REFUSED:
            raise billed_failure(ErrorCode.CONTENT_POLICY, self.name, "answer blocked", reason, usage)
        if reason == "MAX_TOKENS":
            raise billed_failure(
                ErrorCode.PARSING_ERROR, self.name, "output truncated at MAX_TOKENS", reason, usage
            )
        parts = candidate.content.parts if candidate.content else []
        text = "".join(p.text for p in parts if p.text and not p.thought)
        try:
            obj = pydantic_core.from_json(text)
        except ValueError as exc:
            # Stopped for a reason of its own (LANGUAGE, OTHER, MALFORMED_FUNCTION_CALL...): named in it.
            ended = reason if reason not in (None, "STOP", "FINISH_REASON_UNSPECIFIED") else None
            message = f"answer is not JSON (finishReason {ended})" if ended else "answer is not JSON"
            raise billed_failure(ErrorCode.PARSING_ERROR, self.name, message, ended, usage) from exc
        return parse_billed_answer(obj, requested_model, usage, self.name)

    async def aclose(self) -> None:
        await self.http.aclose()
