"""Deterministic mock provider: same content + seed gives the same answer in every process."""

from __future__ import annotations

import asyncio
import random
import zlib

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


def _digest(call: ComparisonCall, seed: int) -> int:
    """32 bits that the call's content and the seed fix: CRC-32 of both, mixed (MurmurHash3's finaliser,
    so that every bit depends on all of them). A mock needs determinism and spread, not a cryptographic
    hash: SHA-256 here cost about 9 000 instructions per call, CRC-32 about 2 500."""
    head = (seed, call.model, call.system_prompt)
    h = _PREFIXES.get(head)
    if h is None:  # the same few per process: computed once
        if len(_PREFIXES) >= 256:
            _PREFIXES.clear()
        h = _PREFIXES[head] = zlib.crc32(f"{seed}\x00{call.model}\x00{call.system_prompt}\x00".encode())
    h = zlib.crc32(f"{call.user_prompt}\x00".encode(), h)
    for block in call.prompt_blocks:
        h = zlib.crc32(block.target.encode() + b"\x00" + block.content.encode() + b"\x00", h)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


#: CRC-32 of seed, model and system prompt, by those three: a call's CRC goes on from it.
_PREFIXES: dict[tuple[int, str, str], int] = {}


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _usage(prompt_tokens: int, completion_tokens: int) -> TokenUsage:
    """The usage of an answer, one object per token counts (answers share it: nothing changes a usage).
    Validating a new TokenUsage per call was about a tenth of the mock's instructions."""
    key = (prompt_tokens, completion_tokens)
    usage = _USAGES.get(key)
    if usage is None:
        if len(_USAGES) >= 4096:
            _USAGES.clear()
        usage = _USAGES[key] = _USAGE.validate_python(
            {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        )
    return usage


_USAGES: dict[tuple[int, int], TokenUsage] = {}


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
            jitter = ((digest >> 16) / 2**16 * 2 - 1) * s.mock_jitter_ms
            await asyncio.sleep(max(0.0, s.mock_latency_ms + jitter) / 1000)
        if s.mock_error_rate and self._errors.random() < s.mock_error_rate:
            raise ProviderError(
                ErrorCode.EXTERNAL_SERVICE_ERROR,
                "mock provider injected error",
                provider=self.name,
                http_status=500,
            )
        winner = s.mock_winner if s.mock_winner != "auto" else ("Essay A" if digest & 1 == 0 else "Essay B")
        confidence = 1.0 + ((digest >> 1) % 41) / 10  # 1.0 .. 5.0
        justification = _JUSTIFICATIONS[winner, (digest >> 8) % len(_REASONS)]
        # _estimate_tokens of both, inline (per call)
        prompt_tokens = max(1, len(call.system_prompt) // 4) + max(1, len(call.user_prompt) // 4)
        if call.prompt_blocks:
            prompt_tokens += sum(_estimate_tokens(b.content) for b in call.prompt_blocks)
        usage = _usage(prompt_tokens, 40 + (digest >> 10) % 60)
        return Answer(winner, justification, confidence, call.model, usage)

    async def aclose(self) -> None:
        return None
