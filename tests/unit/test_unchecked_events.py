"""Events serialised without building their model are byte-equal to the validated model's JSON."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from contracts import LLMComparisonRequestV1, LLMComparisonResultV1, LLMCostTrackingV1, TokenUsage
from worker import handle
from worker.emit import Outgoing, _Clock, make_event, make_unchecked_event
from worker.orchestrate import Attempt
from worker.pricing import Cost
from worker.providers.base import Answer
from worker.validate import Job

COMPLETED_AT = datetime(2026, 11, 23, 1, 2, 3, 456789, tzinfo=UTC)
USAGE = TokenUsage(prompt_tokens=1234, completion_tokens=56, total_tokens=1290, cached_tokens=1000)


def _data(event: Outgoing) -> bytes:
    _, _, rest = event.value.partition(b',"data":')
    assert rest.endswith(b',"metadata":{}}')
    return rest[: -len(b',"metadata":{}}')]


def _job(requested_at: datetime, **request: Any) -> Job:
    data = LLMComparisonRequestV1(user_prompt="Compare \u00e9ssays.", **request)
    return Job(data, "req-\u00e9-1", uuid.uuid4(), requested_at, "results")


JOBS = [
    _job(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)),
    _job(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))), user_id="u-1"),
    _job(datetime(2026, 6, 30, 23, 59, 59, 1, tzinfo=UTC), user_id="u", organization_id='org "q"'),
    _job(datetime(2026, 6, 30, 23, 59, 59, 120000)),  # an envelope timestamp without an offset
    # An offset with seconds: orjson would round it where pydantic drops the seconds.
    _job(datetime(2026, 3, 4, 5, 6, 7, 500000, tzinfo=timezone(timedelta(seconds=-35378)))),
]
ANSWERS = [
    Answer("Essay A", "A argues better.", 4, "gpt-4.1-mini", USAGE),  # an int confidence
    Answer("Essay B", 'B: "quoted", \u00fcnicode\nand a newline.', 1.05, "m", TokenUsage()),
    Answer("Essay A", "x" * 500, 5.0, "claude-haiku-4-5", TokenUsage(prompt_tokens=7, reasoning_tokens=3)),
]
COSTS: list[float] = [0, 0.0, 1.2e-05, 0.0123456789, 3.0, 1e-10, float("inf")]
METADATA: list[dict[str, Any]] = [
    {},
    {"essay_ids": [1, 2.5, None], "nested": {"\u00e9": True}, "cache": "miss", "attempts": 2},
    {"odd_floats": [float("nan"), float("inf"), -float("inf"), -0.0, 1e300]},
    {"big": 2**64, "small": -(2**63) - 1},  # past orjson's 64 bits: pydantic_core writes these
]


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("cost_usd", COSTS)
@pytest.mark.parametrize("metadata", METADATA)
def test_answered_result_is_byte_equal_to_the_validated_model(
    monkeypatch: pytest.MonkeyPatch, job: Job, answer: Answer, cost_usd: float, metadata: dict[str, Any]
) -> None:
    metadata = dict(metadata, resolved_model=answer.model)
    cid = str(job.correlation_id)
    completed_at = _Clock().iso_now(COMPLETED_AT.timestamp())  # as now_text() writes it
    fields = handle._answered_result(job, cid, answer, "openai", 17, cost_usd, metadata, completed_at)
    unchecked = make_unchecked_event("result", "t", job.request_id, LLMComparisonResultV1, fields, cid, "svc")
    model = LLMComparisonResultV1(
        request_id=job.request_id,
        correlation_id=job.correlation_id,
        winner=answer.winner,
        justification=answer.justification,
        confidence=answer.confidence,
        provider="openai",
        model=answer.model,
        response_time_ms=17,
        token_usage=answer.usage,
        cost_estimate=cost_usd,
        requested_at=job.requested_at,
        completed_at=COMPLETED_AT,
        request_metadata=metadata,
    )
    assert _data(unchecked) == model.model_dump_json().encode()
    assert list(fields) == list(LLMComparisonResultV1.model_fields)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize(
    "cost", [Cost(0, True), Cost(0.0, False), Cost(2.5e-06, True), Cost(7, True), Cost(float("inf"), True)]
)
@pytest.mark.parametrize(
    "started_at", [datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC), datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=UTC)]
)
@pytest.mark.parametrize("estimated", [False, True])
def test_cost_tracking_is_byte_equal_to_the_validated_model(
    job: Job, cost: Cost, started_at: datetime, estimated: bool
) -> None:
    attempt = Attempt("anthropic", "claude-haiku-4-5", started_at, 842, USAGE, cost, estimated=estimated)
    cid = str(job.correlation_id)
    fields = handle._cost_tracking(job, cid, attempt, USAGE, cost, "llm_provider_service")
    unchecked = make_unchecked_event(
        "cost", "t", None, LLMCostTrackingV1, fields, cid, "llm_provider_service"
    )
    model = LLMCostTrackingV1(
        correlation_id=job.correlation_id,
        request_id=job.request_id,
        provider=attempt.provider,
        model=attempt.model,
        cost_estimate_usd=cost.usd,
        token_usage=USAGE,
        user_id=job.request.user_id,
        organization_id=job.request.organization_id,
        service_name="llm_provider_service",
        request_timestamp=started_at,
        response_time_ms=842,
        usage_estimated=estimated,
    )
    assert _data(unchecked) == model.model_dump_json().encode()
    assert list(fields) == list(LLMCostTrackingV1.model_fields)


def test_unchecked_and_validated_envelopes_differ_only_in_event_id_and_timestamp() -> None:
    job, answer = JOBS[1], ANSWERS[0]
    model = LLMCostTrackingV1(
        correlation_id=job.correlation_id,
        request_id=job.request_id,
        provider="openai",
        model=answer.model,
        cost_estimate_usd=0.5,
        token_usage=USAGE,
        service_name='svc "q"',
        request_timestamp=job.requested_at,
        response_time_ms=3,
    )
    fields = model.model_dump()
    fields["token_usage"] = USAGE
    checked = json.loads(make_event("cost", "t", "k", model, job.correlation_id, 'svc "q"').value)
    unchecked = json.loads(
        make_unchecked_event(
            "cost", "t", "k", LLMCostTrackingV1, fields, str(job.correlation_id), 'svc "q"'
        ).value
    )
    for envelope in (checked, unchecked):
        del envelope["event_id"], envelope["event_timestamp"]
    assert checked == unchecked


def test_a_call_cut_off_by_the_deadline_gets_an_estimated_cost_event_and_no_reported_usage() -> None:
    """The cost event carries the estimate, marked; the failure result's token_usage stays what a provider
    reported (nothing), while its cost_estimate counts what the call may be billed."""
    from contracts import ErrorCode
    from worker.errors import RequestRejected
    from worker.orchestrate import CallOutcome
    from worker.providers.base import ComparisonCall
    from worker.settings import KafkaSettings

    job = JOBS[0]
    call = ComparisonCall(provider="openai", model="gpt-4.1", system_prompt="s", user_prompt="u")
    estimate = TokenUsage(prompt_tokens=100, total_tokens=100)
    cut = Attempt("openai", "gpt-4.1", datetime(2026, 3, 4, tzinfo=UTC), 50, estimate, Cost(2e-4, True), None)
    cut.error_code, cut.estimated = ErrorCode.EXPIRED, True
    error = RequestRejected(ErrorCode.EXPIRED, "deadline passed while waiting for the provider")
    handler = handle.Handler(None, None, None, KafkaSettings().topics, "svc")  # type: ignore[arg-type]
    events = handler._events(job, CallOutcome(call, error=error, attempts=[cut]), 50, "miss")
    by_kind = {e.kind: json.loads(e.value)["data"] for e in events}
    assert by_kind["cost"]["usage_estimated"] is True
    assert by_kind["cost"]["token_usage"]["prompt_tokens"] == 100
    assert by_kind["result"]["token_usage"]["total_tokens"] == 0
    assert by_kind["result"]["cost_estimate"] == 2e-4
