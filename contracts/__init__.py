"""Wire contracts of the LLM Provider Worker. Imports pydantic and nothing else outside the stdlib."""

from contracts.envelope import EventEnvelope, utc_now
from contracts.errors import WIRE_ERROR_CODES, ErrorCode
from contracts.requests import (
    CachePolicy,
    LLMComparisonRequestV1,
    LLMConfigOverrides,
    PromptBlock,
    ProviderName,
)
from contracts.results import (
    ErrorDetail,
    LLMCacheHitV1,
    LLMComparisonResultV1,
    LLMCostAlertV1,
    LLMCostTrackingV1,
    LLMProviderFailureV1,
    TokenUsage,
    Winner,
)
from contracts.topics import Topics, topic_name

__all__ = [
    "WIRE_ERROR_CODES",
    "CachePolicy",
    "ErrorCode",
    "ErrorDetail",
    "EventEnvelope",
    "LLMCacheHitV1",
    "LLMComparisonRequestV1",
    "LLMComparisonResultV1",
    "LLMConfigOverrides",
    "LLMCostAlertV1",
    "LLMCostTrackingV1",
    "LLMProviderFailureV1",
    "PromptBlock",
    "ProviderName",
    "TokenUsage",
    "Topics",
    "Winner",
    "topic_name",
    "utc_now",
]
