"""SpendTracker.counts, which lets the handler skip record(), says yes exactly when record() has counters."""

from __future__ import annotations

import itertools

from redis.asyncio import Redis

from worker.cache import RedisGuard
from worker.settings import SpendSettings
from worker.spend import SpendTracker


def test_counts_is_true_exactly_when_a_call_has_counters() -> None:
    redis = Redis()  # never connected: scripts are only registered
    for global_t, org_t, budget, org in itertools.product((None, 5.0), (None, 2.0), (None, 9.0), (None, "o")):
        settings = SpendSettings(
            cost_alert_threshold_usd=global_t, org_cost_alert_threshold_usd=org_t, org_budget_usd=budget
        )
        tracker = SpendTracker(redis, settings, "p", RedisGuard(1.0))
        assert tracker.counts(org) == bool(tracker._counters(org)), (global_t, org_t, budget, org)
