"""Deterministic mock provider: same content + seed gives the same answer in every process."""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

from contracts import ErrorCode, TokenUsage
from worker.errors import ProviderError
from worker.providers.base import Answer, ComparisonCall
from worker.settings import MockSettings

_USAGE = TokenUsage.__pydantic_validator__

_REASONS = (
    "argues its thesis more clearly and supports it with better evidence",
    "is better organised, with paragraphs that build on each other",
    "uses more precise language and has fewer mechanical errors",
    "engages more directly with the question and reaches a sharper conclusion",
)


#: "<winner> <reason>." for each winner and reason.
_JUSTIFICATIONS = {
    (w, i): f"{w} {reason}." for w in ("Essay A", "Essay B") for i, reason in enumerate(_REASONS)
}


def _digest(call: ComparisonCall, seed: int) -> bytes:
    head = (seed, call.model, call.system_prompt)
    prefix = _PREFIXES.get(head)
    if prefix is None:  # the same few per process: hashed once (and OpenSSL's SHA-256 looked up once)
        if len(_PREFIXES) >= 256:
            _PREFIXES.clear()
        prefix = _PREFIXES[head] = hashlib.sha256(
            f"{seed}\x00{call.model}\x00{call.system_prompt}\x00".encode()
        )
    h = prefix.copy()
    h.update(f"{call.user_prompt}\x00".encode())
    for block in call.prompt_blocks:
        h.update(block.target.encode() + b"\x00" + block.content.encode() + b"\x00")
    return h.digest()


#: SHA-256 of seed, model and system prompt, by those three: a call's digest goes on from a copy.
_PREFIXES: dict[tuple[int, str, str], Any] = {}


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class MockProvider:
    name = "mock"

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self.default_model = settings.mock_model
        self.calls = 0
        self._errors = random.Random()

    async def compare(self, call: ComparisonCall) -> Answer:
        self.calls += 1
        s = self.settings
        digest = _digest(call, s.mock_seed)
        if s.mock_latency_ms or s.mock_jitter_ms:
            jitter = (int.from_bytes(digest[8:12], "big") / 2**32 * 2 - 1) * s.mock_jitter_ms
            await asyncio.sleep(max(0.0, s.mock_latency_ms + jitter) / 1000)
        if s.mock_error_rate and self._errors.random() < s.mock_error_rate:
            raise ProviderError(
                ErrorCode.EXTERNAL_SERVICE_ERROR,
                "mock provider injected error",
                provider=self.name,
                http_status=500,
            )
        winner = (
            s.mock_winner if s.mock_winner != "auto" else ("Essay A" if digest[0] % 2 == 0 else "Essay B")
        )
        confidence = 1.0 + (digest[1] % 41) / 10  # 1.0 .. 5.0
        justification = _JUSTIFICATIONS[winner, digest[2] % len(_REASONS)]
        prompt_tokens = _estimate_tokens(call.system_prompt) + _estimate_tokens(call.user_prompt)
        if call.prompt_blocks:
            prompt_tokens += sum(_estimate_tokens(b.content) for b in call.prompt_blocks)
        completion_tokens = 40 + digest[3] % 60
        usage = _USAGE.validate_python(  # TokenUsage(...) without its Python __init__ around the validator
            {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        )
        return Answer(winner, justification, confidence, call.model, usage)

    async def aclose(self) -> None:
        return None
