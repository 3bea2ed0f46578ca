"""Issue 6 benchmark: latency the shared (Redis) rate limiter adds per request at 1000 requests/s.

Open loop: request i is started at t0 + i / rate; each measures acquire (one Lua call against the real
Redis taking a requests/minute and a tokens/minute window of the provider, and in the second variant of
its model too) plus settle (the token correction, queued; the next acquire's call carries it). Limits are
set far above the offered load, so what is measured is the limiter's own cost, not waiting for capacity.
The window is --window-s (5 s) rather than a minute so that within a run the windows fill and every call
also expires old entries, as in steady state; the keys are fresh per run. For
reference: the same schedule with no limit configured (event-loop scheduling only). `cpu us/req` is this
process's CPU time per request (the client's cost; Redis' own time is not in it), which other processes
on the machine do not inflate the way they inflate wall-clock percentiles.

It runs on uvloop, as `llm-worker run` does (production); --asyncio measures asyncio's default loop.

Usage: python bench/bench_limiter.py [--rate 1000] [--seconds 10] [--runs 3] [--window-s 5] [--redis-url URL]
       [--asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import uvloop
from redis.asyncio import BlockingConnectionPool, Redis

from worker.limits import Limit, Limiter

HUGE = 10**9


def limits_for(windows: int) -> dict[str, Limit]:
    both = Limit(requests_per_minute=HUGE, tokens_per_minute=HUGE)
    return {2: {"p": both}, 4: {"p": both, "p:m": both}}.get(windows, {})


async def one_run(redis: Redis, rate: float, seconds: float, windows: int, window_s: float) -> list[float]:
    limits = limits_for(windows)
    limiter = Limiter(redis, limits, f"bench{uuid.uuid4().hex[:8]}", window_s=window_s)
    added: list[float] = []

    async def request() -> None:
        t = time.perf_counter()
        grant = await limiter.acquire("p", "m", 800)
        await limiter.settle(grant, 650)
        added.append(time.perf_counter() - t)

    n = int(rate * seconds)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = []
    for i in range(n):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(request()))
    await asyncio.gather(*tasks)
    await limiter.flush()  # corrections still queued: sent, and their CPU counted
    return added


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    # As the worker builds it (worker/app.py): a blocking pool, so bursts wait for a connection.
    redis = Redis.from_pool(BlockingConnectionPool.from_url(args.redis_url, max_connections=64, timeout=1.0))
    await redis.ping()
    await one_run(redis, args.rate, 1.0, 4, args.window_s)  # warm up connections and the script cache
    loop = "asyncio" if args.asyncio else "uvloop"
    print(
        f"{args.rate:.0f} requests/s, {args.seconds:.0f} s per run, {args.window_s:g} s windows, {loop} loop"
    )
    print(
        f"{'variant':<30}{'run':>4}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'cpu us/req':>12}"
    )
    variants = (
        ("shared, provider rpm+tpm", 2),
        ("shared, + model rpm+tpm", 4),
        ("no limit (baseline)", 0),
    )
    p99s: dict[str, list[float]] = {name: [] for name, _ in variants}
    for run in range(1, args.runs + 1):
        for name, windows in variants:
            cpu0 = time.process_time()
            added = await one_run(redis, args.rate, args.seconds, windows, args.window_s)
            cpu_us = (time.process_time() - cpu0) / len(added) * 1e6
            p50, p99 = pct(added, 0.50) * 1000, pct(added, 0.99) * 1000
            p99s[name].append(p99)
            worst = max(added) * 1000
            print(f"{name:<30}{run:>4}{len(added):>10}{p50:>9.3f}{p99:>9.3f}{worst:>9.3f}{cpu_us:>12.1f}")
    for name, values in p99s.items():
        print(f"median p99 {name}: {statistics.median(values):.3f} ms at {args.rate:.0f} requests/s")
    await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--asyncio", action="store_true", help="asyncio's loop instead of uvloop")
    cli = parser.parse_args()
    (asyncio.run if cli.asyncio else uvloop.run)(main(cli))
