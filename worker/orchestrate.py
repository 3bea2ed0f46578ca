"""Request -> provider call -> outcome: route, call, account. (Retries, breakers and limits plug in here.)"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime

from contracts import ErrorCode, LLMComparisonRequestV1, ProviderName, TokenUsage, utc_now
from worker import metrics
from worker.errors import ProviderError, RequestRejected, WorkerError
from worker.pricing import Cost, PriceTable
from worker.providers.base import DEFAULT_SYSTEM_PROMPT, Answer, ComparisonCall, Provider


@dataclass(frozen=True, slots=True)
class Attempt:
    """One real provider call, billed or not."""

    provider: str
    model: str
    started_at: datetime
    duration_ms: int
    usage: TokenUsage | None
    cost: Cost | None
    error_code: ErrorCode | None = None


@dataclass(slots=True)
class CallOutcome:
    call: ComparisonCall
    answer: Answer | None = None
    error: WorkerError | None = None
    attempts: list[Attempt] = field(default_factory=list)


class Orchestrator:
    def __init__(self, providers: dict[str, Provider], prices: PriceTable, default_provider: ProviderName):
        self.providers = providers
        self.prices = prices
        self.default_provider = default_provider.value

    def resolve(self, request: LLMComparisonRequestV1) -> ComparisonCall:
        """Pick provider and model, and fix every input that changes the answer."""
        o = request.llm_config_overrides
        provider_name = o.provider_override.value if o and o.provider_override else self.default_provider
        provider = self.providers.get(provider_name)
        model = (o.model_override if o else None) or (provider.default_model if provider else "")
        system = [b.content for b in request.prompt_blocks or () if b.target == "system"]
        return ComparisonCall(
            provider=provider_name,
            model=model,
            system_prompt=(o.system_prompt_override if o else None)
            or "\n\n".join(system)
            or DEFAULT_SYSTEM_PROMPT,
            user_prompt=request.user_prompt,
            prompt_blocks=tuple(request.prompt_blocks or ()),
            temperature=o.temperature_override if o else None,
            max_tokens=o.max_tokens_override if o else None,
            reasoning_effort=o.reasoning_effort if o else None,
            output_verbosity=o.output_verbosity if o else None,
        )

    async def run(self, call: ComparisonCall, deadline_s: float | None) -> CallOutcome:
        """Call the provider once, bounded by the deadline (a monotonic time). Never raises WorkerError."""
        outcome = CallOutcome(call)
        provider = self.providers.get(call.provider)
        if provider is None:
            outcome.error = RequestRejected(
                ErrorCode.CONFIGURATION_ERROR,
                f"provider {call.provider!r} is not configured",
                provider=call.provider,
            )
            return outcome
        started_at, t0 = utc_now(), time.perf_counter()
        try:
            async with asyncio.timeout_at(_loop_deadline(deadline_s)):
                outcome.answer = await provider.compare(call)
        except TimeoutError:
            outcome.error = RequestRejected(
                ErrorCode.EXPIRED, "deadline passed while waiting for the provider"
            )
        except WorkerError as exc:
            outcome.error = exc
        duration_s = time.perf_counter() - t0
        metrics.PROVIDER_LATENCY.labels(call.provider).observe(duration_s)
        metrics.PROVIDER_CALLS.labels(call.provider, "ok" if outcome.answer else "error").inc()
        usage = outcome.answer.usage if outcome.answer else _billed_usage(outcome.error)
        cost = self._cost(outcome.answer.model if outcome.answer else call.model, usage) if usage else None
        outcome.attempts.append(
            Attempt(
                call.provider,
                outcome.answer.model if outcome.answer else call.model,
                started_at,
                int(duration_s * 1000),
                usage,
                cost,
                outcome.error.code if outcome.error else None,
            )
        )
        return outcome

    def _cost(self, model: str, usage: TokenUsage) -> Cost:
        cost = self.prices.cost(model, usage)
        if not cost.price_known:
            metrics.PRICE_UNKNOWN.labels(model).inc()
        return cost

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()


def _billed_usage(error: WorkerError | None) -> TokenUsage | None:
    """Usage the provider bills for a failed call (e.g. truncated output), when it reported any."""
    if isinstance(error, ProviderError):
        usage = error.details.get("usage")
        return usage if isinstance(usage, TokenUsage) else None
    return None


def _loop_deadline(deadline_s: float | None) -> float | None:
    if deadline_s is None:
        return None
    return asyncio.get_running_loop().time() + (deadline_s - time.monotonic())
