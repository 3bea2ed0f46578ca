"""Prometheus metrics (prometheus-client), served on METRICS_PORT when set."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, overload

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("llm_worker_requests_total", "Terminal outcomes", ["outcome", "provider", "code"])
IN_FLIGHT = Gauge("llm_worker_in_flight", "Requests admitted and not finished")
PAUSED = Gauge("llm_worker_consumer_paused", "1 while the in-flight window is full and no records are taken")
HELD_PARTITIONS = Gauge(
    "llm_worker_partitions_held",
    "Partitions not fetched from: MAX_UNCOMMITTED_PER_PARTITION records taken past an unfinished one",
)
COMMITS = Counter("llm_worker_commits_total", "Offset commits", ["result"])
REDELIVERED = Counter("llm_worker_redelivered_total", "Requests answered from the idempotency store")
IDEMPOTENCY_DEGRADED = Counter(
    "llm_worker_idempotency_degraded_total", "Idempotency store errors (at-least-once only)", ["op"]
)
DLQ = Counter("llm_worker_dlq_total", "Messages sent to the DLQ", ["reason"])
PROCESSING_ERRORS = Counter("llm_worker_processing_errors_total", "Unexpected errors while processing")
PROVIDER_CALLS = Counter("llm_worker_provider_calls_total", "Provider calls", ["provider", "result"])
PROVIDER_LATENCY = Histogram(
    "llm_worker_provider_latency_seconds",
    "Provider call latency",
    ["provider"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
REVOKED_CANCELLED = Counter(
    "llm_worker_revoked_cancelled_total", "In-flight requests abandoned on revocation or shutdown"
)
PRICE_UNKNOWN = Counter("llm_worker_price_unknown_total", "Calls to a model without a price", ["model"])
BREAKER_STATE = Gauge(
    "llm_worker_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", ["provider"]
)
BREAKER_TRANSITIONS = Counter(
    "llm_worker_breaker_transitions_total", "Circuit breaker state changes", ["provider", "state"]
)
ATTEMPTS = Counter(
    "llm_worker_provider_attempts_total",
    "Provider attempts (retries and fallbacks included)",
    ["provider", "kind"],
)
ATTEMPTS_PER_REQUEST = Histogram(
    "llm_worker_attempts_per_request", "Real provider calls per request", buckets=(0, 1, 2, 3, 4, 5, 8)
)
FALLBACKS = Counter(
    "llm_worker_fallbacks_total", "Requests moved to the next provider", ["from_provider", "to"]
)
LIMIT_WAIT = Histogram(
    "llm_worker_rate_limit_wait_seconds",
    "Time a call waited for rate-limit or concurrency capacity",
    ["provider"],
    buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 15, 60),
)
LIMIT_REJECTED = Counter(
    "llm_worker_rate_limit_rejected_total", "Calls refused: no capacity before the deadline", ["provider"]
)
LIMITER_DEGRADED = Gauge(
    "llm_worker_rate_limiter_degraded", "1 while the shared (Redis) limiter is down and a local share is used"
)
LIMITER_REDIS_ERRORS = Counter("llm_worker_rate_limiter_redis_errors_total", "Shared limiter Redis errors")
CACHE_HITS = Counter("llm_worker_cache_hits_total", "Requests answered by the cache", ["layer"])
CACHE_MISSES = Counter("llm_worker_cache_misses_total", "Cache lookups that found nothing")
CACHE_BYPASS = Counter("llm_worker_cache_bypass_total", "Requests that skipped the cache", ["reason"])
CACHE_ERRORS = Counter("llm_worker_cache_errors_total", "Cache Redis errors (local layer used)", ["op"])
CACHE_EVICTIONS = Counter("llm_worker_cache_evictions_total", "Local cache entries evicted", ["reason"])
SINGLE_FLIGHT_JOINS = Counter(
    "llm_worker_single_flight_joins_total", "Requests answered by an identical in-flight call", ["scope"]
)
CACHE_REDIS_DEGRADED = Gauge(
    "llm_worker_cache_redis_degraded", "1 while the cache skips Redis after an error (local layer only)"
)
COST_ALERTS = Counter("llm_worker_cost_alerts_total", "Spend threshold crossings alerted", ["scope"])
BUDGET_REJECTED = Counter("llm_worker_budget_rejected_total", "Requests refused by an organization budget")
SPEND_ERRORS = Counter("llm_worker_spend_errors_total", "Spend counter Redis errors (not counted)", ["op"])


class Tally:
    """A counter child's increments as a plain number, added to the child by flush(): prometheus-client
    makes three calls and takes a lock per inc(), which with the histograms below was 6 % of the worker's
    instructions per request. Counting and flush() both run on the event loop (/metrics is served there),
    so nothing is lost between them."""

    __slots__ = ("child", "n")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.n: float = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # as the child would refuse it, here rather than in /metrics
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.n += amount

    def flush(self) -> None:
        if self.n:
            n, self.n = self.n, 0
            self.child.inc(n)


class HistogramTally:
    """A histogram child's observations as bucket counts and a sum, added to the child by flush()."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.bounds: list[float] = child._upper_bounds  # ends with +Inf, as the child's buckets
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.total += amount
        if amount == amount:  # NaN joins the sum only, as in the child's own observe()
            self.counts[bisect_left(self.bounds, amount)] += 1  # the first bucket with amount <= its bound

    def flush(self) -> None:
        if not any(self.counts) and not self.total:  # a NaN total alone is still flushed
            return
        counts, self.counts, total, self.total = self.counts, [0] * len(self.bounds), self.total, 0.0
        # prometheus-client has no call to add many observations at once: its buckets and sum take them
        # (a test compares the exposition with the child's own observe()).
        self.child._sum.inc(total)
        for bucket, n in zip(self.child._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


_children: dict[tuple[object, tuple[str, ...]], Any] = {}  # Any: the one labelled() returns for it
_tallies: list[Tally | HistogramTally] = []


@overload
def labelled(metric: Counter, *values: str) -> Tally: ...
@overload
def labelled(metric: Histogram, *values: str) -> HistogramTally: ...
@overload
def labelled(metric: Gauge, *values: str) -> Gauge: ...
def labelled(metric: Counter | Gauge | Histogram, *values: str) -> Tally | HistogramTally | Gauge:
    """The child `metric.labels(*values)` (the metric itself when it has no labels), remembered:
    prometheus-client validates and locks on every labels() call. Counters and histograms come as tallies,
    added to the metric by flush()."""
    key = (metric, values)
    child: Any = _children.get(key)
    if child is None:
        if not values and metric._labelnames:  # the metric itself cannot count: refused here, not in /metrics
            raise ValueError(f"{metric._name} needs label values {metric._labelnames}")
        labelled_child: Any = metric.labels(*values) if values else metric
        if isinstance(metric, Counter | Histogram):
            child = Tally(labelled_child) if isinstance(metric, Counter) else HistogramTally(labelled_child)
            _tallies.append(child)
        else:
            child = labelled_child
        _children[key] = child
    return child


def flush() -> None:
    """Add every tally to its metric: before metrics are read (/metrics, tests)."""
    for tally in _tallies:
        tally.flush()
