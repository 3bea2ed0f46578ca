"""Small scripted providers and a fake clock for orchestrator tests (no network)."""

from __future__ import annotations

import asyncio
from typing import Any

from contracts import ErrorCode, TokenUsage
from worker.errors import ProviderError
from worker.providers.base import Answer, ComparisonCall

OK = None


def err(code: ErrorCode, **details: Any) -> ProviderError:
    return ProviderError(code, f"scripted {code.value}", **details)


class Scripted:
    """Raises or answers per call from a script; the last entry repeats."""

    def __init__(self, name: str, *script: ProviderError | None, delay_s: float = 0.0) -> None:
        self.name = name
        self.default_model = f"{name}-model"
        self.script = list(script) or [OK]
        self.delay_s = delay_s
        self.calls: list[ComparisonCall] = []
        self.called = asyncio.Event()

    async def compare(self, call: ComparisonCall) -> Answer:
        self.calls.append(call)
        self.called.set()
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if item is not None:
            raise item
        usage = TokenUsage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
        return Answer("Essay A", f"{self.name} says A.", 4.0, call.model, usage)

    async def aclose(self) -> None:
        return None


class FakeTime:
    """A monotonic clock and a sleep that only advances it, recording every wait."""

    def __init__(self, start: float = 10_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
