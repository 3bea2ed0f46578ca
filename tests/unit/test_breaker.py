"""Circuit breaker states with an injected clock."""

from __future__ import annotations

from contracts import ErrorCode
from worker import metrics
from worker.breaker import BreakerPolicy, BreakerState, CircuitBreaker

FAIL = ErrorCode.EXTERNAL_SERVICE_ERROR


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, threshold: int = 3, window_s: float = 10, recovery_s: float = 5, probes: int = 1):
    return CircuitBreaker("p", BreakerPolicy(threshold, window_s, recovery_s, probes), clock)


def fail(b: CircuitBreaker, n: int, code: ErrorCode = FAIL) -> None:
    for _ in range(n):
        ticket = b.try_acquire()
        assert ticket is not None
        b.record(code, ticket)


def test_opens_after_threshold_failures_within_the_window() -> None:
    b = breaker(Clock())
    fail(b, 2)
    assert b.state is BreakerState.CLOSED
    fail(b, 1)
    assert b.state is BreakerState.OPEN
    assert not b.try_acquire()


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 2)
    clock.now += 11
    fail(b, 2)
    assert b.state is BreakerState.CLOSED


def test_non_provider_failures_do_not_count() -> None:
    b = breaker(Clock())
    for code in (ErrorCode.PARSING_ERROR, ErrorCode.CONTENT_POLICY, ErrorCode.RATE_LIMIT):
        fail(b, 3, code)
    assert b.state is BreakerState.CLOSED


def test_open_becomes_half_open_after_recovery_time() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 4.9
    assert b.state is BreakerState.OPEN
    clock.now += 0.1
    assert b.state is BreakerState.HALF_OPEN


def test_half_open_lets_only_the_probe_count_through() -> None:
    clock = Clock()
    b = breaker(clock, probes=2)
    fail(b, 3)
    clock.now += 5
    assert b.try_acquire()
    assert b.try_acquire()
    assert not b.try_acquire()


def test_half_open_closes_when_all_probes_succeed() -> None:
    clock = Clock()
    b = breaker(clock, probes=2)
    fail(b, 3)
    clock.now += 5
    first, second = b.try_acquire(), b.try_acquire()
    assert first is not None and second is not None
    b.record(None, first)
    assert b.state is BreakerState.HALF_OPEN
    b.record(None, second)
    assert b.state is BreakerState.CLOSED
    assert b.try_acquire()


def test_half_open_probe_failure_opens_again_for_a_full_recovery_time() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 5
    fail(b, 1)
    assert b.state is BreakerState.OPEN
    clock.now += 4.9
    assert b.state is BreakerState.OPEN


def test_released_probe_frees_its_slot() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 5
    probe = b.try_acquire()
    assert probe is not None
    assert not b.try_acquire()
    b.release(probe)
    assert b.try_acquire()


def test_state_is_exported_as_a_gauge() -> None:
    clock = Clock()
    b = CircuitBreaker("gauge-test", BreakerPolicy(1, 10, 5, 1), clock)
    gauge = metrics.BREAKER_STATE.labels("gauge-test")
    assert gauge._value.get() == 0
    fail(b, 1)
    assert gauge._value.get() == 2
    clock.now += 5
    assert b.state is BreakerState.HALF_OPEN
    assert gauge._value.get() == 1


def test_a_half_open_probe_cut_by_a_deadline_reopens_only_when_it_had_run_the_slow_call_bound() -> None:
    clock = Clock()
    b = CircuitBreaker("p", BreakerPolicy(3, 10, 5, 1, slow_call_s=2.0), clock)
    fail(b, 3)
    clock.now += 5
    probe = b.try_acquire()
    assert probe is not None and not b.try_acquire()  # the one probe is out
    assert b.cut(1.9, probe) is False  # cut early: the probe is given back, not counted
    assert b.state is BreakerState.HALF_OPEN
    probe = b.try_acquire()
    assert probe is not None
    assert b.cut(2.0, probe) is True  # it had hung past the bound: a timeout
    assert b.state is BreakerState.OPEN


def test_a_call_let_through_before_the_open_does_not_close_a_half_open_breaker() -> None:
    clock = Clock()
    b = breaker(clock)
    stale = b.try_acquire()  # closed: a call goes out and hangs
    assert stale is not None
    fail(b, 3)
    clock.now += 5
    probe = b.try_acquire()
    assert probe is not None and b.state is BreakerState.HALF_OPEN
    b.record(None, stale)  # it ends well: nothing is known yet of the provider since the open
    assert b.state is BreakerState.HALF_OPEN and not b.try_acquire()  # the probe is still out
    b.record(None, probe)
    assert b.state is BreakerState.CLOSED


def test_a_call_let_through_before_the_open_neither_reopens_the_breaker_nor_frees_the_probe() -> None:
    clock = Clock()
    b = breaker(clock)
    hung, cut = b.try_acquire(), b.try_acquire()
    assert hung is not None and cut is not None
    fail(b, 3)
    clock.now += 5
    probe = b.try_acquire()
    assert probe is not None
    b.record(FAIL, hung)  # timed out long after it was sent, before the breaker opened
    assert b.state is BreakerState.HALF_OPEN
    b.release(cut)  # cut by a deadline: the probe's slot stays taken
    assert not b.try_acquire()
    b.record(None, probe)
    assert b.state is BreakerState.CLOSED
