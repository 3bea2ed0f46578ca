"""Admission pacing: a backlog enters the in-flight window as a steady flow, never below what the window
sustains."""

from __future__ import annotations

import pytest

from worker import consume
from worker.consume import _Pacer

from .fakes import FakeTime


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    c = FakeTime()
    monkeypatch.setattr(consume.time, "monotonic", c)
    return c


def admit(pacer: _Pacer, room: int) -> int:
    allowed, _ = pacer.allowance(room)
    for _ in range(allowed):
        pacer.admitted()
    return allowed


def test_a_cold_backlog_is_admitted_in_bursts_of_a_tenth_of_the_window(clock: FakeTime) -> None:
    pacer = _Pacer(1000)
    assert admit(pacer, 1000) == 100
    allowed, wait_s = pacer.allowance(900)
    assert allowed == 0
    assert 0 < wait_s <= 0.1
    # the prior is 1 s per request: 1.25 x 1000 / 1 s = 1250 admissions per second
    clock.now += 0.2
    assert admit(pacer, 900) == 100  # capped at the burst, although 250 tokens accrued
    clock.now += 0.06
    assert admit(pacer, 800) in (74, 75)  # 60 ms x 1250/s, give or take float rounding


def test_admission_rate_follows_the_observed_time_in_window(clock: FakeTime) -> None:
    pacer = _Pacer(1000)
    admit(pacer, 1000)
    pacer.finished(0.01)  # fast requests: 125 000 per second allowed
    clock.now += 0.002  # 250 tokens; bursts now up to a third of the window
    assert admit(pacer, 1000) == 250
    for _ in range(500):
        pacer.finished(2.0)  # slow ones pull the average towards 2 s
    assert pacer.latency_s > 1.9
    clock.now += 0.1  # 1.25 x 1000 / ~2 s = ~625/s: about 62 in 100 ms
    assert 60 <= admit(pacer, 1000) <= 64


def test_pacing_never_admits_more_than_the_room(clock: FakeTime) -> None:
    pacer = _Pacer(1000)
    assert admit(pacer, 7) == 7


def test_admissions_come_in_chunks_of_a_twentieth_of_the_window(clock: FakeTime) -> None:
    pacer = _Pacer(1000)
    admit(pacer, 1000)
    clock.now += 0.032  # 40 tokens at 1250/s: fewer than a chunk of 50, so wait for the rest
    allowed, wait_s = pacer.allowance(1000)
    assert allowed == 0
    assert wait_s == pytest.approx(10 / 1250)
    clock.now += wait_s
    assert admit(pacer, 1000) == 50
    assert admit(pacer, 3) == 0  # no tokens left, whatever the room
    clock.now += 0.004  # 5 tokens: a room smaller than a chunk takes what there is
    assert admit(pacer, 5) == 5


def test_fast_requests_are_admitted_in_bursts_of_up_to_a_third_of_the_window(clock: FakeTime) -> None:
    for in_window_s, burst in ((0.05, 333), (0.2, 333), (0.5, 200), (1.0, 100), (5.0, 100)):
        pacer = _Pacer(1000)
        admit(pacer, 1000)
        pacer.finished(in_window_s)  # what the window completes in 100 ms, between 1/10 and 1/3 of it
        clock.now += 10
        assert admit(pacer, 1000) == burst
        clock.now += burst / 2 / (1.25 * 1000 / in_window_s) * 0.99  # just short of half a burst
        assert admit(pacer, 1000) == 0
        clock.now += burst / 2 / (1.25 * 1000 / in_window_s) * 0.02
        assert burst // 2 <= admit(pacer, 1000) <= burst // 2 + 2  # (and what the burst left)


def test_a_small_window_may_fill_at_once(clock: FakeTime) -> None:
    assert admit(_Pacer(5), 5) == 5
    assert admit(_Pacer(20), 20) == 8
