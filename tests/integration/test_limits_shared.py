"""The shared limiter on the real Redis: separate processes together never exceed a limit in any window,
and a limiter whose Redis goes away degrades to its local share and comes back when Redis does."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tests.conftest import REDIS_URL, free_port
from worker import metrics
from worker.errors import ProviderError
from worker.limits import Limit, Limiter

pytestmark = pytest.mark.connected

WINDOW_MS = 1000
RPM, TPM = 12, 400  # per 1 s window here

# One limiter process: 4 concurrent callers for `duration` seconds; prints "admitted_ms actual_tokens".
_CALLER = """
import asyncio, random, sys, time
from redis.asyncio import Redis
from worker.limits import Limit, Limiter

async def main(url, prefix, duration, rpm, tpm):
    redis = Redis.from_url(url)
    limiter = Limiter(redis, {"p": Limit(requests_per_minute=rpm, tokens_per_minute=tpm)}, prefix,
                      window_s=1.0)
    end = time.monotonic() + duration
    rng = random.Random()

    async def caller():
        while time.monotonic() < end:
            grant = await limiter.acquire("p", "m", 60)
            actual = rng.randint(10, 60)
            await limiter.settle(grant, actual)
            print(grant.admitted_ms, actual, flush=True)

    await asyncio.gather(*(caller() for _ in range(4)))
    await limiter.aclose()
    await redis.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
"""


def _worst_window(admissions: list[tuple[int, int]]) -> tuple[int, int]:
    """Most requests and most tokens admitted within any WINDOW_MS sliding window."""
    admissions.sort()
    most_requests = most_tokens = 0
    for i, (t, _) in enumerate(admissions):
        inside = [a for a in admissions[: i + 1] if a[0] > t - WINDOW_MS]
        most_requests = max(most_requests, len(inside))
        most_tokens = max(most_tokens, sum(tok for _, tok in inside))
    return most_requests, most_tokens


async def test_two_processes_never_exceed_the_limit_in_any_window(prefix: str) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CALLER,
            REDIS_URL,
            prefix,
            "3.0",
            str(RPM),
            str(TPM),
            stdout=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.gather(*(p.communicate() for p in procs))
    assert [p.returncode for p in procs] == [0, 0]
    per_process = [
        [(int(a), int(b)) for a, b in (line.split() for line in out.decode().splitlines())]
        for out, _ in outputs
    ]
    assert all(len(rows) >= RPM // 2 for rows in per_process)  # both processes took part
    admissions = [row for rows in per_process for row in rows]
    most_requests, most_tokens = _worst_window(admissions)
    assert most_requests <= RPM
    assert most_tokens <= TPM
    assert most_requests >= RPM // 2  # the limit was actually reached, not trivially respected


@pytest.fixture
def own_redis() -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A redis-server of our own that the test may stop and start (never the shared one)."""
    assert shutil.which("redis-server"), "redis-server is not installed"
    port = free_port()
    started: list[subprocess.Popen[bytes]] = []
    yield port, started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(5)


def _start_redis(port: int, started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    started.append(proc)
    return proc


async def _until_up(redis: Redis) -> None:
    for _ in range(100):
        try:
            await redis.ping()
            return
        except (RedisError, OSError):
            await asyncio.sleep(0.05)
    raise AssertionError("redis-server did not start")


async def test_limiter_degrades_while_redis_is_down_and_recovers(
    own_redis: tuple[int, list[subprocess.Popen[bytes]]],
) -> None:
    port, started = own_redis
    proc = _start_redis(port, started)
    redis = Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    await _until_up(redis)
    limiter = Limiter(redis, {"p": Limit(requests_per_minute=100)}, "deg", 4, redis_retry_s=0.0)
    try:
        assert (await limiter.acquire("p", "m", 1)).admitted_ms > 0
        proc.terminate()
        proc.wait(5)
        grant = await limiter.acquire("p", "m", 1)
        assert grant.admitted_ms == 0 and metrics.LIMITER_DEGRADED._value.get() == 1
        await _until_up_after_restart(redis, port, started)
        assert (await limiter.acquire("p", "m", 1)).admitted_ms > 0
        assert metrics.LIMITER_DEGRADED._value.get() == 0
    finally:
        await limiter.aclose()
        await redis.aclose()
        metrics.LIMITER_DEGRADED.set(0)


async def _until_up_after_restart(redis: Redis, port: int, started: list[subprocess.Popen[bytes]]) -> None:
    _start_redis(port, started)
    await _until_up(redis)


async def _token_sum(redis: Redis, prefix: str) -> int:
    return int(await redis.get(f"{prefix}:rl:p:tpm:sum") or 0)


async def test_token_correction_rides_on_the_next_acquire(prefix: str) -> None:
    redis = Redis.from_url(REDIS_URL)
    limiter = Limiter(redis, {"p": Limit(requests_per_minute=100, tokens_per_minute=10_000)}, prefix)
    try:
        grant = await limiter.acquire("p", "m", 600)
        await limiter.settle(grant, 100)
        assert await _token_sum(redis, prefix) == 600  # queued, not sent on its own
        await limiter.acquire("p", "m", 50)
        assert await _token_sum(redis, prefix) == 100 + 50
        assert not limiter._corrections  # no call of its own was needed
    finally:
        await limiter.aclose()
        await redis.aclose()


async def test_a_correction_of_a_windows_only_call_keeps_its_keys_expiring_together(prefix: str) -> None:
    # ZREM of the only member deleted the key with its TTL; ZADD made it again without one. The sum then
    # expired alone, and the next acquire took that call's tokens off a sum begun again at 0: the window
    # admitted its limit plus them.
    redis = Redis.from_url(REDIS_URL)
    limiter = Limiter(redis, {"p": Limit(tokens_per_minute=1000)}, prefix, window_s=1.0)
    try:
        await limiter.settle(await limiter.acquire("p", "m", 600), 100)
        await limiter.flush()
        assert await _token_sum(redis, prefix) == 100
        assert await redis.pttl(f"{prefix}:rl:p:tpm") > 0
        await asyncio.sleep(3.2)  # both keys gone (TTL: a window and a second, plus a window)
        assert await redis.exists(f"{prefix}:rl:p:tpm", f"{prefix}:rl:p:tpm:sum") == 0
        await limiter.acquire("p", "m", 600)
        with pytest.raises(ProviderError):  # 600 + 500 > 1000 in one window: waits past its deadline
            await limiter.acquire("p", "m", 500, deadline_s=time.monotonic() + 0.2)
    finally:
        await limiter.aclose()
        await redis.aclose()


async def test_queued_token_correction_is_sent_on_its_own_when_no_acquire_comes(prefix: str) -> None:
    redis = Redis.from_url(REDIS_URL)
    limiter = Limiter(redis, {"p": Limit(tokens_per_minute=10_000)}, prefix)
    try:
        await limiter.settle(await limiter.acquire("p", "m", 600), 100)
        await limiter.settle(await limiter.acquire("p", "m", 600), 900)
        assert limiter._pending_timer is not None  # no acquire comes to carry them
        for _ in range(200):
            if await _token_sum(redis, prefix) == 100 + 900:
                break
            await asyncio.sleep(0.01)
        assert await _token_sum(redis, prefix) == 100 + 900
    finally:
        await limiter.aclose()
        await redis.aclose()


async def test_request_window_reports_the_wait_until_its_oldest_call_leaves(prefix: str) -> None:
    redis = Redis.from_url(REDIS_URL)
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        await asyncio.sleep(s)

    limiter = Limiter(redis, {"p": Limit(requests_per_minute=2)}, prefix, window_s=0.3, sleep=sleep)
    try:
        first = await limiter.acquire("p", "m", 1)
        await limiter.acquire("p", "m", 1)
        third = await limiter.acquire("p", "m", 1)
        assert len(slept) == 1 and 0.0 < slept[0] <= 0.301
        assert third.admitted_ms >= first.admitted_ms + 300
    finally:
        await limiter.aclose()
        await redis.aclose()
