"""Spend over sliding windows in Redis, shared by replicas: cost alerts and organization budgets.

Each counter is a Redis hash of time buckets (window / 60 seconds each) holding nano-USD integers, so sums
are exact; the window slides one bucket at a time. One Lua script adds a call's cost to every counter it
belongs to (global, its organization's alert window, its organization's budget window), drops expired
buckets, sums, and decides threshold crossings atomically: an alert flag is SET NX when the sum reaches the
threshold (the one caller that sets it emits the LLMCostAlertV1) and deleted when the sum is below the
threshold again, which re-arms it for the next crossing.

Budgets are checked before the provider call against the spend so far plus an estimate of the call, and
the estimate is held in the budget's window in the same script, so concurrent calls (on any replica) see
each other's; the call's real cost replaces its hold when it ends (a failed call gives it back). The
estimate is a lower bound (output uncapped counts 0), so in-flight calls can still overshoot by what they
cost beyond it. With Redis unavailable spend is not counted
and budgets are not enforced (llm_worker_spend_errors_total counts it): cost caps are soft, answers are not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from contracts import ErrorCode, LLMCostAlertV1
from worker import metrics
from worker.cache import RedisGuard, RedisUnavailable
from worker.errors import RequestRejected
from worker.pricing import PriceTable
from worker.providers.base import ComparisonCall
from worker.settings import SpendSettings

log = logging.getLogger(__name__)

BUCKETS_PER_WINDOW = 60
NANO = 1_000_000_000

# KEYS: per counter i, its hash (2i-1) and its alert flag (2i).
# ARGV per counter: amount (nano-USD, may be negative: a budget hold replaced), bucket, oldest bucket kept,
# ttl_s, threshold (0 = none). Returns per counter {sum, crossed}.
_RECORD = """
local out = {}
for i = 1, #KEYS / 2 do
  local counter, flag = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 1 + (i - 1) * 5
  local amount, bucket, oldest = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  local ttl, threshold = ARGV[a + 3], tonumber(ARGV[a + 4])
  if amount ~= 0 then redis.call('HINCRBY', counter, bucket, amount) end
  local total = 0
  local fields = redis.call('HGETALL', counter)
  for j = 1, #fields, 2 do
    if tonumber(fields[j]) < oldest then
      redis.call('HDEL', counter, fields[j])
    else
      total = total + tonumber(fields[j + 1])
    end
  end
  redis.call('EXPIRE', counter, ttl)
  local crossed = 0
  if threshold > 0 then
    if total >= threshold then
      if redis.call('SET', flag, '1', 'NX', 'EX', ttl) then crossed = 1 end
    else
      redis.call('DEL', flag)
    end
  end
  out[i] = {total, crossed}
end
return out
"""

# KEYS[1]: a budget counter; ARGV: oldest bucket kept, bucket, hold (nano-USD), budget (nano-USD), ttl_s.
# The hold is added when the sum plus it stays within the budget. Returns {held (1/0), sum before}.
_HOLD = """
local oldest, amount = tonumber(ARGV[1]), tonumber(ARGV[3])
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for j = 1, #fields, 2 do
  if tonumber(fields[j]) >= oldest then total = total + tonumber(fields[j + 1]) end
end
if total + amount > tonumber(ARGV[4]) then return {0, total} end
if amount > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[2], amount)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
return {1, total}
"""


@dataclass(frozen=True, slots=True)
class _Counter:
    key: str
    scope: str  # "global" | "organization" | "budget"
    organization_id: str | None
    window_s: int
    threshold_usd: float | None


@dataclass(frozen=True, slots=True)
class BudgetHold:
    """An estimate held in an organization's budget window until the call's real cost replaces it."""

    organization_id: str
    nano: int
    bucket: int  # where it is held: the call's real cost replaces it there


def estimate_call_usd(prices: PriceTable, call: ComparisonCall) -> float | None:
    """A lower-bound estimate of a call before it is made: prompt characters / 4 as input tokens, plus
    max_tokens output when capped. None for a model without a price (its cost cannot be known)."""
    price = prices.prices.get(call.model)
    if price is None:
        return None
    chars = len(call.system_prompt) + len(call.user_prompt) + sum(len(b.content) for b in call.prompt_blocks)
    return (chars / 4 * price.input + (call.max_tokens or 0) * price.output) / 1_000_000


class SpendTracker:
    def __init__(
        self,
        redis: Redis,
        settings: SpendSettings,
        prefix: str,
        guard: RedisGuard,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.prefix = f"{prefix}:spend"
        self.guard = guard
        self.clock = clock
        self._record = redis.register_script(_RECORD)
        self._hold = redis.register_script(_HOLD)

    def has_budget(self, organization_id: str | None) -> bool:
        """Whether check_budget can refuse this organization's calls (so the estimate is worth making)."""
        return self.settings.org_budget_usd is not None and organization_id is not None

    def counts(self, organization_id: str | None) -> bool:
        """Whether record() would count this organization's calls anywhere (a threshold or budget reads)."""
        s = self.settings
        return s.cost_alert_threshold_usd is not None or (
            organization_id is not None
            and (s.org_cost_alert_threshold_usd is not None or s.org_budget_usd is not None)
        )

    async def check_budget(self, organization_id: str | None, estimate_usd: float) -> BudgetHold | None:
        """RequestRejected(COST_LIMIT_EXCEEDED) when this call would take the organization over budget;
        else the estimate, held in the budget's window: pass it to record() when the call ends."""
        budget = self.settings.org_budget_usd
        if budget is None or organization_id is None:
            return None
        counter = self._budget(organization_id)
        bucket, oldest = self._buckets(counter.window_s)
        hold = max(0, round(estimate_usd * NANO))
        args = [oldest, bucket, hold, round(budget * NANO), self._ttl_s(counter)]
        try:
            held, spent_nano = await self.guard.call(
                "budget", lambda: self._hold(keys=[counter.key], args=args)
            )
        except RedisUnavailable:
            metrics.labelled(metrics.SPEND_ERRORS, "budget").inc()
            return None
        if not held:
            metrics.BUDGET_REJECTED.inc()
            raise RequestRejected(
                ErrorCode.COST_LIMIT_EXCEEDED,
                "organization budget would be exceeded",
                organization_id=organization_id,
                budget_usd=budget,
                spent_usd=round(int(spent_nano) / NANO, 6),
                window_s=counter.window_s,
            )
        return BudgetHold(organization_id, hold, bucket) if hold else None

    async def record(
        self,
        organization_id: str | None,
        cost_usd: float,
        held: BudgetHold | None = None,
        alert: bool = True,
    ) -> list[LLMCostAlertV1]:
        """Add a real call's cost (in the budget's window, in place of its hold); the alerts this call's
        spend crossed (each crossing alerted once). `alert=False` (a cancelled request, which sends no
        events): the thresholds are not looked at, so the next call records the crossing and alerts."""
        amount = max(0, round(cost_usd * NANO))
        held_nano = held.nano if held is not None and held.organization_id == organization_id else 0
        if amount <= 0 and not held_nano:
            return []
        counters = self._counters(organization_id)
        if not counters:
            return []
        keys: list[str] = []
        args: list[int | str] = []
        for c in counters:
            bucket, oldest = self._buckets(c.window_s)
            threshold = round(c.threshold_usd * NANO) if c.threshold_usd and alert else 0
            keys += [c.key, f"{c.key}:alerted"]
            change = amount
            if c.scope == "budget" and held is not None and held_nano:
                change, bucket = amount - held_nano, held.bucket  # in place of the hold, in its bucket
            args += [change, bucket, oldest, self._ttl_s(c), threshold]
        try:
            totals = await self.guard.call("spend", lambda: self._record(keys=keys, args=args))
        except RedisUnavailable:
            metrics.labelled(metrics.SPEND_ERRORS, "record").inc()
            return []
        alerts = []
        for c, (total, crossed) in zip(counters, totals, strict=True):
            if crossed and c.scope != "budget" and c.threshold_usd is not None:
                metrics.labelled(metrics.COST_ALERTS, c.scope).inc()
                alerts.append(
                    LLMCostAlertV1(
                        scope="global" if c.scope == "global" else "organization",
                        organization_id=c.organization_id,
                        window_s=c.window_s,
                        spend_usd=int(total) / NANO,
                        threshold_usd=c.threshold_usd,
                    )
                )
        return alerts

    def _counters(self, organization_id: str | None) -> list[_Counter]:
        """The counters a call's cost goes into: only those a threshold or budget reads."""
        s, counters = self.settings, []
        if s.cost_alert_threshold_usd is not None:
            key = f"{self.prefix}:global"
            counters.append(_Counter(key, "global", None, s.cost_alert_window_s, s.cost_alert_threshold_usd))
        if organization_id is not None and s.org_cost_alert_threshold_usd is not None:
            key = f"{self.prefix}:org:{organization_id}"
            threshold = s.org_cost_alert_threshold_usd
            counters.append(_Counter(key, "organization", organization_id, s.cost_alert_window_s, threshold))
        if organization_id is not None and s.org_budget_usd is not None:
            counters.append(self._budget(organization_id))
        return counters

    def _budget(self, organization_id: str) -> _Counter:
        window_s = self.settings.org_budget_window_s
        return _Counter(f"{self.prefix}:budget:{organization_id}", "budget", organization_id, window_s, None)

    def _ttl_s(self, counter: _Counter) -> int:
        return counter.window_s + counter.window_s // BUCKETS_PER_WINDOW

    def _buckets(self, window_s: int) -> tuple[int, int]:
        """(current bucket, oldest bucket still inside the window)."""
        width_s = max(1, window_s // BUCKETS_PER_WINDOW)
        bucket = int(self.clock() // width_s)
        return bucket, bucket - window_s // width_s + 1
