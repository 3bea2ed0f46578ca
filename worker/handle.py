"""One Kafka record -> its terminal events, acknowledged by Kafka. The consumer calls `handle` per record
and counts the offset finished when it returns."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any
from uuid import UUID

import pydantic_core
from aiokafka import ConsumerRecord

from contracts import (
    CachePolicy,
    ErrorCode,
    ErrorDetail,
    LLMCacheHitV1,
    LLMComparisonResultV1,
    LLMCostAlertV1,
    LLMCostTrackingV1,
    LLMProviderFailureV1,
    TokenUsage,
    Topics,
    utc_now,
)
from worker import metrics
from worker.cache import AnswerCache, CachedAnswer, Layer
from worker.emit import Emitter, Outgoing, make_dlq_record, make_event, make_unchecked_event, now_text
from worker.errors import RequestRejected
from worker.logs import correlation_id_var, request_id_var
from worker.orchestrate import Attempt, CallOutcome, Orchestrator
from worker.outcomes import OutcomeStore
from worker.pricing import Cost
from worker.providers.base import Answer, ComparisonCall
from worker.spend import SpendTracker, estimate_call_usd
from worker.validate import Invalid, Job, Unparseable, decode_request, header_text

log = logging.getLogger(__name__)

#: A request's reply, once everything it waited for is done: makes its events (see Handler.respond).
Reply = Callable[[], list[Outgoing]]


@dataclass(frozen=True, slots=True)
class Handler:
    orchestrator: Orchestrator
    outcomes: OutcomeStore
    emitter: Emitter
    topics: Topics
    service_name: str
    cache: AnswerCache | None = None
    spend: SpendTracker | None = None
    #: Poison records whose DLQ record landed while their terminal events did not yet (retried).
    _dead_lettered: set[tuple[str, int, int]] = field(default_factory=set)

    async def handle(self, record: ConsumerRecord) -> None:
        job: Job | None = None
        invalid: Invalid | None = None
        try:
            job = decode_request(
                record.value, record.headers, self.topics.comparison_result, self.topics.not_callbacks
            )
        except Unparseable as exc:  # log context: the Kafka key is the request id
            request_id_var.set(record.key.decode(errors="replace") if record.key else None)
            cid = exc.correlation_id
            correlation_id_var.set(str(cid) if cid else header_text(record.headers, "correlation_id"))
            # Not stored: its DLQ record holds the raw bytes (up to 900 KB) and is the same on every
            # redelivery anyway; the failure event alone gets a new id.
            await self._dead_letter(record, exc)
            return
        except Invalid as exc:
            request_id_var.set(exc.request_id)
            correlation_id_var.set(str(exc.correlation_id))
            key, invalid = _record_key(record), exc
        else:
            correlation_id_var.set(job.correlation_text)
            request_id_var.set(job.request_id)
            key = job.request_id

        stored = await self.outcomes.get(key)
        if stored is not None:
            metrics.REDELIVERED.inc()
            log.info("redelivered request answered from the outcome store")
            await self.emitter.publish(stored.to_replay())
            if not stored.emitted:
                await self.outcomes.mark_emitted(key)
            return

        if job is not None:
            messages = await self.process(job)
        else:
            assert invalid is not None
            messages = self._invalid_events(invalid)
        # Stored before published (one wait for both): a redelivery then never calls the provider again,
        # and sends these same events (with their ids), not new ones.
        await self.emitter.publish(messages, after=self.outcomes.put_soon(key, messages))
        self.outcomes.mark_emitted_soon(key)

    async def dead_letter_poison(self, record: ConsumerRecord, error: BaseException) -> None:
        """After the poison attempts are spent: the DLQ record, then the request's terminal events when it
        is readable: the stored ones if an outcome was recorded (they may be out already: never a second,
        contradicting result), else INTERNAL_ERROR (PROCESSING_ERROR on the wire), stored first like any
        outcome; VALIDATION_ERROR for an invalid request."""
        where = (record.topic, record.partition, record.offset)
        if where not in self._dead_lettered:  # the consumer retries this whole call until it returns
            metrics.labelled(metrics.DLQ, "poison").inc()
            await self.emitter.publish(
                [self._dlq(record, f"processing failed: {type(error).__name__}: {error}")]
            )
            self._dead_lettered.add(where)
        callback: str | None = None
        events: list[Outgoing] = []
        stored_before: asyncio.Future[None] | None = None
        key: str | None = None  # where its outcome is stored, as handle() keys it
        invalid: Invalid | None = None
        try:
            job = decode_request(
                record.value, record.headers, self.topics.comparison_result, self.topics.not_callbacks
            )
        except Unparseable:
            job = None
        except Invalid as exc:
            job, invalid, callback, key = None, exc, exc.callback_topic, _record_key(record)
        if job is not None:
            callback, key = job.callback_topic, job.request_id
        if key is not None:
            try:
                stored = await self.outcomes.get(key)
            except Exception as exc:  # a stored record this code cannot read (what made it poison, maybe)
                log.error("stored outcome unreadable; answering anew", extra={"error": repr(exc)})
                stored = None
            if stored is not None:
                events = stored.to_replay()
            else:
                if invalid is not None:
                    events = self._invalid_events(invalid)
                else:
                    assert job is not None
                    call = self.orchestrator.resolve(job.request)
                    err = RequestRejected(ErrorCode.INTERNAL_ERROR, "request could not be processed")
                    events = self._events(job, CallOutcome(call, error=err), 0, cache="miss")
                # Stored before published, as every request's events are: a retry of this call (some of
                # them may have landed) and a redelivery send these same events, never a second result.
                stored_before = self.outcomes.put_soon(key, events)
        if events:
            complete = await self._publish_terminal(events, callback, stored_before)
            if key is not None and complete:  # else a redelivery sends them all (the result again, same id)
                self.outcomes.mark_emitted_soon(key)
        self._dead_lettered.discard(where)

    async def _publish_terminal(
        self, events: list[Outgoing], callback: str | None, after: asyncio.Future[None] | None = None
    ) -> bool:
        """Publish a poison request's events (the first try once `after`, their store, is done). What
        failed may be one of them: its callback topic (missing, refused) or another event's topic. Then the
        result alone goes out, on the default result topic when the callback topic is not it, so that the
        partition is never held by what cannot be sent. True when all of them went out."""
        default = self.topics.comparison_result
        results = [m for m in events if m.kind == "result"]
        redirected = [Outgoing(m.kind, default, m.key, m.value, m.correlation_id) for m in results]
        tries = [events, results, redirected] if callback not in (None, default) else [events, results]
        for i, messages in enumerate(tries):
            try:
                await self.emitter.publish(messages, after=after if i == 0 else None)
                return i == 0
            except Exception as exc:
                if i == len(tries) - 1 or not tries[i + 1]:
                    raise  # retried by the consumer until Kafka takes it
                log.warning(
                    "publish of a poison request's events failed; trying its result alone",
                    extra={"callback_topic": callback, "error": repr(exc)},
                )
        return False  # not reached: the last try returns or raises

    async def process(self, job: Job) -> list[Outgoing]:
        """The request's events: its reply made at once."""
        return (await self.respond(job))()

    async def respond(self, job: Job) -> Reply:
        """Everything a request waits for (the cache, the provider), then its reply: what makes its events.
        The pipeline makes the events of every reply of a loop turn together (worker/pipeline.py); the
        elapsed time is read when they are made."""
        t0 = time.perf_counter()
        request = job.request
        budgeted = self.spend is not None and self.spend.has_budget(request.organization_id)
        call = self.orchestrator.resolve(request, priced_only=budgeted)
        deadline_s = _deadline_monotonic(job)
        if deadline_s is not None and deadline_s <= time.monotonic():
            outcome = CallOutcome(
                call, error=RequestRejected(ErrorCode.EXPIRED, "deadline passed before pick-up")
            )
            return partial(self._reply, job, outcome, t0, "miss", ())
        if self.cache is None:
            label = "bypass" if request.cache.value == "bypass" else "miss"
            outcome, alerts = await self._call(job, call, deadline_s, budgeted, t0, label)
            return partial(self._reply, job, outcome, t0, label, alerts)
        return await self._through_cache(job, call, deadline_s, t0, budgeted)

    def _reply(
        self, job: Job, outcome: CallOutcome, t0: float, label: str, alerts: list[Outgoing] | tuple[()]
    ) -> list[Outgoing]:
        events = self._events(job, outcome, _ms_since(t0), label)
        return events + alerts if alerts else events

    async def _through_cache(
        self, job: Job, call: ComparisonCall, deadline_s: float | None, t0: float, budgeted: bool
    ) -> Reply:
        """Policy use: a hit answers; else single-flight around the call (storing its answer). Refresh:
        single-flight without the read. Bypass (or caching disabled): neither read, write nor join."""
        assert self.cache is not None
        requested = job.request.cache
        policy = self.cache.policy(requested)
        if policy is CachePolicy.BYPASS:
            (_BYPASS_REQUESTED if requested is CachePolicy.BYPASS else _BYPASS_DISABLED).inc()
            outcome, alerts = await self._call(job, call, deadline_s, budgeted, t0, "bypass")
            return partial(self._reply, job, outcome, t0, "bypass", alerts)
        key = self.cache.key_for(call)
        label = policy.value if policy is CachePolicy.REFRESH else "miss"
        try:
            flight = await self.cache.serve(
                key,
                lambda: self._call(job, call, deadline_s, budgeted, t0, label),
                partial(_cacheable, job.request_id),
                deadline_s,
                read=policy is CachePolicy.USE,
            )
        except TimeoutError:
            error = RequestRejected(
                ErrorCode.EXPIRED, "deadline passed while waiting for an identical request"
            )
            return partial(self._reply, job, CallOutcome(call, error=error), t0, "miss", ())
        shared = flight.shared
        if shared is not None and flight.scope is None and shared.request_id == job.request_id:
            # This very request made the call, then crashed before its events were out: replay them.
            outcome = CallOutcome(call, shared.answer, attempts=_attempts(shared))
            return partial(self._reply, job, outcome, t0, "miss", ())
        if shared is not None and flight.layer is not None:
            return partial(
                self._hit_events, job, call, key, shared, flight.layer, _ms_since(t0), flight.scope
            )
        assert flight.led is not None
        outcome, alerts = flight.led
        return partial(self._reply, job, outcome, t0, label, alerts)

    async def _call(
        self,
        job: Job,
        call: ComparisonCall,
        deadline_s: float | None,
        budgeted: bool,
        t0: float,
        label: str,
    ) -> tuple[CallOutcome, list[Outgoing]]:
        """Budget check (`budgeted`: the organization has one), the provider call, spend accounting: the
        outcome and any cost alerts it raised. `t0` and `label`: the request's start and cache label, for
        the events stored when it is cancelled after the provider answered."""
        request = job.request
        held = None
        if budgeted:
            assert self.spend is not None
            estimate = estimate_call_usd(self.orchestrator.prices, call)
            if estimate is None:  # its cost would count 0: the budget would not hold for it
                error = RequestRejected(
                    ErrorCode.CONFIGURATION_ERROR,
                    f"model {call.model!r} has no price, so the organization's budget cannot be enforced",
                )
                return CallOutcome(call, error=error), []
            try:
                held = await self.spend.check_budget(request.organization_id, estimate)
            except RequestRejected as exc:
                return CallOutcome(call, error=exc), []
        outcome = CallOutcome(call)
        try:
            await self.orchestrator.run(
                call, deadline_s, allow_fallback=request.allow_fallback, priced_only=budgeted, outcome=outcome
            )
        except BaseException:
            # Cancelled (revocation, shutdown): the hold must not stay for the window, and a call already
            # sent counts at its estimate (the provider had the prompt), as a call cut by a deadline does.
            if self.spend is not None and (held is not None or self.spend.counts(request.organization_id)):
                sent_usd = sum(a.cost.usd for a in outcome.attempts if a.cost)
                await self.spend.record(request.organization_id, sent_usd, held, alert=False)
            raise
        if self.spend is None or not self.spend.counts(request.organization_id):
            return outcome, []
        cost_usd = sum(a.cost.usd for a in outcome.attempts if a.cost)
        recording = asyncio.ensure_future(self.spend.record(request.organization_id, cost_usd, held))
        try:
            alerts = await asyncio.shield(recording)
        except asyncio.CancelledError:
            # Cancelled (revocation, shutdown) once the provider answered: its events are stored before the
            # task ends cancelled, so whoever reads the partition next replays them instead of calling again
            # (and counting the spend twice). The recording under way is waited for (its alerts go with
            # them); the cancel is not taken back, so drain and revocation stay bounded.
            try:
                alerts = await asyncio.shield(recording)
                events = self._reply(job, outcome, t0, label, self._alert_events(job, alerts))
                self.outcomes.put_soon(job.request_id, events)
            except Exception:  # a bug: logged, and the task still ends cancelled
                log.exception("events of a cancelled request could not be stored")
            raise
        return outcome, self._alert_events(job, alerts)

    def _alert_events(self, job: Job, alerts: list[LLMCostAlertV1]) -> list[Outgoing]:
        src, topic = self.service_name, self.topics.cost_alert
        return [
            make_event("cost_alert", topic, a.organization_id or "global", a, job.correlation_id, src)
            for a in alerts
        ]

    def _hit_events(
        self,
        job: Job,
        call: ComparisonCall,
        key: str,
        cached: CachedAnswer,
        layer: Layer,
        elapsed_ms: int,
        scope: str | None = None,
    ) -> list[Outgoing]:
        """A cached (or shared in-flight) answer: the result at cost 0 and an LLMCacheHitV1 with the cost
        saved; no cost-tracking event, since no call was made for this request."""
        request, answer = job.request, cached.answer
        metadata = dict(request.metadata)
        metadata.update(
            prompt_sha256=hashlib.sha256(request.user_prompt.encode()).hexdigest(),
            resolved_provider=call.provider,
            resolved_model=answer.model,
            cache="hit",
            cache_layer=layer,
            attempts=0,
        )
        if scope is not None:
            metadata.update(single_flight=True, single_flight_scope=scope)
        result = LLMComparisonResultV1(
            request_id=job.request_id,
            correlation_id=job.correlation_id,
            winner=answer.winner,
            justification=answer.justification,
            confidence=answer.confidence,
            provider=call.provider,
            model=answer.model,
            response_time_ms=elapsed_ms,
            cost_estimate=0.0,
            requested_at=job.requested_at,
            request_metadata=metadata,
        )
        hit = LLMCacheHitV1(
            request_id=job.request_id,
            correlation_id=job.correlation_id,
            cache_key=key,
            provider=call.provider,
            model=answer.model,
            cost_saved_usd=cached.cost_usd,
            tokens_saved=answer.usage.total_tokens,
            cache_layer=layer,
            user_id=request.user_id,
            organization_id=request.organization_id,
        )
        metrics.labelled(metrics.REQUESTS, "success", call.provider, "").inc()
        src, cid = self.service_name, job.correlation_id
        return [
            make_event("result", job.callback_topic, job.request_id, result, cid, src),
            make_event("cache_hit", self.topics.cache_hit, job.request_id, hit, cid, src),
        ]

    def _events(self, job: Job, outcome: CallOutcome, elapsed_ms: int, cache: str) -> list[Outgoing]:
        call, answer, error, attempts = outcome.call, outcome.answer, outcome.error, outcome.attempts
        request = job.request
        metadata = {
            **request.metadata,
            "prompt_sha256": hashlib.sha256(request.user_prompt.encode()).hexdigest(),
            "resolved_provider": call.provider,
            "resolved_model": answer.model if answer else call.model,
            "cache": cache,
            "attempts": len(attempts),
        }
        if outcome.answered_by is not None and outcome.answered_by.provider != call.provider:
            metadata.update(
                answered_by_provider=outcome.answered_by.provider,
                answered_by_model=answer.model if answer else outcome.answered_by.model,
                attempted_providers=list(dict.fromkeys(a.provider for a in attempts)),
            )
        cost_usd, price_known = 0.0, True
        for a in attempts:
            if a.cost:
                cost_usd += a.cost.usd
                price_known = price_known and a.cost.price_known
        if not price_known:
            metadata["price_known"] = False
        detail = None
        if error is not None:
            details = {k: v for k, v in error.details.items() if k not in _INTERNAL_DETAILS}
            details.setdefault("provider", call.provider)
            detail = ErrorDetail.from_code(error.code, error.message, job.correlation_id, **details)
        src, cid, cid_text, now = self.service_name, job.correlation_id, job.correlation_text, now_text()
        if answer is not None and detail is None:
            # Answers are validated where they are made (parse_answer, the mock, the cache's decode), so
            # the result is serialised without validating it again.
            by = outcome.answered_by  # the result names who answered: a fallback provider, when one did
            fields = _answered_result(
                job,
                cid_text,
                answer,
                by.provider if by else call.provider,
                elapsed_ms,
                cost_usd,
                metadata,
                now,
            )
            result = make_unchecked_event(
                "result",
                job.callback_topic,
                job.request_id,
                LLMComparisonResultV1,
                fields,
                cid_text,
                src,
                now,
            )
        else:
            model = LLMComparisonResultV1(
                request_id=job.request_id,
                correlation_id=cid,
                winner=answer.winner if answer else None,
                justification=answer.justification if answer else None,
                confidence=answer.confidence if answer else None,
                error_detail=detail,
                provider=call.provider,
                model=metadata["resolved_model"],
                response_time_ms=elapsed_ms,
                token_usage=answer.usage if answer else _last_usage(outcome),
                cost_estimate=cost_usd,
                requested_at=job.requested_at,
                request_metadata=metadata,
            )
            result = make_event("result", job.callback_topic, job.request_id, model, cid, src)
        messages = [result]
        cost_key = request.organization_id or request.user_id
        for attempt in attempts:
            if attempt.usage is not None and attempt.cost is not None:
                fields = _cost_tracking(job, cid_text, attempt, attempt.usage, attempt.cost, src)
                messages.append(
                    make_unchecked_event(
                        "cost",
                        self.topics.cost_tracking,
                        cost_key,
                        LLMCostTrackingV1,
                        fields,
                        cid_text,
                        src,
                        now,
                    )
                )
        if detail is not None:
            failure = LLMProviderFailureV1(
                request_id=job.request_id,
                correlation_id=job.correlation_id,
                provider=call.provider,
                model=call.model,
                error_detail=detail,
                attempts=len(attempts),
            )
            messages.append(make_event("failure", self.topics.failure, job.request_id, failure, cid, src))
        metrics.labelled(
            metrics.REQUESTS,
            "success" if answer else "failure",
            call.provider,
            error.code.value if error else "",
        ).inc()
        return messages

    def _invalid_events(self, exc: Invalid) -> list[Outgoing]:
        metrics.labelled(metrics.REQUESTS, "failure", "", ErrorCode.VALIDATION_ERROR.value).inc()
        detail = ErrorDetail.from_code(
            ErrorCode.VALIDATION_ERROR,
            exc.reason,
            exc.correlation_id,
            fields=exc.fields,
            operation="validate",
        )
        # The upstream result model accepts only real provider names: the one the request named, else the
        # provider it would have been routed to by default.
        provider, model = self._fallback_names(exc.provider)
        result = LLMComparisonResultV1(
            request_id=exc.request_id,
            correlation_id=exc.correlation_id,
            error_detail=detail,
            provider=provider,
            model=model,
            cost_estimate=0.0,
            requested_at=exc.requested_at or utc_now(),
        )
        failure = LLMProviderFailureV1(
            request_id=exc.request_id,
            correlation_id=exc.correlation_id,
            provider=provider,
            model=model,
            error_detail=detail,
            attempts=0,
        )
        src = self.service_name
        return [
            make_event("result", exc.callback_topic, exc.request_id, result, exc.correlation_id, src),
            make_event("failure", self.topics.failure, exc.request_id, failure, exc.correlation_id, src),
        ]

    def _fallback_names(self, named: str | None) -> tuple[str, str]:
        """Provider and model to name on a failure for a request that never reached routing."""
        provider = named or self.orchestrator.default_provider
        known = self.orchestrator.providers.get(provider)
        return provider, known.default_model if known is not None else ""

    async def _dead_letter(self, record: ConsumerRecord, exc: Unparseable) -> None:
        metrics.labelled(metrics.DLQ, "unparseable").inc()
        log.warning("unparseable message sent to DLQ", extra={"reason": exc.reason, "offset": record.offset})
        messages = [self._dlq(record, exc.reason, exc.correlation_id)]
        if exc.correlation_id is not None:
            detail = ErrorDetail.from_code(
                ErrorCode.VALIDATION_ERROR,
                f"unparseable request: {exc.reason}",
                exc.correlation_id,
                operation="decode",
            )
            provider, model = self._fallback_names(None)
            failure = LLMProviderFailureV1(
                request_id=exc.request_id,
                correlation_id=exc.correlation_id,
                provider=provider,
                model=model,
                error_detail=detail,
                attempts=0,
            )
            messages.append(
                make_event(
                    "failure",
                    self.topics.failure,
                    exc.request_id or None,
                    failure,
                    exc.correlation_id,
                    self.service_name,
                )
            )
        await self.emitter.publish(messages)

    def _dlq(self, record: ConsumerRecord, error: str, correlation_id: UUID | None = None) -> Outgoing:
        source: dict[str, Any] = {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
        }
        headers = list(record.headers or ())
        return make_dlq_record(self.topics.dlq, record.value, error, headers, source, correlation_id)


_BYPASS_REQUESTED = metrics.labelled(metrics.CACHE_BYPASS, "request")
_BYPASS_DISABLED = metrics.labelled(metrics.CACHE_BYPASS, "disabled")

#: Error details for the worker itself, not the wire.
_INTERNAL_DETAILS = frozenset({"usage", "cache_write_tokens", "cache_write_1h_tokens", "unanswered"})


def _record_key(record: ConsumerRecord) -> str:
    """The outcome-store key of an invalid request: the record itself (where it is and what it holds), not
    its request id, so that a redelivery sends the same events again while a corrected request sent under
    the same id is validated afresh."""
    digest = hashlib.sha256(record.value or b"").hexdigest()
    return f"record:{record.topic}:{record.partition}:{record.offset}:{digest}"


def _deadline_monotonic(job: Job) -> float | None:
    deadline = job.request.deadline
    if deadline is None:
        return None
    return time.monotonic() + (deadline - utc_now()).total_seconds()


def _ms_since(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1000)


def _cacheable(request_id: str, called: tuple[CallOutcome, list[Outgoing]]) -> CachedAnswer | None:
    """Only an answer from the provider and model asked (not a fallback) is stored and shared."""
    outcome = called[0]
    by, call = outcome.answered_by, outcome.call
    if outcome.answer is None or (by is not None and (by.provider, by.model) != (call.provider, call.model)):
        return None
    # What the answer cost, and the calls that reported their usage: not a hedge's cut-off loser, whose
    # estimate is no saving for a hit (and an entry in the seven-field format every version reads).
    billed = [a for a in outcome.attempts if not a.estimated]
    cost_usd = sum(a.cost.usd for a in billed if a.cost)
    attempts = tuple(
        [
            a.provider,
            a.model,
            a.started_at.isoformat(),
            a.duration_ms,
            a.usage.model_dump() if a.usage else None,
            [a.cost.usd, a.cost.price_known] if a.cost else None,
            a.error_code.value if a.error_code else None,
        ]
        for a in billed
    )
    return CachedAnswer(outcome.answer, cost_usd, request_id, attempts)


def _attempts(cached: CachedAnswer) -> list[Attempt]:
    out = []
    for provider, model, started_at, duration_ms, usage, cost, code in cached.attempts:
        out.append(
            Attempt(
                provider,
                model,
                datetime.fromisoformat(started_at),
                duration_ms,
                TokenUsage(**usage) if usage else None,
                Cost(*cost) if cost else None,
                ErrorCode(code) if code else None,
            )
        )
    return out


def _answered_result(
    job: Job,
    cid_text: str,
    answer: Answer,
    provider: str,
    elapsed_ms: int,
    cost_usd: float,
    metadata: dict[str, Any],
    completed_at: str,
) -> dict[str, Any]:
    """LLMComparisonResultV1 of an answer, as make_unchecked_event takes it (every field, in order);
    `completed_at` as now_text() writes it."""
    return {
        "request_id": job.request_id,
        "correlation_id": cid_text,
        "winner": answer.winner,
        "justification": answer.justification,
        "confidence": float(answer.confidence),
        "error_detail": None,
        "provider": provider,
        "model": metadata["resolved_model"],
        "response_time_ms": elapsed_ms,
        "token_usage": answer.usage.__dict__,  # its fields in order, as emit.dumps writes a model
        "cost_estimate": float(cost_usd),
        "requested_at": _dumpable(job.requested_at),
        "completed_at": completed_at,
        "trace_id": None,
        "request_metadata": metadata,
    }


def _cost_tracking(
    job: Job, cid_text: str, attempt: Attempt, usage: TokenUsage, cost: Cost, service: str
) -> dict[str, Any]:
    """LLMCostTrackingV1 of one billed call, as make_unchecked_event takes it (every field, in order)."""
    return {
        "correlation_id": cid_text,
        "request_id": job.request_id,
        "provider": attempt.provider,
        "model": attempt.model,
        "request_type": "comparison",
        "cost_estimate_usd": float(cost.usd),
        "token_usage": usage.__dict__,
        "user_id": job.request.user_id,
        "organization_id": job.request.organization_id,
        "service_name": service,
        "request_timestamp": started if (started := attempt.started_at).tzinfo is UTC else _dumpable(started),
        "response_time_ms": attempt.duration_ms,
        "usage_estimated": attempt.estimated,
    }


def _dumpable(at: datetime) -> datetime | str:
    """A datetime as emit.dumps may take it: itself, or pydantic's text of it when its UTC offset has
    seconds (orjson would round them)."""
    tz = at.tzinfo
    if tz is None or tz is UTC:  # the clock's own (utc_now), naive
        return at
    offset = tz.utcoffset(at)
    if offset is None or not (offset.seconds % 60 or offset.microseconds):
        return at
    return pydantic_core.to_json(at)[1:-1].decode()


def _last_usage(outcome: CallOutcome) -> TokenUsage:
    """The last usage a provider reported (an estimate of a cut-off call is not one)."""
    return next(
        (a.usage for a in reversed(outcome.attempts) if a.usage is not None and not a.estimated), TokenUsage()
    )
