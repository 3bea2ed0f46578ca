"""Prometheus metrics (prometheus-client), served on METRICS_PORT when set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("llm_worker_requests_total", "Terminal outcomes", ["outcome", "provider", "code"])
IN_FLIGHT = Gauge("llm_worker_in_flight", "Requests admitted and not finished")
PAUSED = Gauge("llm_worker_consumer_paused", "1 while fetching is paused for backpressure")
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
