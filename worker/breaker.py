"""Per-provider circuit breaker: closed -> open after `failure_threshold` failures within `window_s`;
open -> half-open after `recovery_s`; half-open lets `half_open_probes` calls through and closes when they
all succeed, or opens again on the first failure. State is exported as a gauge (0 closed, 1 half-open,
2 open). Only failures that say the provider is unhealthy count (see COUNTED); a refusal, a bad answer or
our own deadline does not, unless it cut a call that had run `slow_call_s` already (see `cut`): a provider
that hangs then opens its breaker under deadlines of at least that long, though shorter than the HTTP read
timeout.

A call's result moves the breaker only in the state it was let through in: try_acquire hands out the
state's ticket (its generation, counted up at every change). A call let through before the breaker opened
that ends after it went half-open neither closes it (its probe still out) nor reopens it nor frees the
probe's slot: with the HTTP read timeout longer than `recovery_s`, calls that hung before the open would
otherwise keep reopening the breaker of a provider that has recovered."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from contracts import ErrorCode
from worker import metrics

#: Codes that count as a provider failure for the breaker.
COUNTED = frozenset({ErrorCode.TIMEOUT, ErrorCode.CONNECTION_ERROR, ErrorCode.EXTERNAL_SERVICE_ERROR})


class BreakerState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


_GAUGE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = 5
    window_s: float = 60.0
    recovery_s: float = 30.0
    half_open_probes: int = 1
    slow_call_s: float = 60.0


class CircuitBreaker:
    def __init__(
        self, provider: str, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.provider = provider
        self.policy = policy
        self.clock = clock
        self._state = BreakerState.CLOSED
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._probes_out = 0
        self._probes_ok = 0
        self._generation = 1
        self._publish()

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.policy.recovery_s:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def try_acquire(self) -> int | None:
        """May a call go through now? Its ticket (pass it to record, cut or release), or None. In half-open
        this takes one probe slot."""
        if self._state is BreakerState.CLOSED:  # (only an open breaker changes with time: see state)
            return self._generation
        state = self.state
        if (
            state is BreakerState.HALF_OPEN
            and self._probes_out + self._probes_ok < self.policy.half_open_probes
        ):
            self._probes_out += 1
            return self._generation
        return None

    def record(self, code: ErrorCode | None, ticket: int) -> None:
        """The call that try_acquire let through with `ticket` ended with `code` (None = success)."""
        if ticket != self._generation:  # let through in an earlier state: says nothing of this one
            return
        failed = code in COUNTED
        if self._state is BreakerState.HALF_OPEN:
            self._probes_out = max(0, self._probes_out - 1)
            if failed:
                self._open()
            else:
                self._probes_ok += 1
                if self._probes_ok >= self.policy.half_open_probes:
                    self._move(BreakerState.CLOSED)
            return
        if failed and self._state is BreakerState.CLOSED:
            now = self.clock()
            self._failures.append(now)
            while self._failures and self._failures[0] <= now - self.policy.window_s:
                self._failures.popleft()
            if len(self._failures) >= self.policy.failure_threshold:
                self._open()

    def cut(self, ran_s: float, ticket: int) -> bool:
        """Our deadline cut the call after `ran_s`: a timeout if it had run `slow_call_s` (True: the provider
        hangs), else as if it had never reached the provider."""
        if 0 < self.policy.slow_call_s <= ran_s:
            self.record(ErrorCode.TIMEOUT, ticket)
            return True
        self.release(ticket)
        return False

    def release(self, ticket: int) -> None:
        """The call that try_acquire let through never reached the provider (or was cut by our deadline)."""
        if self._state is BreakerState.HALF_OPEN and ticket == self._generation:
            self._probes_out = max(0, self._probes_out - 1)

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._move(BreakerState.OPEN)

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._failures.clear()
        self._probes_out = self._probes_ok = 0
        metrics.labelled(metrics.BREAKER_TRANSITIONS, self.provider, state.value).inc()
        self._publish()

    def _publish(self) -> None:
        metrics.labelled(metrics.BREAKER_STATE, self.provider).set(_GAUGE_VALUE[self._state])


class Breakers:
    """One breaker per provider, made on first use."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._by_provider: dict[str, CircuitBreaker] = {}

    def __getitem__(self, provider: str) -> CircuitBreaker:
        breaker = self._by_provider.get(provider)
        if breaker is None:
            breaker = self._by_provider[provider] = CircuitBreaker(provider, self.policy, self.clock)
        return breaker
