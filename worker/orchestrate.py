"""Request -> provider call -> outcome: route -> (per provider in the chain) breaker -> limit -> retry ->
provider -> account.

One Attempt is recorded per real provider call (so cost tracking is one event per real call); a call the
breaker or the limiter refused never reached a provider and records none.

Retries (tenacity) stay on one provider: exponential backoff with full jitter, a provider's Retry-After
honoured up to `retry_after_cap_s`, only retryable codes, a PARSING_ERROR retried at most once, at most
`max_attempts` per provider and `attempt_budget` per request, and never a wait that ends past the
deadline. When fallback is allowed (by the request or by configuration) a retryable failure, a spent
quota (a 429 that is not retryable) or an open breaker moves the request to the next provider of the
chain, at that provider's default model.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from redis.asyncio import Redis
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from contracts import ErrorCode, LLMComparisonRequestV1, ProviderName, TokenUsage
from worker import metrics
from worker.breaker import COUNTED, BreakerPolicy, Breakers, CircuitBreaker
from worker.errors import ProviderError, RequestRejected, WorkerError
from worker.limits import Limiter, estimate_prompt_tokens, estimate_tokens, parse_limits, rate_counted_tokens
from worker.metrics import HistogramTally, Tally
from worker.pricing import Cost, PriceTable
from worker.providers.base import DEFAULT_SYSTEM_PROMPT, Answer, ComparisonCall, Provider
from worker.routing import Router, Strategy, provider_for_model
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)  # not frozen: see providers/base.py, ComparisonCall
class Attempt:
    """One real provider call, billed or not."""

    provider: str
    model: str
    started_at: datetime
    duration_ms: int
    usage: TokenUsage | None
    cost: Cost | None
    error_code: ErrorCode | None = None
    #: Cut off before it ended (a hedge's loser, or shutdown).
    cancelled: bool = False
    #: Usage and cost estimated from the prompt: cut off before the provider reported them (see _cut_usage).
    estimated: bool = False


@dataclass(slots=True)
class CallOutcome:
    call: ComparisonCall
    answer: Answer | None = None
    error: WorkerError | None = None
    attempts: list[Attempt] = field(default_factory=list)
    #: The call that produced the answer: `call` itself, or a fallback provider's.
    answered_by: ComparisonCall | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    attempt_budget: int = 6
    base_s: float = 0.5
    max_wait_s: float = 20.0
    retry_after_cap_s: float = 30.0


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    #: Providers tried, in the router's order, after the resolved one.
    chain: tuple[str, ...] = ()
    #: Fall back even when the request did not ask for it.
    always: bool = False
    #: Start the next provider too when a call runs past its provider's observed p95 latency.
    hedge: bool = False


def should_retry(error: BaseException | None, attempts_so_far: Sequence[Attempt]) -> bool:
    """The one retry decision: same provider, same call, worth another try?"""
    if not isinstance(error, WorkerError) or not error.retryable:
        return False
    if error.code in (ErrorCode.PROVIDER_UNAVAILABLE, ErrorCode.EXPIRED) or "limiter" in error.details:
        return False  # the breaker is open / time is up / the limiter already waited all it could
    if error.code is ErrorCode.PARSING_ERROR:
        return sum(a.error_code is ErrorCode.PARSING_ERROR for a in attempts_so_far) < 2
    return True


def falls_back(error: WorkerError) -> bool:
    """Worth the next provider: a retryable failure, or a quota spent at this one (not retryable here)."""
    return (error.retryable or error.code is ErrorCode.RATE_LIMIT) and error.code is not ErrorCode.EXPIRED


class Orchestrator:
    def __init__(
        self,
        providers: dict[str, Provider],
        prices: PriceTable,
        default_provider: ProviderName,
        *,
        router: Router | None = None,
        breakers: Breakers | None = None,
        limiter: Limiter | None = None,
        retry: RetryPolicy | None = None,
        fallback: FallbackPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.providers = providers
        self.prices = prices
        self.default_provider = default_provider.value
        self.router = router or Router(Strategy.PRIORITY, prices)
        self.breakers = breakers or Breakers(BreakerPolicy(), clock)
        self.limiter = limiter
        self.retry = retry or RetryPolicy()
        self.fallback = fallback or FallbackPolicy()
        self.clock = clock
        self.sleep = sleep
        #: Whether anything reads what the router is told of calls (its latency order, hedging's p95): else a
        #: call's latency or failure is not handed to it (per call).
        self._observed = self.router.strategy is Strategy.LATENCY or self.fallback.hedge

    @classmethod
    def from_settings(
        cls, settings: Settings, providers: dict[str, Provider], prices: PriceTable, redis: Redis | None
    ) -> Orchestrator:
        r = settings.resilience
        return cls(
            providers,
            prices,
            settings.service.default_provider,
            router=Router(Strategy(r.routing_strategy), prices),
            breakers=Breakers(
                BreakerPolicy(
                    r.breaker_failure_threshold,
                    r.breaker_window_s,
                    r.breaker_recovery_s,
                    r.breaker_half_open_probes,
                    r.breaker_slow_call_s,
                )
            ),
            limiter=Limiter(
                redis,
                parse_limits(r.rate_limits),
                settings.redis.redis_key_prefix,
                r.expected_replicas,
                r.rate_limit_max_wait_s,
            )
            if r.rate_limits
            else None,
            retry=RetryPolicy(
                r.retry_max_attempts,
                r.retry_attempt_budget,
                r.retry_base_s,
                r.retry_max_wait_s,
                r.retry_after_cap_s,
            ),
            fallback=FallbackPolicy(r.chain, r.fallback_enabled, r.hedge_enabled),
        )

    def resolve(self, request: LLMComparisonRequestV1, priced_only: bool = False) -> ComparisonCall:
        """Pick provider and model, and fix every input that changes the answer. `priced_only`: routing
        passes over providers whose default model has no price (a budget could not count it)."""
        o = request.llm_config_overrides
        model_override = o.model_override if o else None
        if o and o.provider_override:
            provider_name = o.provider_override.value
        elif model_override and (by_model := provider_for_model(model_override)):
            provider_name = by_model
        else:
            provider_name = self._pick_default(priced_only)
        provider = self.providers.get(provider_name)
        model = model_override or (provider.default_model if provider else "")
        blocks = request.prompt_blocks or ()
        system = [b.content for b in blocks if b.target == "system"]
        return ComparisonCall(
            provider=provider_name,
            model=model,
            system_prompt=(o.system_prompt_override if o else None)
            or "\n\n".join(system)
            or DEFAULT_SYSTEM_PROMPT,
            user_prompt=request.user_prompt,
            prompt_blocks=tuple(blocks),
            temperature=o.temperature_override if o else None,
            max_tokens=o.max_tokens_override if o else None,
            reasoning_effort=o.reasoning_effort if o else None,
            output_verbosity=o.output_verbosity if o else None,
        )

    def _pick_default(self, priced_only: bool = False) -> str:
        if not self.fallback.chain:  # the only candidate, configured or not
            return self.default_provider
        names = dict.fromkeys((self.default_provider, *self.fallback.chain))
        eligible = [(p, self.providers[p].default_model) for p in names if p in self.providers]
        if priced_only:  # when none is priced, the budget check refuses whichever is picked
            eligible = self._priced(eligible) or eligible
        return self.router.order(eligible)[0][0] if eligible else self.default_provider

    async def run(
        self,
        call: ComparisonCall,
        deadline_s: float | None,
        allow_fallback: bool = False,
        priced_only: bool = False,
        outcome: CallOutcome | None = None,
    ) -> CallOutcome:
        """Answer the call, bounded by the deadline (a monotonic time). Never raises WorkerError.
        `priced_only`: no fallback to a model without a price (a budget could not count it). `outcome`: the
        CallOutcome to fill (its attempts so far stay readable when the run is cancelled)."""
        outcome = CallOutcome(call) if outcome is None else outcome
        if not (allow_fallback or self.fallback.always):  # one candidate: the loop below, without the loop
            outcome.answer, outcome.error = await self._run_provider(call, deadline_s, outcome)
            if outcome.answer is not None:
                outcome.answered_by = call
            _ATTEMPTS_PER_REQUEST.observe(len(outcome.attempts))
            return outcome
        candidates = self._candidates(call, priced_only)
        i = 0
        while i < len(candidates):
            if i:
                metrics.labelled(metrics.FALLBACKS, candidates[i - 1].provider, candidates[i].provider).inc()
            nxt = candidates[i + 1] if self.fallback.hedge and i + 1 < len(candidates) else None
            if nxt is None:
                answered_by, (answer, error), used = (
                    candidates[i],
                    await self._run_provider(candidates[i], deadline_s, outcome),
                    1,
                )
            else:
                answered_by, answer, error, used = await self._run_hedged(
                    candidates[i], nxt, deadline_s, outcome
                )
            i += used
            outcome.answer, outcome.error = answer, error
            if answer is not None:
                outcome.answered_by = answered_by
                break
            if error is None or not falls_back(error) or len(outcome.attempts) >= self.retry.attempt_budget:
                break
        _ATTEMPTS_PER_REQUEST.observe(len(outcome.attempts))
        return outcome

    async def _run_hedged(
        self, call: ComparisonCall, hedge: ComparisonCall, deadline_s: float | None, outcome: CallOutcome
    ) -> tuple[ComparisonCall, Answer | None, WorkerError | None, int]:
        """Run `call`; if it is still running past its provider's observed p95 latency, start `hedge` too
        and take the first answer, cancelling the other. Returns who answered, the answer or last error,
        and how many candidates were used (1 when no hedge was started)."""
        first = asyncio.create_task(self._run_provider(call, deadline_s, outcome))
        pending = {first: call}
        error: WorkerError | None = None
        try:
            done, _ = await asyncio.wait({first}, timeout=self.router.latency_p95_s(call.provider))
            if done:
                del pending[first]
                return (call, *first.result(), 1)
            metrics.labelled(metrics.ATTEMPTS, hedge.provider, "hedge").inc()
            pending[asyncio.create_task(self._run_provider(hedge, deadline_s, outcome))] = hedge
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    who = pending.pop(task)
                    answer, error = task.result()
                    if answer is not None:
                        return who, answer, None, 2
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return call, None, error, 2

    def _candidates(self, call: ComparisonCall, priced_only: bool) -> list[ComparisonCall]:
        """`call`, then the fallback chain's providers in the router's order."""
        others = [
            (p, self.providers[p].default_model)
            for p in dict.fromkeys(self.fallback.chain)
            if p != call.provider and p in self.providers
        ]
        if priced_only:
            others = self._priced(others)
        ordered = self.router.order(others, rotate=False)
        return [call] + [replace(call, provider=p, model=m) for p, m in ordered]

    def _priced(self, candidates: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (provider, model) pairs whose model has a price (a budget can count its calls)."""
        return [(p, m) for p, m in candidates if m in self.prices.prices]

    async def _run_provider(
        self, call: ComparisonCall, deadline_s: float | None, outcome: CallOutcome
    ) -> tuple[Answer | None, WorkerError | None]:
        """Call one provider with retries: its answer, or the last error."""
        provider = self.providers.get(call.provider)
        if provider is None:
            return None, RequestRejected(
                ErrorCode.CONFIGURATION_ERROR,
                f"provider {call.provider!r} is not configured",
                provider=call.provider,
            )
        breaker = self.breakers[call.provider]
        first = len(outcome.attempts)

        # Fast path: most calls succeed first time, so the first attempt runs without building tenacity's
        # machinery (about a fifth of the orchestrator's CPU per request). On a retryable failure the
        # tenacity loop starts with that same failure as its attempt 1, so stop/wait/retry decisions are
        # exactly those of a loop that had made the call itself.
        try:
            return await self._attempt(provider, call, breaker, deadline_s, outcome), None
        except WorkerError as exc:
            first_error: WorkerError | None = exc

        def mine() -> list[Attempt]:
            return [a for a in outcome.attempts[first:] if a.provider == call.provider]

        if not should_retry(first_error, mine()):
            return None, first_error
        retrying = AsyncRetrying(
            retry=lambda rs: should_retry(_exception(rs), mine()),
            wait=self._wait,
            stop=lambda rs: self._stop(rs, deadline_s, outcome),
            sleep=self.sleep,
            before_sleep=lambda rs: metrics.labelled(metrics.ATTEMPTS, call.provider, "retry").inc(),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if first_error is not None:
                        error, first_error = first_error, None
                        raise error
                    return await self._attempt(provider, call, breaker, deadline_s, outcome), None
        except WorkerError as exc:
            return None, exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _wait(self, rs: RetryCallState) -> float:
        """Full-jitter exponential backoff, or the provider's Retry-After (capped) when it sent one."""
        error = _exception(rs)
        retry_after = error.retry_after_s if isinstance(error, WorkerError) else None
        if retry_after is not None and math.isfinite(retry_after):
            return min(max(retry_after, 0.0), self.retry.retry_after_cap_s)
        return float(wait_random_exponential(multiplier=self.retry.base_s, max=self.retry.max_wait_s)(rs))

    def _stop(self, rs: RetryCallState, deadline_s: float | None, outcome: CallOutcome) -> bool:
        if rs.attempt_number >= self.retry.max_attempts:
            return True
        if len(outcome.attempts) >= self.retry.attempt_budget:
            return True
        return deadline_s is not None and self.clock() + (rs.upcoming_sleep or 0.0) >= deadline_s

    async def _attempt(
        self,
        provider: Provider,
        call: ComparisonCall,
        breaker: CircuitBreaker,
        deadline_s: float | None,
        outcome: CallOutcome,
    ) -> Answer:
        """One pass through breaker, limiter and provider. Raises the call's WorkerError."""
        if deadline_s is not None and self.clock() >= deadline_s:
            raise RequestRejected(ErrorCode.EXPIRED, "deadline passed before the provider was called")
        ticket = breaker.try_acquire()
        if ticket is None:
            metrics.labelled(metrics.ATTEMPTS, call.provider, "breaker_open").inc()
            raise ProviderError(
                ErrorCode.PROVIDER_UNAVAILABLE, "circuit breaker open: failing fast", provider=call.provider
            )
        try:
            grant = (
                await self.limiter.acquire(call.provider, call.model, estimate_tokens(call), deadline_s)
                if self.limiter is not None
                else None
            )
        except BaseException:
            breaker.release(ticket)
            raise
        if grant is not None and deadline_s is not None and self.clock() >= deadline_s:
            # Capacity came too late: no call, and its token estimate is given back.
            await self.limiter.settle(grant, None)  # type: ignore[union-attr]
            breaker.release(ticket)
            raise RequestRejected(ErrorCode.EXPIRED, "deadline passed while waiting for rate-limit capacity")
        answer: Answer | None = None
        error: WorkerError | None = None
        cut = False
        started_at, t0 = datetime.now(UTC), time.perf_counter()  # utc_now(), inline
        try:
            if deadline_s is None:
                answer = await provider.compare(call)
            else:
                async with asyncio.timeout_at(_loop_deadline(deadline_s, self.clock)):
                    answer = await provider.compare(call)
        except TimeoutError:
            error = RequestRejected(ErrorCode.EXPIRED, "deadline passed while waiting for the provider")
            cut = True
        except WorkerError as exc:
            error = exc
            if quotes_prompt(exc.message, call):  # provider messages are emitted; prompt text never is
                exc.message = f"{exc.message.split(':', 1)[0]}: message withheld (it quoted the prompt)"
        except Exception as exc:  # a response the provider code did not foresee: a typed error, not a crash
            error = ProviderError(
                ErrorCode.PARSING_ERROR,
                f"unexpected provider response ({type(exc).__name__})",
                provider=call.provider,
            )
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error(  # without the exception's text, which may quote the response (and so the prompt)
                "provider raised an unmapped error",
                extra={
                    "provider": call.provider,
                    "error_type": type(exc).__name__,
                    "where": f"{where.filename}:{where.lineno}",
                },
            )
        finally:
            duration_s = time.perf_counter() - t0
            if answer is None and error is None:  # cancelled: not the provider's fault, usage unknown
                breaker.release(ticket)
                if grant is not None and self.limiter is not None:
                    self.limiter.release_slots(grant)
                estimate = _cut_usage(call)
                cost = self._cost(call.model, estimate)
                ms = int(duration_s * 1000)
                outcome.attempts.append(
                    Attempt(call.provider, call.model, started_at, ms, estimate, cost, None, True, True)
                )
        usage = answer.usage if answer else _billed_usage(error)
        # Cut off, or no answer read in time after the request went out: the provider had the prompt (its
        # rate limits count it, and it may bill it).
        unanswered = cut or bool(error is not None and error.details.get("unanswered"))
        if grant is not None and self.limiter is not None:
            used = (
                rate_counted_tokens(call.provider, usage) if usage else grant.tokens if unanswered else None
            )
            await self.limiter.settle(grant, used)
        if cut:  # by our deadline: the provider's fault only if it had run past the slow-call bound
            if breaker.cut(duration_s, ticket) and self._observed:
                self.router.observe_latency(call.provider, duration_s)
        elif error is not None and error.code is ErrorCode.EXPIRED:
            breaker.release(ticket)
        elif isinstance(error, RequestRejected):
            # Refused by the provider's own code before anything was sent (a parameter it does not take):
            # no call, so no attempt, and nothing for the breaker (in half-open it is not a probe's success).
            breaker.release(ticket)
            raise error
        else:
            breaker.record(error.code if error else None, ticket)
            if self._observed:
                if error is None:
                    self.router.observe_latency(call.provider, duration_s)
                elif error.code in _PROVIDER_HEALTH:  # not the request's own fault (a 404 model, a refusal)
                    self.router.observe_failure(call.provider)
        estimated = usage is None and unanswered
        if estimated:
            usage = _cut_usage(call)
        self._account(call, answer, error, usage, started_at, duration_s, outcome, estimated)
        if error is not None:
            raise error
        assert answer is not None
        return answer

    def _account(
        self,
        call: ComparisonCall,
        answer: Answer | None,
        error: WorkerError | None,
        usage: TokenUsage | None,
        started_at: datetime,
        duration_s: float,
        outcome: CallOutcome,
        estimated: bool = False,
    ) -> None:
        latency, calls_ok, calls_error, attempts = _call_metrics(call.provider)
        latency.observe(duration_s)
        (calls_ok if answer else calls_error).inc()
        attempts.inc()
        model = answer.model if answer else call.model
        if answer:
            written, written_1h = answer.cache_write_tokens, answer.cache_write_1h_tokens
        else:
            details = error.details if error else {}
            written = int(details.get("cache_write_tokens", 0))
            written_1h = int(details.get("cache_write_1h_tokens", 0))
        cost = self._cost(model, usage, written, written_1h) if usage else None
        outcome.attempts.append(
            Attempt(
                call.provider,
                model,
                started_at,
                int(duration_s * 1000),
                usage,
                cost,
                error.code if error else None,
                estimated=estimated,
            )
        )

    def _cost(
        self, model: str, usage: TokenUsage, cache_write_tokens: int = 0, cache_write_1h_tokens: int = 0
    ) -> Cost:
        cost = self.prices.cost(model, usage, cache_write_tokens, cache_write_1h_tokens)
        if not cost.price_known:
            metrics.labelled(metrics.PRICE_UNKNOWN, _unpriced_label(model)).inc()
        return cost

    async def aclose(self) -> None:
        if self.limiter is not None:
            await self.limiter.aclose()
        for provider in self.providers.values():
            await provider.aclose()


_ATTEMPTS_PER_REQUEST = metrics.labelled(metrics.ATTEMPTS_PER_REQUEST)

#: Failures that say how the provider is doing (the latency router counts them against it): the breaker's,
#: a rate limit and a refused key; not those the request caused (a model it lacks, a refusal, a long prompt).
_PROVIDER_HEALTH = COUNTED | {ErrorCode.RATE_LIMIT, ErrorCode.AUTHENTICATION_ERROR}


@functools.cache
def _call_metrics(provider: str) -> tuple[HistogramTally, Tally, Tally, Tally]:
    """A provider's per-call metric children: latency, calls ok, calls failed, attempts of kind "call"."""
    return (
        metrics.labelled(metrics.PROVIDER_LATENCY, provider),
        metrics.labelled(metrics.PROVIDER_CALLS, provider, "ok"),
        metrics.labelled(metrics.PROVIDER_CALLS, provider, "error"),
        metrics.labelled(metrics.ATTEMPTS, provider, "call"),
    )


def _exception(rs: RetryCallState) -> BaseException | None:
    return rs.outcome.exception() if rs.outcome is not None and rs.outcome.failed else None


def _cut_usage(call: ComparisonCall) -> TokenUsage:
    """A call cut off before the provider answered: its prompt as input tokens (characters / 4), no output.
    A lower bound of what the provider may bill, which it does not report to a caller that left."""
    tokens = estimate_prompt_tokens(call)
    return TokenUsage(prompt_tokens=tokens, total_tokens=tokens)


def _billed_usage(error: WorkerError | None) -> TokenUsage | None:
    """Usage the provider bills for a failed call (e.g. truncated output), when it reported any."""
    if isinstance(error, ProviderError):
        usage = error.details.get("usage")
        return usage if isinstance(usage, TokenUsage) else None
    return None


#: Model names labelled in llm_worker_price_unknown_total. Requests name models (model_override), so past
#: this many the rest are counted as "other": a metric's series must not grow with what callers send.
MAX_UNPRICED_LABELS = 100
_unpriced: set[str] = set()


def _unpriced_label(model: str) -> str:
    if model in _unpriced:
        return model
    if len(_unpriced) >= MAX_UNPRICED_LABELS:
        return "other"
    _unpriced.add(model)
    return model


def _loop_deadline(deadline_s: float, clock: Callable[[], float]) -> float:
    return asyncio.get_running_loop().time() + (deadline_s - clock())


_QUOTE_CHARS = 24
_QUOTE_STEP = 8


def quotes_prompt(message: str, call: ComparisonCall) -> bool:
    """Whether a provider's error message repeats a run of the request's text (32 characters or more are
    always caught: some window of 24 starting at a multiple of 8 lies inside such a run). Error path only."""
    texts = [call.user_prompt, call.system_prompt, *(b.content for b in call.prompt_blocks)]
    last = len(message) - _QUOTE_CHARS
    return any(
        message[i : i + _QUOTE_CHARS] in text for i in range(0, last + 1, _QUOTE_STEP) for text in texts
    )
