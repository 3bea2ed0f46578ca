"""Rate limits per provider (and per provider:model): requests/minute, tokens/minute, max concurrency.

Limits belong to the API key, not the replica, so the windows live in Redis and are taken by one Lua
script: a sliding-window log per limit, scored by Redis' own clock in ms (requests: a sorted set of call
ids, counted; tokens: a sorted set of `id:tokens` members plus a running sum). A call is admitted only if
every limit it falls under has room, and then it is added to all of them in the same script, so N
replicas together never admit more than the limit within any window. Tokens are taken as an estimate
before the call and corrected with the real usage after.

With Redis unreachable the limiter falls back, for `redis_retry_s`, to the same window kept in process at
limit / expected_replicas (a call larger than that share, within the limit, goes alone in its window),
and sets LIMITER_DEGRADED. The concurrency cap is per replica, FIFO; a call takes its model's slot before
its provider's, and holds none while it waits for room in the windows.

A call that finds no room waits for it, bounded by its deadline (or `max_wait_s`), instead of failing;
waiters under the same limits in one process queue FIFO and only the head polls Redis. A model with
limits of its own has a queue of its own, so a wait for its quota does not hold up the provider's other
models (their heads compete for the provider's capacity as they poll).

Hot path: one Lua call per request, sent through RedisBatch so concurrent requests share a round trip.
Token corrections are queued and ride along with the next acquire's call (a timer sends them on their
own when no acquire comes), so a request costs one round trip, not two.
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

from contracts import ErrorCode, TokenUsage
from worker import metrics
from worker.errors import ProviderError
from worker.providers.base import ComparisonCall
from worker.redis_batch import RedisBatch

log = logging.getLogger(__name__)

#: Output tokens assumed when the request sets no max_tokens.
DEFAULT_OUTPUT_ESTIMATE = 1024

# One script for both steps, so a request's acquire also carries the token corrections queued since the
# previous one (no round trip of their own). KEYS: the call's windows, request windows first (a sorted
# set of member ids, counted), then token windows (a sorted set of `id:tokens` members plus the running
# sum at KEYS[i]..':sum'), then the token windows of each queued correction. ARGV: 1 window_ms, 2 the
# number of request windows, 3 W (windows of this call, 0 = corrections only), 4..3+W their limits,
# 4+W the call's tokens, 5+W its member id, then per correction: its key count, the score its member was
# admitted at, old member, new member, token delta. Returns now_ms (> 0) when taken, -wait_ms when not,
# 0 when never (and for corrections only).
_ACQUIRE = """
local window, nreq, nwin = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local a, k = 6 + nwin, nwin + 1
while a <= #ARGV do
  local score, old, new, delta = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local last = k + tonumber(ARGV[a]) - 1
  for i = k, last do
    if redis.call('ZREM', KEYS[i], old) == 1 then
      redis.call('ZADD', KEYS[i], score, new)
      redis.call('INCRBY', KEYS[i] .. ':sum', delta)
      -- it was the only member: ZREM deleted the key and its TTL, ZADD made it again without one (the sum
      -- would expire alone, and the next prune take its tokens off a sum begun again at 0)
      if redis.call('PTTL', KEYS[i]) == -1 then
        local left = redis.call('PTTL', KEYS[i] .. ':sum')
        if left > 0 then redis.call('PEXPIRE', KEYS[i], left) end
      end
    end
  end
  a, k = a + 5, last + 1
end
if nwin == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local edge, tokens, id = now - window, tonumber(ARGV[4 + nwin]), ARGV[5 + nwin]
for i = 1, nwin do
  local key, limit = KEYS[i], tonumber(ARGV[3 + i])
  if i <= nreq then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', edge)
    local over = redis.call('ZCARD', key) + 1 - limit
    if over > 0 then
      local nth = redis.call('ZRANGE', key, over - 1, over - 1, 'WITHSCORES')
      return -math.max(1, tonumber(nth[2]) + window - now + 1)
    end
  else
    if tokens > limit then return 0 end
    local skey = key .. ':sum'
    local old = redis.call('ZRANGEBYSCORE', key, '-inf', edge)
    if #old > 0 then
      local freed = 0
      for _, m in ipairs(old) do freed = freed + tonumber(string.match(m, ':(%-?%d+)$')) end
      redis.call('ZREMRANGEBYSCORE', key, '-inf', edge)
      redis.call('DECRBY', skey, freed)
    end
    local need, start = tonumber(redis.call('GET', skey) or '0') + tokens - limit, 0
    while need > 0 do
      local page = redis.call('ZRANGE', key, start, start + 99, 'WITHSCORES')
      if #page == 0 then return -1 end
      for j = 1, #page, 2 do
        need = need - tonumber(string.match(page[j], ':(%-?%d+)$'))
        if need <= 0 then return -math.max(1, tonumber(page[j + 1]) + window - now + 1) end
      end
      start = start + 100
    end
  end
end
-- a window's keys outlive its newest member by a window: their TTL is renewed (by a window more, both
-- keys together so they expire together) only when it ran below that, as PTTL costs Redis less than PEXPIRE
local ttl = window + 1000
for i = 1, nwin do
  local key = KEYS[i]
  local renew = redis.call('PTTL', key) < ttl
  if i <= nreq then
    redis.call('ZADD', key, now, id)
  else
    redis.call('ZADD', key, now, id .. ':' .. tokens)
    redis.call('INCRBY', key .. ':sum', tokens)
    if renew then redis.call('PEXPIRE', key .. ':sum', ttl + window) end
  end
  if renew then redis.call('PEXPIRE', key, ttl + window) end
end
return now
"""

_SHA = hashlib.sha1(_ACQUIRE.encode()).hexdigest()

#: Corrections one acquire carries at most (more would lengthen that request's script).
PIGGYBACK_MAX = 8
#: How long a queued correction waits for an acquire to carry it before it is sent on its own.
CORRECTION_MAX_DELAY_S = 0.05
#: Corrections per script call when they are sent on their own.
CORRECTION_BATCH = 128


#: Bound on the memo of provider/model -> limits (a few hundred bytes each).
_MAX_TARGETS = 4096


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


def estimate_prompt_tokens(call: ComparisonCall) -> int:
    chars = len(call.system_prompt) + len(call.user_prompt) + sum(len(b.content) for b in call.prompt_blocks)
    return chars // 4 + 1


def estimate_tokens(call: ComparisonCall) -> int:
    return estimate_prompt_tokens(call) + (call.max_tokens or DEFAULT_OUTPUT_ESTIMATE)


#: Providers whose per-minute token limits leave prompt-cache reads out: Anthropic's input-tokens-per-minute
#: limit counts uncached input and cache writes (for most models), not cache reads.
_CACHE_READS_NOT_RATE_COUNTED = frozenset({"anthropic"})


def rate_counted_tokens(provider: str, usage: TokenUsage) -> int:
    """The tokens of a finished call that count against its provider's per-minute token limit."""
    if provider in _CACHE_READS_NOT_RATE_COUNTED:
        return usage.total_tokens - usage.cached_tokens
    return usage.total_tokens


@dataclass(frozen=True, slots=True)
class _Window:
    key: str
    limit: int
    is_tokens: bool


@dataclass(slots=True)
class _Target:
    """What calls to one provider/model fall under, prepared once: the concurrency slots, the windows
    (request windows first, as the script wants them) and the fixed part of their script call."""

    slots: list[FifoSlots]
    windows: list[_Window]
    queue: asyncio.Lock  # FIFO waiters of the first window; only the head polls Redis
    keys: tuple[str, ...]
    token_keys: tuple[str, ...]
    args: tuple[int, ...]  # window_ms, request windows, windows, their limits
    head: tuple[Any, ...]  # EVALSHA, sha, key count, keys, args: the call without corrections
    waited: Any  # the provider's LIMIT_WAIT histogram


#: A token correction waiting to be sent: queued at (loop time), token keys, admitted_ms, old member,
#: new member, delta.
_Correction = tuple[float, tuple[str, ...], int, str, str, int]


@dataclass(slots=True)
class Grant:
    """Capacity taken for one call; hand it back to Limiter.settle when the call ends."""

    provider: str
    tokens: int
    member_id: str = ""
    #: Redis server time (ms) the shared limiter admitted the call at; 0 when admitted locally.
    admitted_ms: int = 0
    #: The shared token windows the call was admitted to (its correction goes there).
    token_keys: tuple[str, ...] = ()
    local: list[tuple[_LocalWindow, list[float]]] = field(default_factory=list)
    slots: list[FifoSlots] = field(default_factory=list)


class FifoSlots:
    """A counting semaphore that hands free slots to waiters strictly in arrival order."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody queues for it."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
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
    """The same sliding window, in process: entries are [t, cost, live] so a grant can correct its own
    while it is still in the window (live 1.0; 0.0 once it aged out, when a correction no longer counts)."""

    def __init__(self, limit: int, window_s: float, whole: int | None = None) -> None:
        self.limit = limit
        #: The shared limit this is a share of: a call up to it may still go, alone in the window.
        self.whole = max(limit, whole or limit)
        self.window_s = window_s
        self.used = 0.0
        self.entries: deque[list[float]] = deque()

    def wait_s(self, cost: int, now: float) -> float:
        """0 when `cost` fits now; else seconds until it may; inf when it never can."""
        if cost > self.whole:
            return math.inf
        while self.entries and self.entries[0][0] <= now - self.window_s:
            gone = self.entries.popleft()
            self.used -= gone[1]
            gone[2] = 0.0
        if cost > self.limit:  # over this replica's share, within the shared limit: alone in the window
            return max(self.entries[-1][0] + self.window_s - now, 1e-3) if self.entries else 0.0
        need = self.used + cost - self.limit
        if need <= 0:
            return 0.0
        for t, c, _ in self.entries:
            need -= c
            if need <= 0:
                return max(t + self.window_s - now, 1e-3)
        return 1e-3

    def take(self, cost: int, now: float) -> list[float]:
        entry = [now, float(cost), 1.0]
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
        self._pending: list[_Correction] = []
        self._pending_timer: asyncio.TimerHandle | None = None
        self._corrections: set[asyncio.Task[None]] = set()
        self._redis_down_until = -math.inf
        self._queues: dict[tuple[str, ...], asyncio.Lock] = {}
        self._slots: dict[str, FifoSlots] = {}
        self._local: dict[str, _LocalWindow] = {}
        self._targets: dict[tuple[str, str], _Target | None] = {}
        self._instance = uuid.uuid4().hex[:12]
        self._serial = itertools.count()

    def _target(self, provider: str, model: str) -> _Target | None:
        """The limits a call to provider/model falls under (None: none), computed once. Model names come
        from requests (model_override), so the memo is emptied when it reaches _MAX_TARGETS entries."""
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        scopes = [
            (s, lim) for s in (provider, f"{provider}:{model}") if (lim := self.limits.get(s)) is not None
        ]
        if not scopes:
            self._targets[(provider, model)] = None
            return None
        in_scope_order = [
            _Window(f"{self.key_prefix}:rl:{scope}:{kind}", limit, kind == "tpm")
            for scope, lim in scopes
            for kind, limit in (("rpm", lim.requests_per_minute), ("tpm", lim.tokens_per_minute))
            if limit
        ]
        windows = sorted(in_scope_order, key=lambda w: w.is_tokens)  # request windows first, stable
        keys = tuple(w.key for w in windows)
        args = (
            self.window_ms,
            sum(not w.is_tokens for w in windows),
            len(windows),
            *(w.limit for w in windows),
        )
        target = self._targets[(provider, model)] = _Target(
            # the model's own slot before the provider's: a call waiting for its model's slot holds none of
            # the provider's, which the provider's other models need
            slots=[
                self._slots.setdefault(scope, FifoSlots(lim.max_concurrency))
                for scope, lim in reversed(scopes)
                if lim.max_concurrency
            ],
            windows=windows,
            # one queue per set of windows: the provider's models without limits of their own share the
            # provider's queue; a model with its own has another, so its wait does not hold up the rest
            queue=self._queues.setdefault(keys, asyncio.Lock()),
            keys=keys,
            token_keys=tuple(w.key for w in windows if w.is_tokens),
            args=args,
            head=(b"EVALSHA", _SHA, len(keys), *keys, *args),
            waited=metrics.LIMIT_WAIT.labels(provider),
        )
        return target

    async def acquire(self, provider: str, model: str, tokens: int, deadline_s: float | None = None) -> Grant:
        """Take capacity for one call, waiting (bounded by the deadline) for it. Raises ProviderError
        RATE_LIMIT with `limiter: local` when there is none in time; it carries no retry advice."""
        grant = Grant(provider, tokens)
        try:
            target = self._targets[(provider, model)]
        except KeyError:
            target = self._target(provider, model)
        if target is None:
            return grant
        t0 = self.clock()
        until = min(deadline_s if deadline_s is not None else math.inf, t0 + self.max_wait_s)
        try:
            await self._take_slots(grant, target, until)
            # fast path: nobody of this limit is waiting and there is room
            if target.windows and (target.queue.locked() or await self._try(grant, target) != 0.0):
                # No slot is held while waiting for the windows: a wait for a model's own quota must not
                # keep the provider's other models from the provider's slots. Taken again once admitted.
                self.release_slots(grant)
                await self._wait_for_windows(grant, target, until)
                try:
                    await self._take_slots(grant, target, until)
                except BaseException:
                    await self.settle(grant, None)  # admitted but never called: its tokens given back
                    raise
        except TimeoutError:
            self.release_slots(grant)
            raise self._refused(provider, "no concurrency slot before the deadline") from None
        except BaseException:
            self.release_slots(grant)
            raise
        target.waited.observe(self.clock() - t0)
        return grant

    async def _take_slots(self, grant: Grant, target: _Target, until: float) -> None:
        for slots in target.slots:
            if not slots.try_acquire():
                async with asyncio.timeout(max(0.0, until - self.clock())):
                    await slots.acquire()
            grant.slots.append(slots)

    async def _wait_for_windows(self, grant: Grant, target: _Target, until: float) -> None:
        remaining = until - self.clock()
        # FIFO: waiters of these limits queue here and only the head polls. The head may sleep a whole
        # window, so waiting behind it is bounded by the deadline too.
        try:
            async with asyncio.timeout(None if remaining == math.inf else max(0.0, remaining)):
                await target.queue.acquire()
        except TimeoutError:
            raise self._refused(grant.provider, "no rate-limit capacity within the deadline") from None
        try:
            await self._wait_at_head(grant, target, until)
        finally:
            target.queue.release()

    async def _wait_at_head(self, grant: Grant, target: _Target, until: float) -> None:
        """At the head of the queue: poll until the windows have room, or refuse."""
        while (wait_s := await self._try(grant, target)) > 0.0:
            if wait_s == math.inf:
                raise self._refused(grant.provider, "the call needs more than a whole window's limit")
            if self.clock() + wait_s > until:
                raise self._refused(
                    grant.provider, f"no rate-limit capacity within the deadline ({wait_s:.1f}s)"
                )
            await self.sleep(wait_s)

    async def _try(self, grant: Grant, target: _Target) -> float:
        """0.0 when taken; else seconds to wait. The call also carries queued token corrections."""
        if self._batch is None or self.clock() < self._redis_down_until:
            return self._try_local(grant, target.windows)
        member_id = f"{self._instance}{next(self._serial)}"
        if self._pending:
            corrections = self._pending[:PIGGYBACK_MAX]
            del self._pending[:PIGGYBACK_MAX]
            command = self._command(corrections, target, (grant.tokens, member_id))
        else:
            command = (*target.head, grant.tokens, member_id)
        try:
            async with asyncio.timeout(self.redis_call_timeout_s):  # no reconnect stall in our path
                taken_ms = await self._eval(command)
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)  # corrections it carried are lost: their estimates age out
            return self._try_local(grant, target.windows)
        self._redis_ok()
        if taken_ms > 0:
            grant.member_id, grant.token_keys, grant.admitted_ms = member_id, target.token_keys, taken_ms
            return 0.0
        return -taken_ms / 1000 if taken_ms else math.inf

    def _command(
        self, corrections: list[_Correction], target: _Target | None = None, call: tuple[int, str] = (0, "")
    ) -> tuple[Any, ...]:
        """The script call for a target's acquire (or none) carrying `corrections`."""
        keys: list[str] = []
        args: list[Any] = []
        for _, token_keys, admitted_ms, old, new, delta in corrections:
            keys += token_keys
            args += (len(token_keys), admitted_ms, old, new, delta)
        if target is None:
            return (b"EVALSHA", _SHA, len(keys), *keys, self.window_ms, 0, 0, *call, *args)
        n = len(target.keys) + len(keys)
        return (b"EVALSHA", _SHA, n, *target.keys, *keys, *target.args, *call, *args)

    def _try_local(self, grant: Grant, windows: list[_Window]) -> float:
        now = self.clock()
        local = [
            self._local.setdefault(
                w.key, _LocalWindow(max(1, w.limit // self.expected_replicas), self.window_s, w.limit)
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
        (None = the provider billed nothing, so the estimate is given back). The shared correction is
        queued: the next acquire carries it, or it goes on its own after CORRECTION_MAX_DELAY_S."""
        self.release_slots(grant)
        delta = (used_tokens or 0) - grant.tokens
        if delta == 0:
            return
        for lw, entry in grant.local:
            if entry[2]:  # a call that outlived the window: its entry is gone, and so is its count
                entry[1] += delta
                lw.used += delta
        if not grant.token_keys:
            return
        loop = asyncio.get_running_loop()
        old, new = f"{grant.member_id}:{grant.tokens}", f"{grant.member_id}:{grant.tokens + delta}"
        self._pending.append((loop.time(), grant.token_keys, grant.admitted_ms, old, new, delta))
        if self._pending_timer is None:
            self._pending_timer = loop.call_later(CORRECTION_MAX_DELAY_S, self._corrections_due)

    def _corrections_due(self) -> None:
        """Timer: send the queued corrections once the oldest has waited CORRECTION_MAX_DELAY_S."""
        self._pending_timer = None
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        wait_s = self._pending[0][0] + CORRECTION_MAX_DELAY_S - loop.time()
        if wait_s > 0:  # acquires carried the older ones
            self._pending_timer = loop.call_later(wait_s, self._corrections_due)
            return
        task = loop.create_task(self._send_corrections())
        self._corrections.add(task)
        task.add_done_callback(self._corrections.discard)

    async def _send_corrections(self) -> None:
        while self._pending:
            corrections = self._pending[:CORRECTION_BATCH]
            del self._pending[:CORRECTION_BATCH]
            try:
                await self._eval(self._command(corrections))
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)

    async def flush(self) -> None:
        """Send the queued token corrections now and wait until they reached Redis."""
        if self._pending_timer is not None:
            self._pending_timer.cancel()
            self._pending_timer = None
        await self._send_corrections()
        while self._corrections:
            await asyncio.gather(*self._corrections, return_exceptions=True)

    async def aclose(self) -> None:
        """flush(), then close the connection the shared calls go through."""
        await self.flush()
        if self._batch is not None:
            await self._batch.aclose()

    async def _eval(self, command: tuple[Any, ...]) -> Any:
        """Run the script. Calls of concurrent requests share one round trip (RedisBatch); a Redis that
        lost its scripts (restart) gets it loaded again."""
        assert self.redis is not None and self._batch is not None
        try:
            return await self._batch.execute(*command)
        except NoScriptError:
            await self.redis.script_load(_ACQUIRE)
            return await self._batch.execute(*command)

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
