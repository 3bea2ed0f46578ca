"""Rate limits per provider (and per provider:model): requests/minute, tokens/minute, max concurrency.

Limits belong to the API key, not the replica, so the windows live in Redis and are taken by one Lua
script: a sliding-window log per limit (a sorted set of `id:cost` members scored by Redis' own clock in
ms, plus a running sum). A call is admitted only if every limit it falls under has room, and then it is
added to all of them in the same script, so N replicas together never admit more than the limit within
any window. Tokens are taken as an estimate before the call and corrected with the real usage after.

With Redis unreachable the limiter falls back, for `redis_retry_s`, to the same window kept in process at
limit / expected_replicas, and sets LIMITER_DEGRADED. The concurrency cap is per replica, FIFO.

A call that finds no room waits for it, bounded by its deadline (or `max_wait_s`), instead of failing;
waiters of one limit in one process queue FIFO and only the head polls Redis.

Hot path: one Lua call per request, sent through RedisBatch so concurrent requests share a round trip;
the token correction goes off the request's path the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from contracts import ErrorCode
from worker import metrics
from worker.errors import ProviderError
from worker.providers.base import ComparisonCall
from worker.redis_batch import RedisBatch

log = logging.getLogger(__name__)

#: Output tokens assumed when the request sets no max_tokens.
DEFAULT_OUTPUT_ESTIMATE = 1024

# KEYS: one sorted set per window (its running sum is KEYS[i]..':sum'). ARGV[1]: the member id;
# ARGV[2]: "limit:window_ms:cost" per window, comma-separated (few arguments: packing them is the
# client's main cost). Returns {1, now_ms} when taken, {0, wait_ms} when not, {-1, i} when never.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local specs = {}
for limit, window, cost in string.gmatch(ARGV[2], '(%d+):(%d+):(%d+)') do
  specs[#specs + 1] = {tonumber(limit), tonumber(window), tonumber(cost)}
end
for i, spec in ipairs(specs) do
  local zkey, skey = KEYS[i], KEYS[i] .. ':sum'
  local limit, window, cost = spec[1], spec[2], spec[3]
  if cost > limit then return {-1, i} end
  local old = redis.call('ZRANGEBYSCORE', zkey, '-inf', now - window)
  if #old > 0 then
    local freed = 0
    for _, m in ipairs(old) do freed = freed + tonumber(string.match(m, ':(%-?%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now - window)
    redis.call('DECRBY', skey, freed)
  end
  local used = tonumber(redis.call('GET', skey) or '0')
  if used + cost > limit then
    local need, start = used + cost - limit, 0
    while true do
      local page = redis.call('ZRANGE', zkey, start, start + 99, 'WITHSCORES')
      if #page == 0 then return {0, 1} end
      for j = 1, #page, 2 do
        need = need - tonumber(string.match(page[j], ':(%-?%d+)$'))
        if need <= 0 then return {0, math.max(1, tonumber(page[j + 1]) + window - now + 1)} end
      end
      start = start + 100
    end
  end
end
for i, spec in ipairs(specs) do
  local zkey, skey = KEYS[i], KEYS[i] .. ':sum'
  redis.call('ZADD', zkey, now, id .. ':' .. spec[3])
  redis.call('INCRBY', skey, spec[3])
  redis.call('PEXPIRE', zkey, spec[2] + 1000)
  redis.call('PEXPIRE', skey, spec[2] + 1000)
end
return {1, now}
"""

# KEYS: the token windows of one grant. ARGV: old member, new member, token delta.
_CORRECT = """
for i = 1, #KEYS do
  local s = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if s then
    redis.call('ZREM', KEYS[i], ARGV[1])
    redis.call('ZADD', KEYS[i], s, ARGV[2])
    redis.call('INCRBY', KEYS[i] .. ':sum', tonumber(ARGV[3]))
  end
end
return 1
"""


_SCRIPTS = (_ACQUIRE, _CORRECT)
_SHAS = tuple(hashlib.sha1(body.encode()).hexdigest() for body in _SCRIPTS)


@dataclass(frozen=True, slots=True)
class Limit:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None


def parse_limits(raw: str | dict[str, Any]) -> dict[str, Limit]:
    """RATE_LIMITS: {"openai": {"requests_per_minute": 500, "tokens_per_minute": 200000,
    "max_concurrency": 50}, "openai:gpt-4.1": {...}} - keys are a provider or provider:model."""
    data = json.loads(raw) if isinstance(raw, str) else raw
    return {scope: Limit(**spec) for scope, spec in data.items()}


def estimate_tokens(call: ComparisonCall) -> int:
    chars = len(call.system_prompt) + len(call.user_prompt) + sum(len(b.content) for b in call.prompt_blocks)
    return chars // 4 + 1 + (call.max_tokens or DEFAULT_OUTPUT_ESTIMATE)


@dataclass(frozen=True, slots=True)
class _Window:
    key: str
    limit: int
    is_tokens: bool


@dataclass(slots=True)
class Grant:
    """Capacity taken for one call; hand it back to Limiter.settle when the call ends."""

    provider: str
    tokens: int
    member_id: str = ""
    #: Redis server time (ms) the shared limiter admitted the call at; 0 when admitted locally.
    admitted_ms: int = 0
    shared: list[_Window] = field(default_factory=list)
    local: list[tuple[_LocalWindow, list[float]]] = field(default_factory=list)
    slots: list[FifoSlots] = field(default_factory=list)


class FifoSlots:
    """A counting semaphore that hands free slots to waiters strictly in arrival order."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the slot over directly, so no newcomer can jump the queue
                return
        self.free += 1


class _LocalWindow:
    """The same sliding window, in process: entries are [t, cost] so a grant can correct its own."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.used = 0.0
        self.entries: deque[list[float]] = deque()

    def wait_s(self, cost: int, now: float) -> float:
        """0 when `cost` fits now; else seconds until it may; inf when it never can."""
        if cost > self.limit:
            return math.inf
        while self.entries and self.entries[0][0] <= now - self.window_s:
            self.used -= self.entries.popleft()[1]
        need = self.used + cost - self.limit
        if need <= 0:
            return 0.0
        for t, c in self.entries:
            need -= c
            if need <= 0:
                return max(t + self.window_s - now, 1e-3)
        return 1e-3

    def take(self, cost: int, now: float) -> list[float]:
        entry = [now, float(cost)]
        self.entries.append(entry)
        self.used += cost
        return entry


class Limiter:
    def __init__(
        self,
        redis: Redis | None,
        limits: dict[str, Limit],
        key_prefix: str,
        expected_replicas: int = 1,
        max_wait_s: float = 120.0,
        window_s: float = 60.0,
        redis_retry_s: float = 5.0,
        redis_call_timeout_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.redis = redis
        self.limits = limits
        self.key_prefix = key_prefix
        self.expected_replicas = max(1, expected_replicas)
        self.max_wait_s = max_wait_s
        self.window_ms = int(window_s * 1000)
        self.window_s = window_s
        self.redis_retry_s = redis_retry_s
        self.redis_call_timeout_s = redis_call_timeout_s
        self.clock = clock
        self.sleep = sleep
        self._batch = RedisBatch(redis) if redis is not None else None
        self._corrections: set[asyncio.Task[None]] = set()
        self._redis_down_until = -math.inf
        self._queues: dict[str, asyncio.Lock] = {}
        self._slots: dict[str, FifoSlots] = {}
        self._local: dict[str, _LocalWindow] = {}
        self._targets: dict[tuple[str, str], tuple[list[tuple[str, Limit]], list[_Window]]] = {}
        self._instance = uuid.uuid4().hex[:12]
        self._serial = itertools.count()

    def _target(self, provider: str, model: str) -> tuple[list[tuple[str, Limit]], list[_Window]]:
        """The limits a call to provider/model falls under, and their windows (computed once)."""
        found = self._targets.get((provider, model))
        if found is None:
            scopes = [
                (s, lim) for s in (provider, f"{provider}:{model}") if (lim := self.limits.get(s)) is not None
            ]
            windows = [
                _Window(f"{self.key_prefix}:rl:{scope}:{kind}", limit, kind == "tpm")
                for scope, lim in scopes
                for kind, limit in (("rpm", lim.requests_per_minute), ("tpm", lim.tokens_per_minute))
                if limit
            ]
            found = self._targets[(provider, model)] = (scopes, windows)
        return found

    async def acquire(self, provider: str, model: str, tokens: int, deadline_s: float | None = None) -> Grant:
        """Take capacity for one call, waiting (bounded by the deadline) for it. Raises ProviderError
        RATE_LIMIT with `limiter: local` when there is none in time; it carries no retry advice."""
        grant = Grant(provider, tokens)
        scopes, windows = self._target(provider, model)
        if not scopes:
            return grant
        t0 = self.clock()
        until = min(deadline_s if deadline_s is not None else math.inf, t0 + self.max_wait_s)
        try:
            for scope, lim in scopes:
                if lim.max_concurrency:
                    slots = self._slots.setdefault(scope, FifoSlots(lim.max_concurrency))
                    async with asyncio.timeout(max(0.0, until - self.clock())):
                        await slots.acquire()
                    grant.slots.append(slots)
            if windows:
                await self._take_windows(grant, windows, provider, until)
        except TimeoutError:
            self.release_slots(grant)
            raise self._refused(provider, "no concurrency slot before the deadline") from None
        except BaseException:
            self.release_slots(grant)
            raise
        metrics.LIMIT_WAIT.labels(provider).observe(self.clock() - t0)
        return grant

    async def _take_windows(self, grant: Grant, windows: list[_Window], provider: str, until: float) -> None:
        queue = self._queues.setdefault(windows[0].key, asyncio.Lock())
        if not queue.locked() and await self._try(grant, windows) == 0.0:
            return  # fast path: nobody is waiting and there is room
        async with queue:  # FIFO: waiters of this limit queue here and only the head polls
            while (wait_s := await self._try(grant, windows)) > 0.0:
                if wait_s == math.inf:
                    raise self._refused(provider, "the call needs more than a whole window's limit")
                if self.clock() + wait_s > until:
                    raise self._refused(
                        provider, f"no rate-limit capacity within the deadline ({wait_s:.1f}s)"
                    )
                await self.sleep(wait_s)

    async def _try(self, grant: Grant, windows: list[_Window]) -> float:
        """0.0 when taken; else seconds to wait."""
        if self.redis is not None and self.clock() >= self._redis_down_until:
            member_id = f"{self._instance}{next(self._serial)}"
            keys = [w.key for w in windows]
            spec = ",".join(
                f"{w.limit}:{self.window_ms}:{grant.tokens if w.is_tokens else 1}" for w in windows
            )
            args = [member_id, spec]
            try:
                async with asyncio.timeout(self.redis_call_timeout_s):  # no reconnect stall in our path
                    ok, value = await self._eval(0, keys, args)
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_failed(exc)
            else:
                self._redis_ok()
                if ok == -1:
                    return math.inf
                if ok == 1:
                    grant.member_id, grant.shared, grant.admitted_ms = member_id, windows, int(value)
                    return 0.0
                return float(value) / 1000
        return self._try_local(grant, windows)

    def _try_local(self, grant: Grant, windows: list[_Window]) -> float:
        now = self.clock()
        local = [
            self._local.setdefault(
                w.key, _LocalWindow(max(1, w.limit // self.expected_replicas), self.window_s)
            )
            for w in windows
        ]
        costs = [grant.tokens if w.is_tokens else 1 for w in windows]
        wait_s = max(lw.wait_s(c, now) for lw, c in zip(local, costs, strict=True))
        if wait_s == 0.0:
            for lw, cost, w in zip(local, costs, windows, strict=True):
                entry = lw.take(cost, now)
                if w.is_tokens:
                    grant.local.append((lw, entry))
        return wait_s

    async def settle(self, grant: Grant, used_tokens: int | None) -> None:
        """The call ended: free its concurrency slots and correct the token estimate with the real usage
        (None = the provider billed nothing, so the estimate is given back)."""
        self.release_slots(grant)
        delta = (used_tokens or 0) - grant.tokens
        if delta == 0:
            return
        for lw, entry in grant.local:
            entry[1] += delta
            lw.used += delta
        keys = [w.key for w in grant.shared if w.is_tokens]
        if not keys or self.redis is None:
            return
        old, new = f"{grant.member_id}:{grant.tokens}", f"{grant.member_id}:{grant.tokens + delta}"
        task = asyncio.create_task(self._correct(keys, [old, new, delta]))
        self._corrections.add(task)  # off the request's path; coalesced with other calls by RedisBatch
        task.add_done_callback(self._corrections.discard)

    async def flush(self) -> None:
        """Wait until the queued token corrections reached Redis."""
        while self._corrections:
            await asyncio.gather(*self._corrections, return_exceptions=True)

    async def _correct(self, keys: list[str], args: list[Any]) -> None:
        try:
            await self._eval(1, keys, args)
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)

    async def _eval(self, script: int, keys: list[str], args: list[Any]) -> Any:
        """Run our Lua script 0 (acquire) or 1 (correct). Calls of concurrent requests share one round
        trip (RedisBatch); a Redis that lost its scripts (restart) gets them loaded again."""
        assert self.redis is not None and self._batch is not None
        try:
            return await self._batch.execute(b"EVALSHA", _SHAS[script], len(keys), *keys, *args)
        except NoScriptError:
            for body in _SCRIPTS:
                await self.redis.script_load(body)
            return await self._batch.execute(b"EVALSHA", _SHAS[script], len(keys), *keys, *args)

    def release_slots(self, grant: Grant) -> None:
        for slots in grant.slots:
            slots.release()
        grant.slots = []

    def _redis_failed(self, exc: BaseException) -> None:
        metrics.LIMITER_REDIS_ERRORS.inc()
        if self.clock() >= self._redis_down_until:
            log.warning(
                "shared rate limiter unreachable: local share in use",
                extra={"error": type(exc).__name__, "expected_replicas": self.expected_replicas},
            )
        self._redis_down_until = self.clock() + self.redis_retry_s
        metrics.LIMITER_DEGRADED.set(1)

    def _redis_ok(self) -> None:
        if self._redis_down_until != -math.inf:
            self._redis_down_until = -math.inf
            metrics.LIMITER_DEGRADED.set(0)
            log.info("shared rate limiter reachable again")

    @staticmethod
    def _refused(provider: str, message: str) -> ProviderError:
        metrics.LIMIT_REJECTED.labels(provider).inc()
        return ProviderError(ErrorCode.RATE_LIMIT, message, provider=provider, limiter="local")
