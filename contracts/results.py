"""Events the service emits: the terminal result, cache hits, failures, cost tracking and alerts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from contracts.envelope import utc_now
from contracts.errors import WIRE_ERROR_CODES, ErrorCode

Winner = Literal["Essay A", "Essay B"]


class TokenUsage(BaseModel):
    """Tokens of one provider call."""

    prompt_tokens: int = Field(default=0, ge=0, description="Input tokens, cached ones included.")
    completion_tokens: int = Field(default=0, ge=0, description="Output tokens, reasoning included.")
    total_tokens: int = Field(default=0, ge=0, description="prompt + completion.")
    cached_tokens: int = Field(default=0, ge=0, description="Input tokens served from the prompt cache.")
    reasoning_tokens: int = Field(default=0, ge=0, description="Output tokens spent on reasoning.")


class ErrorDetail(BaseModel):
    """Why a request failed."""

    error_code: str = Field(description="Wire error code (see contracts.errors).")
    message: str = Field(description="Human-readable reason; never prompt text.")
    correlation_id: UUID = Field(description="Correlation id of the request.")
    timestamp: datetime = Field(default_factory=utc_now, description="When it failed (UTC).")
    service: str = Field(default="llm_provider_service", description="Service that failed it.")
    operation: str = Field(default="comparison", description="What was being done.")
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="retryable, provider, http_status, retry_after_s, reason, fields, ...",
    )

    @field_validator("error_code")
    @classmethod
    def _known_code(cls, value: str) -> str:
        if value not in WIRE_ERROR_CODES:
            raise ValueError(f"unknown error_code {value!r}")
        return value

    @classmethod
    def from_code(
        cls,
        code: ErrorCode,
        message: str,
        correlation_id: UUID,
        operation: str = "comparison",
        **details: Any,
    ) -> ErrorDetail:
        """Build the wire detail for one of our codes: wire value, retryable flag, expiry reason."""
        details.setdefault("retryable", code.retryable)
        if code is ErrorCode.EXPIRED:
            details.setdefault("reason", "deadline_expired")
        details.setdefault("code", code.value)
        return cls(
            error_code=code.wire,
            message=message,
            correlation_id=correlation_id,
            operation=operation,
            details=details,
        )


class LLMComparisonResultV1(BaseModel):
    """The one terminal event per request, on its callback topic: a winner or an error, never both."""

    model_config = ConfigDict(extra="ignore")

    request_id: str = Field(description="The request's idempotency key.")
    correlation_id: UUID = Field(description="Correlation id of the request.")
    winner: Winner | None = Field(default=None, description="On success: the better essay.")
    justification: str | None = Field(default=None, max_length=500, description="On success: why.")
    confidence: float | None = Field(default=None, ge=1.0, le=5.0, description="On success: 1.0-5.0.")
    error_detail: ErrorDetail | None = Field(default=None, description="On failure: what went wrong.")
    provider: str = Field(description="Provider that answered (or was asked).")
    model: str = Field(description="Model that answered (or was asked).")
    response_time_ms: int = Field(default=0, ge=0, description="Time from pick-up to outcome.")
    token_usage: TokenUsage = Field(default_factory=TokenUsage, description="Tokens of the answering call.")
    cost_estimate: float = Field(ge=0.0, description="USD spent on this request (0 for a cache hit).")
    requested_at: datetime = Field(description="Request event time (UTC).")
    completed_at: datetime = Field(default_factory=utc_now, description="When the outcome was made (UTC).")
    trace_id: str | None = Field(default=None, description="Trace id, when tracing is on.")
    request_metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Caller metadata plus prompt_sha256, resolved_provider, resolved_model, cache.",
    )

    @model_validator(mode="after")
    def _success_xor_error(self) -> LLMComparisonResultV1:
        has_answer = self.winner is not None
        if has_answer == (self.error_detail is not None):
            raise ValueError("exactly one of winner (success) or error_detail (failure) must be set")
        if has_answer and (self.justification is None or self.confidence is None):
            raise ValueError("a success needs winner, justification and confidence")
        return self

    @property
    def is_success(self) -> bool:
        return self.error_detail is None


class LLMCacheHitV1(BaseModel):
    """The cache answered a request."""

    request_id: str = Field(description="The request's idempotency key.")
    correlation_id: UUID = Field(description="Correlation id of the request.")
    cache_key: str = Field(description="Cache key (a hash; no prompt text).")
    provider: str = Field(description="Provider of the cached answer.")
    model: str = Field(description="Model of the cached answer.")
    cost_saved_usd: float = Field(ge=0.0, description="What the original call cost.")
    tokens_saved: int = Field(default=0, ge=0, description="Tokens of the original call.")
    cache_layer: Literal["redis", "local", "single_flight"] = Field(description="Where the answer came from.")
    user_id: str | None = Field(default=None, description="Who asked.")
    organization_id: str | None = Field(default=None, description="Organization of the request.")


class LLMProviderFailureV1(BaseModel):
    """A request failed; for monitoring."""

    request_id: str = Field(description="The request's idempotency key.")
    correlation_id: UUID = Field(description="Correlation id of the request.")
    provider: str = Field(description="Provider that failed (or was asked).")
    model: str = Field(description="Model asked.")
    error_detail: ErrorDetail = Field(description="What went wrong.")
    attempts: int = Field(default=1, ge=0, description="Provider calls made.")
    failed_at: datetime = Field(default_factory=utc_now, description="When (UTC).")


class LLMCostTrackingV1(BaseModel):
    """One real provider call's cost, for the Result Aggregator."""

    correlation_id: UUID = Field(description="Correlation id of the request.")
    request_id: str = Field(description="The request's idempotency key.")
    provider: str = Field(description="Provider called.")
    model: str = Field(description="Model called.")
    request_type: Literal["comparison"] = Field(default="comparison", description="Kind of call.")
    cost_estimate_usd: float = Field(ge=0.0, description="USD for this call.")
    token_usage: TokenUsage = Field(description="Tokens of this call.")
    user_id: str | None = Field(default=None, description="Who asked.")
    organization_id: str | None = Field(default=None, description="Organization billed.")
    service_name: str = Field(description="Service that made the call.")
    request_timestamp: datetime = Field(description="When the call was made (UTC).")
    response_time_ms: int = Field(ge=0, description="Duration of the call.")
    usage_estimated: bool = Field(
        default=False,
        description=(
            "Tokens and cost are estimated from the prompt (input only): the call was cut off (by the"
            " request's deadline, as the slower of a hedged pair, or by a read timeout once sent) before the"
            " provider reported its usage, and the provider may still bill it."
        ),
    )


class LLMCostAlertV1(BaseModel):
    """Spend over a sliding window crossed a threshold."""

    scope: Literal["organization", "global"] = Field(description="Whose spend.")
    organization_id: str | None = Field(default=None, description="The organization, for that scope.")
    window_s: int = Field(gt=0, description="Sliding window length.")
    spend_usd: float = Field(ge=0.0, description="Spend in the window at the crossing.")
    threshold_usd: float = Field(ge=0.0, description="The threshold crossed.")
    alerted_at: datetime = Field(default_factory=utc_now, description="When (UTC).")
