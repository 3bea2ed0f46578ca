"""The answer cache and single-flight of identical requests.

Key: sha256 of the canonical JSON of everything in a ComparisonCall that changes the answer, plus the
answer schema version; nothing else (request id, correlation id, metadata and user never reach the call).
Keys are namespaced by the Redis key prefix and versioned (`<prefix>:cache:v2:<hex>`).

Layers: an in-process LRU bounded by entries and bytes (L1, and the only layer while Redis is down) in
front of Redis (shared by replicas, with a TTL). `RedisGuard` is a small breaker: after a Redis error the
cache skips Redis for CACHE_REDIS_RETRY_S, then lets one call probe it; so an outage costs one timeout,
not one per request, and recovery is automatic. Its status is the worker's readiness (healthy/degraded).
A refreshed entry is announced on `<prefix>:cache:refreshed` (pub/sub): the other replicas drop it from L1.

Single-flight: identical requests in flight at the same time cause one provider call.
- Within a process a shared future per key: the first request leads, the others await its answer.
- Across replicas a Redis lease (SET NX PX) per key, renewed while the call runs. Another replica that
  finds the lease taken polls (bounded backoff) for the answer in the cache; when the lease is gone without
  an answer (the leader failed, or died and its lease expired) the waiter takes over as leader.
Only answers are shared. When the leader fails, its joiners try again (one of them leads the next call),
so an error tied to one request (its deadline, its organization's budget) never leaks to another.
Bypass requests never reach this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Literal, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from contracts import CachePolicy, PromptBlock, TokenUsage
from worker import metrics
from worker.errors import ProviderError
from worker.providers.anthropic import sent_order
from worker.providers.base import SCHEMA_VERSION, Answer, ComparisonCall, parse_answer
from worker.settings import CacheSettings

log = logging.getLogger(__name__)

#: 2: Anthropic's prompt blocks keyed in the order they are sent (an entry under a v1 key may answer the
#: same blocks in another order).
KEY_VERSION = 2

T = TypeVar("T")
Layer = Literal["redis", "local", "single_flight"]
Scope = Literal["local", "replica"]

_FOUND, _LEASED, _TAKEN, _LEASED_LOCALLY = 1, 2, 3, 4

# KEYS: cache key, lease key. ARGV: token, lease_ms, read (1/0).
# -> {FOUND, answer} | {LEASED} (we lead) | {TAKEN} (another request leads)
_LOOKUP = """
if ARGV[3] == '1' then
  local v = redis.call('get', KEYS[1])
  if v then return {1, v} end
end
if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {3}
"""
# KEYS: cache key, lease key ('' when none). ARGV: answer ('' = nothing to store), ttl_s, token.
_FINISH = """
if ARGV[1] ~= '' then redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
if KEYS[2] ~= '' and redis.call('get', KEYS[2]) == ARGV[3] then redis.call('del', KEYS[2]) end
if ARGV[1] ~= '' and ARGV[4] ~= '' then redis.pcall('publish', ARGV[4], ARGV[5]) end
return 1
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


def _blocks_as_sent(call: ComparisonCall) -> tuple[PromptBlock, ...] | list[PromptBlock]:
    """The prompt blocks in the order the provider gets them: Anthropic's are ordered by their caching
    hints (cacheable ones first), so the same blocks hinted otherwise are another prompt there."""
    if call.provider != "anthropic" or not call.prompt_blocks:
        return call.prompt_blocks
    blocks = call.prompt_blocks
    return [
        *sent_order([b for b in blocks if b.target == "system"]),
        *sent_order([b for b in blocks if b.target == "user_content"]),
    ]


def make_cache_key(call: ComparisonCall, prefix: str) -> str:
    doc = {
        "schema_version": SCHEMA_VERSION,
        "provider": call.provider,
        "model": call.model,
        "system_prompt": call.system_prompt,
        "user_prompt": call.user_prompt,
        "prompt_blocks": [[b.target, b.content] for b in _blocks_as_sent(call)],
        "temperature": call.temperature,
        "max_tokens": call.max_tokens,
        "reasoning_effort": call.reasoning_effort,
        "output_verbosity": call.output_verbosity,
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{prefix}:cache:v{KEY_VERSION}:{hashlib.sha256(canonical.encode()).hexdigest()}"


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """An answer, what its call cost (the cost a hit saves), and where it came from: the request that
    made the call and that call's billed attempts (opaque JSON lists), so a redelivery of that same request
    can still emit the cost events its crash lost."""

    answer: Answer
    cost_usd: float
    request_id: str = ""
    attempts: tuple[Any, ...] = ()

    def to_bytes(self) -> bytes:
        a = self.answer
        doc = [
            a.winner,
            a.justification,
            a.confidence,
            a.model,
            a.usage.model_dump(),
            self.cost_usd,
            self.request_id,
            list(self.attempts),
        ]
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedAnswer:
        winner, justification, confidence, model, usage, cost_usd, request_id, attempts = json.loads(raw)
        doc = {"winner": winner, "justification": justification, "confidence": confidence}
        try:  # an Answer is valid wherever it is made: results are serialised without validating it again
            answer = parse_answer(doc, str(model), TokenUsage(**usage), "cache")
        except ProviderError as exc:
            raise ValueError(exc.message) from exc
        return cls(answer, float(cost_usd), str(request_id), tuple(attempts))


@dataclass(frozen=True, slots=True)
class Flight(Generic[T]):
    """How a request was served: it led the call (`led`), or got an answer (`shared`) from the cache
    (layer local/redis) or from an identical in-flight request (layer single_flight; scope local/replica)."""

    led: T | None = None
    shared: CachedAnswer | None = None
    layer: Layer | None = None
    scope: Scope | None = None


class LocalLRU:
    """In-process LRU bounded by entry count and bytes (key + serialised answer); entries live ttl_s."""

    def __init__(
        self, max_entries: int, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self.bytes = 0
        self._items: OrderedDict[str, tuple[float, int, CachedAnswer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> CachedAnswer | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires_at, _, value = item
        if self.clock() >= expires_at:
            self._remove(key, "expired")
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: CachedAnswer, size: int) -> None:
        if key in self._items:
            self._remove(key, None)
        size += len(key)
        if size > self.max_bytes:
            return
        self._items[key] = (self.clock() + self.ttl_s, size, value)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self._remove(next(iter(self._items)), "capacity")

    def drop(self, key: str) -> None:
        if key in self._items:
            self._remove(key, "replaced")

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def _remove(self, key: str, reason: str | None) -> None:
        _, size, _ = self._items.pop(key)
        self.bytes -= size
        if reason is not None:
            metrics.labelled(metrics.CACHE_EVICTIONS, reason).inc()


class RedisUnavailable(Exception):
    """Redis is skipped (breaker open) or just failed; use the local layer."""


class RedisGuard:
    """A small breaker around one Redis: closed (healthy) until an error; then open (degraded) for
    retry_s, during which calls fail fast; after that a single call probes, and success closes it."""

    def __init__(self, retry_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_s = retry_s
        self.clock = clock
        self._open_until: float | None = None
        self._probing = False
        metrics.CACHE_REDIS_DEGRADED.set(0)

    @property
    def status(self) -> Literal["healthy", "degraded"]:
        return "healthy" if self._open_until is None else "degraded"

    async def call(self, op: str, make: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; RedisUnavailable when skipped or failed."""
        if not self._allow():
            raise RedisUnavailable(op)
        try:
            result = await make()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(op, exc)
            raise RedisUnavailable(op) from exc
        finally:
            self._probing = False
        self._succeeded()
        return result

    async def probe(self, ping: Callable[[], Awaitable[Any]]) -> None:
        """Readiness check: ping Redis (when degraded, only once the retry time has come)."""
        try:
            await self.call("ping", ping)
        except RedisUnavailable:
            pass

    def _allow(self) -> bool:
        if self._open_until is None:
            return True
        if self._probing or self.clock() < self._open_until:
            return False
        self._probing = True
        return True

    def _failed(self, op: str, exc: BaseException) -> None:
        metrics.labelled(metrics.CACHE_ERRORS, op).inc()
        if self._open_until is None:
            log.warning(
                "redis unavailable; cache serves from the local layer", extra={"op": op, "error": str(exc)}
            )
            metrics.CACHE_REDIS_DEGRADED.set(1)
        self._open_until = self.clock() + self.retry_s

    def _succeeded(self) -> None:
        if self._open_until is not None:
            log.info("redis reachable again; cache healthy")
            metrics.CACHE_REDIS_DEGRADED.set(0)
        self._open_until = None


# The refresh subscription asks Redis for a pong after this long without a message.
_LISTEN_PING_S = 5.0
# Leaders' stores waiting for the Redis breaker at most (each holds its answer's bytes).
_STORES_LATER_MAX = 10_000


class AnswerCache:
    def __init__(self, redis: Redis, settings: CacheSettings, prefix: str, guard: RedisGuard) -> None:
        self.redis = redis
        self.settings = settings
        self.prefix = prefix
        self.guard = guard
        self.local = LocalLRU(
            settings.cache_local_max_entries, settings.cache_local_max_bytes, settings.cache_ttl_s
        )
        self.lease_ms = settings.single_flight_lease_ms
        self.poll_max_s = settings.single_flight_poll_ms / 1000
        self._flights: dict[str, asyncio.Future[CachedAnswer | None]] = {}
        self._lookup = redis.register_script(_LOOKUP)
        self._finish = redis.register_script(_FINISH)
        self._renew = redis.register_script(_RENEW)
        #: Stores a leader could not make while the Redis breaker was open, tried again (see _store_later).
        self._later: set[asyncio.Task[None]] = set()
        #: A refreshed entry is announced here, so that the other replicas drop it from their local layer.
        self.channel = f"{prefix}:cache:refreshed"
        self._id = uuid.uuid4().hex
        self._listener: asyncio.Task[None] | None = None
        #: Moves on with every refresh seen (announced by another replica, stored here, or unknown while
        #: unsubscribed). An entry read from Redis before it moved may be the replaced one: it is answered
        #: but not kept in the local layer.
        self._epoch = 0

    def start(self) -> None:
        """Listen for the entries other replicas refresh (from now until aclose())."""
        self._listener = asyncio.create_task(self._listen())

    async def aclose(self) -> None:
        """Stop listening (its connection back to the pool), and the stores still to be tried again (their
        leases expire on their own)."""
        tasks = [*self._later, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _listen(self) -> None:
        """Drop from the local layer each entry another replica refreshed. Whatever was refreshed while this
        replica was not subscribed is unknown, so the local layer is emptied on each (re)subscription: the
        first, and each one redis-py makes when it reconnects (its confirmation comes as a message too)."""
        loop = asyncio.get_running_loop()
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                heard = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    now = loop.time()
                    if message is None:
                        # A connection cut without a reset (a failover, a partition) stays silent: ask
                        # for a pong when idle, and take the silence past three asks for a lost one.
                        if now - heard > 3 * _LISTEN_PING_S:
                            raise RedisConnectionError("no pong from Redis on the refresh subscription")
                        if now - heard > _LISTEN_PING_S:
                            await pubsub.ping()
                        continue
                    heard = now
                    if message["type"] == "subscribe":
                        self._epoch += 1
                        self.local.clear()
                    elif message["type"] == "message":
                        sender, _, key = bytes(message["data"]).decode(errors="replace").partition(" ")
                        if sender != self._id:
                            self._epoch += 1
                            self.local.drop(key)
            except (RedisError, OSError) as exc:
                metrics.labelled(metrics.CACHE_ERRORS, "refreshed").inc()
                log.warning("refresh announcements unavailable; retrying", extra={"error": str(exc)})
                await asyncio.sleep(self.guard.retry_s)
            except Exception:  # a bug: keep listening, or every later refresh would be missed
                metrics.labelled(metrics.CACHE_ERRORS, "refreshed").inc()
                log.exception("refresh announcements failed; retrying")
                await asyncio.sleep(self.guard.retry_s)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    def key_for(self, call: ComparisonCall) -> str:
        return make_cache_key(call, self.prefix)

    def policy(self, requested: CachePolicy) -> CachePolicy:
        return requested if self.settings.cache_enabled else CachePolicy.BYPASS

    async def put(self, key: str, value: CachedAnswer) -> None:
        """Store an answer outside a flight (both layers)."""
        raw = value.to_bytes()
        self.local.put(key, value, len(raw))
        try:
            await self.guard.call("put", lambda: self.redis.set(key, raw, ex=self.settings.cache_ttl_s))
        except RedisUnavailable:
            pass

    def _decode(self, key: str, raw: bytes | str | None, epoch: int | None = None) -> CachedAnswer | None:
        if raw is None:
            return None
        try:
            value = CachedAnswer.from_bytes(raw if isinstance(raw, bytes) else raw.encode())
        except (ValueError, TypeError) as exc:
            metrics.labelled(metrics.CACHE_ERRORS, "decode").inc()
            log.warning("unreadable cache entry ignored", extra={"error": str(exc)})
            return None
        if epoch is None or epoch == self._epoch:  # else a refresh came meanwhile: maybe this very entry
            self.local.put(key, value, len(raw))
        return value

    # ---- single-flight ---------------------------------------------------------------------------------

    async def serve(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        to_cached: Callable[[T], CachedAnswer | None],
        deadline_s: float | None,
        read: bool = True,
    ) -> Flight[T]:
        """The cached answer (when `read`), else run `compute` unless an identical request is already
        running it (here or on another replica), in which case that request's answer. The leader stores its
        answer (`to_cached` not None) in the same step that releases its lease, so a waiter that sees the
        lease gone either finds the answer or knows there is none. Waiting is bounded by `deadline_s`
        (monotonic): TimeoutError. Redis costs a miss two round trips: read-or-lease, store-and-release."""
        if read and (value := self.local.get(key)) is not None:
            metrics.labelled(metrics.CACHE_HITS, "local").inc()
            return Flight(shared=value, layer="local")
        # A refresh joins only refreshes: a reading flight may answer with the very entry it replaces.
        flight_key = key if read else f"{key}:refresh"
        unshared = 0
        while (pending := self._flights.get(flight_key)) is not None:
            # Shield: a joiner hitting its deadline must not cancel the leader's future.
            shared = await asyncio.wait_for(asyncio.shield(pending), _remaining(deadline_s))
            if shared is not None:
                metrics.labelled(metrics.SINGLE_FLIGHT_JOINS, "local").inc()
                return Flight(shared=shared, layer="single_flight", scope="local")
            # The leader failed, was cancelled, or got an answer not to share (a fallback's): the joiners
            # share one more call. If that one has nothing to share either, they call side by side, rather
            # than one after another behind ever new leaders.
            unshared += 1
            if unshared >= _SHARED_RETRIES + 1:
                flight, _ = await self._call(key, None, uuid.uuid4().hex, compute, to_cached, not read)
                return flight
        future: asyncio.Future[CachedAnswer | None] = asyncio.get_running_loop().create_future()
        self._flights[flight_key] = future
        for_joiners: CachedAnswer | None = None
        try:
            flight, for_joiners = await self._lead(key, compute, to_cached, deadline_s, read)
            return flight
        finally:
            # Always resolve the future (never with an exception: joiners only need "answer or retry").
            del self._flights[flight_key]
            future.set_result(for_joiners)

    async def _lead(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        to_cached: Callable[[T], CachedAnswer | None],
        deadline_s: float | None,
        read: bool,
    ) -> tuple[Flight[T], CachedAnswer | None]:
        lease_key, token, asked_read = f"{key}:lease", uuid.uuid4().hex, read
        while True:
            epoch = self._epoch
            try:
                found = await self.guard.call(
                    "lookup", partial(self._read_or_lease, key, lease_key, token, read)
                )
            except RedisUnavailable:
                found = [_LEASED_LOCALLY]
            if found[0] == _FOUND:
                value = self._decode(key, found[1], epoch)
                if value is not None:
                    metrics.labelled(metrics.CACHE_HITS, "redis").inc()
                    return Flight(shared=value, layer="redis"), value
                read = False  # unreadable entry: overwrite it
                continue
            if read:
                metrics.CACHE_MISSES.inc()
                read = False
            if found[0] in (_LEASED, _LEASED_LOCALLY):
                lease = lease_key if found[0] == _LEASED else None
                return await self._call(key, lease, token, compute, to_cached, not asked_read)
            shared = await self._await_replica(key, lease_key, deadline_s, refresh=not asked_read)
            if shared is not None:
                metrics.labelled(metrics.SINGLE_FLIGHT_JOINS, "replica").inc()
                return Flight(shared=shared, layer="single_flight", scope="replica"), shared

    async def _call(
        self,
        key: str,
        lease_key: str | None,
        token: str,
        compute: Callable[[], Awaitable[T]],
        to_cached: Callable[[T], CachedAnswer | None],
        refresh: bool,
    ) -> tuple[Flight[T], CachedAnswer | None]:
        """Lead: call, then store the answer and release the lease in one step. The lease is renewed
        meanwhile, so a slow call keeps it; a dead process stops renewing and its lease expires. A refresh's
        answer is announced in the same step (the other replicas drop the entry from their local layer)."""
        renewer = asyncio.create_task(self._keep_lease(lease_key, token)) if lease_key else None
        raw = b""
        try:
            value = await compute()
            cached = to_cached(value)
            if cached is not None:
                raw = cached.to_bytes()
                self.local.put(key, cached, len(raw))
            return Flight(led=value), cached
        finally:
            if renewer is not None:
                renewer.cancel()
            if lease_key is not None or raw:
                await self._store_and_release(key, lease_key, token, raw, refresh)

    async def _read_or_lease(self, key: str, lease_key: str, token: str, read: bool) -> list[Any]:
        return await self._lookup(keys=[key, lease_key], args=[token, self.lease_ms, int(read)])

    async def _store_and_release(
        self, key: str, lease_key: str | None, token: str, raw: bytes, refresh: bool = False
    ) -> None:
        keys = [key, lease_key or ""]
        announce = [self.channel, f"{self._id} {key}"] if refresh else ["", ""]
        if refresh:
            self._epoch += 1
        args: list[bytes | str | int] = [raw, self.settings.cache_ttl_s, token, *announce]
        try:
            await self.guard.call("put", lambda: self._finish(keys=keys, args=args))
        except RedisUnavailable:  # the answer stays local for now
            if lease_key is not None and len(self._later) < _STORES_LATER_MAX:
                task = asyncio.create_task(self._store_later(keys, args))
                self._later.add(task)
                task.add_done_callback(self._later.discard)

    async def _store_later(self, keys: list[str], args: list[bytes | str | int]) -> None:
        """Any Redis error of this replica opens its breaker, Redis itself may be fine, and other replicas'
        requests wait for this lease: store and release it as soon as the breaker lets a call through, until
        the lease would have expired anyway."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.lease_ms / 1000
        while loop.time() < until:
            await asyncio.sleep(min(self.guard.retry_s, self.lease_ms / 1000) / 4)
            try:
                await self.guard.call("put", lambda: self._finish(keys=keys, args=args))
                return
            except RedisUnavailable:
                continue

    async def _keep_lease(self, lease_key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self.guard.call(
                    "renew", lambda: self._renew(keys=[lease_key], args=[token, self.lease_ms])
                )
            except RedisUnavailable:
                pass

    async def _await_replica(
        self, key: str, lease_key: str, deadline_s: float | None, refresh: bool = False
    ) -> CachedAnswer | None:
        """Another replica holds the lease: poll (10 ms doubling up to SINGLE_FLIGHT_POLL_MS) until its
        answer is in Redis -> the answer, or the lease is gone without one -> None (take over). A refresh
        takes only an entry written after its first poll, never the one it was asked to replace."""
        delay_s = 0.01
        stale: bytes | None = None
        if refresh:  # the entry there now is the one to replace
            try:
                stale, _ = await self.guard.call("wait", lambda: self._peek(key, lease_key))
            except RedisUnavailable:
                return None  # lead locally
        while True:
            remaining = _remaining(deadline_s)
            if remaining is not None and remaining <= 0:
                raise TimeoutError("deadline passed while waiting for an identical request")
            await asyncio.sleep(delay_s if remaining is None else min(delay_s, remaining))
            delay_s = min(delay_s * 2, self.poll_max_s)
            epoch = self._epoch
            try:
                raw, held = await self.guard.call("wait", lambda: self._peek(key, lease_key))
            except RedisUnavailable:
                return None  # lead locally
            if raw is not None and raw == stale:
                raw = None
            value = self._decode(key, raw, epoch)
            if value is not None:
                return value
            if not held:
                return None

    async def _peek(self, key: str, lease_key: str) -> tuple[bytes | None, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.exists(lease_key)
            raw, held = await pipe.execute()
        return raw, int(held)


#: After a flight with nothing to share, how many more flights its joiners wait for before calling alone.
_SHARED_RETRIES = 1


def _remaining(deadline_s: float | None) -> float | None:
    return None if deadline_s is None else max(0.0, deadline_s - time.monotonic())
