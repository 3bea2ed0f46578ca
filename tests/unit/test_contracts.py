"""The wire contracts: round trips, schema export, upstream strictness, pydantic-only imports."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from contracts import (
    ErrorCode,
    ErrorDetail,
    EventEnvelope,
    LLMCacheHitV1,
    LLMComparisonRequestV1,
    LLMComparisonResultV1,
    LLMCostAlertV1,
    LLMCostTrackingV1,
    LLMProviderFailureV1,
    TokenUsage,
    Topics,
)
from contracts.schema import schemas

CID = uuid.UUID("4f1c9b0e-8a2d-4c3e-9f5a-6b7c8d9e0f1a")
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _samples() -> list[BaseModel]:
    usage = TokenUsage(prompt_tokens=100, completion_tokens=50, total_tokens=150, cached_tokens=20)
    detail = ErrorDetail.from_code(ErrorCode.RATE_LIMIT, "slow down", CID, provider="openai", http_status=429)
    return [
        LLMComparisonRequestV1(
            request_id="r1",
            user_prompt="Essay A ... Essay B ...",
            prompt_blocks=[{"target": "system", "content": "rubric", "cacheable": True, "ttl": "1h"}],
            llm_config_overrides={"provider_override": "anthropic", "temperature_override": 0.2},
            metadata={"pair": [1, 2]},
            cache="bypass",
            deadline=NOW,
        ),
        LLMComparisonResultV1(
            request_id="r1",
            correlation_id=CID,
            winner="Essay A",
            justification="clearer",
            confidence=4.5,
            provider="mock",
            model="m",
            token_usage=usage,
            cost_estimate=0.001,
            requested_at=NOW,
            request_metadata={"cache": "miss"},
        ),
        LLMComparisonResultV1(
            request_id="r2",
            correlation_id=CID,
            error_detail=detail,
            provider="openai",
            model="gpt-4.1-mini",
            cost_estimate=0.0,
            requested_at=NOW,
        ),
        LLMCacheHitV1(
            request_id="r1",
            correlation_id=CID,
            cache_key="k",
            provider="mock",
            model="m",
            cost_saved_usd=0.1,
            cache_layer="redis",
        ),
        LLMProviderFailureV1(
            request_id="r2", correlation_id=CID, provider="openai", model="x", error_detail=detail
        ),
        LLMCostTrackingV1(
            correlation_id=CID,
            request_id="r1",
            provider="openai",
            model="m",
            cost_estimate_usd=0.01,
            token_usage=usage,
            service_name="llm_provider_service",
            request_timestamp=NOW,
            response_time_ms=12,
        ),
        LLMCostAlertV1(scope="global", window_s=3600, spend_usd=12.5, threshold_usd=10.0),
    ]


@pytest.mark.parametrize("data", _samples(), ids=lambda d: type(d).__name__)
def test_every_event_round_trips_through_json_in_its_envelope(data: BaseModel) -> None:
    envelope_type = EventEnvelope[type(data)]  # type: ignore[misc]
    env = envelope_type(correlation_id=CID, data=data)
    again = envelope_type.model_validate_json(env.model_dump_json())
    assert again == env
    assert again.event_type == type(data).__name__
    assert again.source_service == "llm_provider_service"
    assert again.schema_version == 1


def test_result_requires_exactly_one_of_winner_or_error() -> None:
    detail = ErrorDetail.from_code(ErrorCode.TIMEOUT, "slow", CID)
    common = dict(
        request_id="r", correlation_id=CID, provider="mock", model="m", cost_estimate=0.0, requested_at=NOW
    )
    with pytest.raises(ValidationError, match="exactly one"):
        LLMComparisonResultV1(
            **common, winner="Essay A", justification="j", confidence=3, error_detail=detail
        )
    with pytest.raises(ValidationError, match="exactly one"):
        LLMComparisonResultV1(**common)


def test_result_rejects_out_of_range_confidence_and_long_justification() -> None:
    common = dict(
        request_id="r",
        correlation_id=CID,
        provider="mock",
        model="m",
        cost_estimate=0.0,
        requested_at=NOW,
        winner="Essay B",
    )
    with pytest.raises(ValidationError):
        LLMComparisonResultV1(**common, justification="j", confidence=5.5)
    with pytest.raises(ValidationError):
        LLMComparisonResultV1(**common, justification="x" * 501, confidence=3)


def test_cost_fields_are_required_non_negative_numbers() -> None:
    with pytest.raises(ValidationError):
        LLMCostTrackingV1(
            correlation_id=CID,
            request_id="r",
            provider="p",
            model="m",
            cost_estimate_usd=-1,
            token_usage=TokenUsage(),
            service_name="s",
            request_timestamp=NOW,
            response_time_ms=1,
        )
    with pytest.raises(ValidationError, match="service_name"):
        LLMCostTrackingV1.model_validate(
            dict(
                correlation_id=CID,
                request_id="r",
                provider="p",
                model="m",
                cost_estimate_usd=0,
                token_usage={},
                request_timestamp=NOW,
                response_time_ms=1,
            )
        )


def test_error_codes_map_to_the_upstream_wire_values() -> None:
    assert {c.name: c.wire for c in ErrorCode} == {
        "VALIDATION_ERROR": "VALIDATION_ERROR",
        "CONFIGURATION_ERROR": "CONFIGURATION_ERROR",
        "AUTHENTICATION_ERROR": "AUTHENTICATION_ERROR",
        "RATE_LIMIT": "RATE_LIMIT",
        "TIMEOUT": "TIMEOUT",
        "CONNECTION_ERROR": "CONNECTION_ERROR",
        "EXTERNAL_SERVICE_ERROR": "EXTERNAL_SERVICE_ERROR",
        "PARSING_ERROR": "PARSING_ERROR",
        "PROVIDER_UNAVAILABLE": "CIRCUIT_BREAKER_OPEN",
        "CONTENT_TOO_LONG": "LLM_CONTENT_TOO_LONG",
        "CONTENT_POLICY": "LLM_INVALID_PROMPT",
        "COST_LIMIT_EXCEEDED": "LLM_COST_LIMIT_EXCEEDED",
        "INTERNAL_ERROR": "PROCESSING_ERROR",
        "EXPIRED": "TIMEOUT",
    }


def test_expired_is_sent_as_timeout_with_deadline_reason_and_not_retryable() -> None:
    detail = ErrorDetail.from_code(ErrorCode.EXPIRED, "late", CID)
    assert detail.error_code == "TIMEOUT"
    assert detail.details["reason"] == "deadline_expired"
    assert detail.details["retryable"] is False
    assert ErrorDetail.from_code(ErrorCode.TIMEOUT, "slow", CID).details["retryable"] is True


def test_unknown_wire_error_code_is_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown error_code"):
        ErrorDetail(error_code="EXPIRED", message="m", correlation_id=CID)


def test_topic_names_follow_the_prefix_convention() -> None:
    assert Topics().comparison_request == "huleedu.llm_provider.comparison_request.v1"
    assert Topics("acme").dlq == "acme.llm_provider.dlq.v1"
    assert len(set(Topics().all())) == 7


def test_request_rejects_naive_deadline_and_out_of_range_overrides() -> None:
    with pytest.raises(ValidationError):
        LLMComparisonRequestV1(user_prompt="p", deadline=datetime(2026, 1, 1))
    with pytest.raises(ValidationError):
        LLMComparisonRequestV1(user_prompt="p", llm_config_overrides={"temperature_override": 2.5})
    with pytest.raises(ValidationError):
        LLMComparisonRequestV1(user_prompt="p", llm_config_overrides={"max_tokens_override": 0})
    with pytest.raises(ValidationError):
        LLMComparisonRequestV1(user_prompt="")


def test_exported_json_schemas_are_up_to_date() -> None:
    folder = Path(__file__).resolve().parents[2] / "contracts" / "schemas"
    for name, text in schemas().items():
        assert (folder / name).read_text() == text, f"run `python -m contracts.schema` ({name} is stale)"
    assert json.loads(schemas()["LLMComparisonResultV1.json"])["properties"]["data"]


def test_contracts_import_with_pydantic_alone() -> None:
    code = (
        "import sys, contracts, contracts.schema\n"
        "bad = [m for m in ('faststream', 'httpx', 'redis', 'aiokafka', 'worker') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
