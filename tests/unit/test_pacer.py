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


def test_a_cold_backlog_is_admitted_in_bursts_of_a_third_of_the_window(clock: FakeTime) -> None:
    pacer = _Pacer(1000)
    assert admit(pacer, 1000) == 333
    allowed, wait_s = pacer.allowance(667)
    assert allowed == 0
    assert 0 < wait_s <= 0.1
    # the prior is 1 s per request: 1.25 x 1000 / 1 s = 1250 admissions per second
    clock.now += 0.4
    assert admit(pacer, 667) == 333  # capped at the burst, although 500 tokens accrued
    clock.now += 0.2
    assert admit(pacer, 334) in (250, 251)  # 200 ms x 1250/s (and what was left), give or take rounding


def test_admission_rate_follows_the_observed_time_in_window(clock: FakeTime) -> None:
    pacer = _Pacer(1000)
    admit(pacer, 1000)
    pacer.finished(0.01)  # fast requests: 125 000 per second allowed
    clock.now += 0.002
    assert admit(pacer, 1000) == 250
    for _ in range(500):
        pacer.finished(2.0)  # slow ones pull the average towards 2 s
    assert pacer.latency_s > 1.9
    clock.now += 0.4  # 1.25 x 1000 / ~2 s = ~625/s: about 250 in 400 ms
    assert 245 <= admit(pacer, 1000) <= 255


def test_pacing_never_admits_more_than_the_room(clock: FakeTime) -> None:
    pacer = _Pacer(1000)
    assert admit(pacer, 7) == 7


def test_admissions_come_in_chunks_of_a_fifth_of_the_window(clock: FakeTime) -> None:
    pacer = _Pacer(1200)  # a burst of 400 and chunks of 240, at 1500 admissions per second
    assert admit(pacer, 1200) == 400
    clock.now += 0.1  # 150 tokens: fewer than a chunk of 240, so wait for the rest
    allowed, wait_s = pacer.allowance(1200)
    assert allowed == 0
    assert wait_s == pytest.approx(90 / 1500)
    clock.now += wait_s
    assert admit(pacer, 1200) == 240
    assert admit(pacer, 3) == 0  # no tokens left, whatever the room
    clock.now += 0.004  # 6 tokens: a room smaller than a chunk takes what there is
    assert admit(pacer, 5) == 5


def test_a_small_window_may_fill_at_once(clock: FakeTime) -> None:
    assert admit(_Pacer(5), 5) == 5
    assert admit(_Pacer(20), 20) == 8
