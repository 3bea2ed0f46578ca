"""Prometheus metrics (prometheus-client), served on METRICS_PORT when set."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("llm_worker_requests_total", "Terminal outcomes", ["outcome", "provider", "code"])
IN_FLIGHT = Gauge("llm_worker_in_flight", "Requests admitted and not finished")
PAUSED = Gauge("llm_worker_consumer_paused", "1 while the in-flight window is full and no records are taken")
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


_M = TypeVar("_M", Counter, Gauge, Histogram)
_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def labelled(metric: _M, *values: str) -> _M:
    """`metric.labels(*values)`, remembered: prometheus-client validates and locks on every labels() call,
    which was 7 % of the worker's CPU per request when called on the hot path."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child
