"""The comparison request an upstream service publishes."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

import pydantic_core
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 200_000
MAX_BLOCKS = 32
#: The request's metadata is echoed in its result: kept well under Kafka's 1 MB record limit.
MAX_METADATA_JSON_BYTES = 64 * 1024
#: A legal Kafka topic name: letters, digits, '.', '_', '-', but not "." or ".."; or "" (the default topic).
TOPIC_NAME_PATTERN = r"^([a-zA-Z0-9._-]*[a-zA-Z0-9_-][a-zA-Z0-9._-]*|\.{3,}|)$"


class ProviderName(StrEnum):
    ANTHROPIC = "anthropic"
    OPENAI = "openai"
    GOOGLE = "google"
    OPENROUTER = "openrouter"
    OPENAI_COMPATIBLE = "openai_compatible"
    MOCK = "mock"


class CachePolicy(StrEnum):
    USE = "use"
    BYPASS = "bypass"
    REFRESH = "refresh"


class PromptBlock(BaseModel):
    """A piece of the prompt, placed in the system prompt or the user content."""

    target: Literal["system", "user_content"] = Field(description="Where the block goes.")
    content: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The block's text.")
    cacheable: bool = Field(default=False, description="Mark for provider-side prompt caching.")
    ttl: Literal["5m", "1h"] = Field(default="5m", description="Prompt-cache lifetime when cacheable.")


class LLMConfigOverrides(BaseModel):
    """Per-request overrides of the configured provider and model settings."""

    provider_override: ProviderName | None = Field(default=None, description="Provider to use.")
    model_override: str | None = Field(default=None, max_length=200, description="Model to use.")
    temperature_override: float | None = Field(default=None, ge=0.0, le=2.0, description="Temperature 0-2.")
    system_prompt_override: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="System prompt instead of the default."
    )
    max_tokens_override: int | None = Field(
        default=None, gt=0, le=1_000_000, description="Output token cap (at most 1 000 000)."
    )
    reasoning_effort: Literal["none", "low", "medium", "high"] | None = Field(
        default=None, description="Reasoning effort for reasoning models."
    )
    output_verbosity: Literal["low", "medium", "high"] | None = Field(
        default=None, description="Output verbosity where the model supports it."
    )


class LLMComparisonRequestV1(BaseModel):
    """Ask for a comparative judgement: is Essay A or Essay B better?"""

    model_config = ConfigDict(extra="ignore")

    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Caller's idempotency key; when absent the envelope's event_id is used "
        "(without one either, 'sha256:' and a hash of the record).",
    )
    user_prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The comparison prompt.")
    prompt_blocks: list[PromptBlock] | None = Field(
        default=None, max_length=MAX_BLOCKS, description="Structured prompt pieces (prompt caching)."
    )
    callback_topic: str | None = Field(
        default=None,
        max_length=249,
        pattern=TOPIC_NAME_PATTERN,
        description="Topic for the result (a legal Kafka topic name); empty or absent: the result topic.",
    )
    llm_config_overrides: LLMConfigOverrides | None = Field(
        default=None, description="Per-request overrides."
    )
    user_id: str | None = Field(default=None, max_length=200, description="Who asked.")
    organization_id: str | None = Field(default=None, max_length=200, description="Organization billed.")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Echoed back untouched in the result (at most 64 KiB as JSON).",
    )
    cache: CachePolicy = Field(default=CachePolicy.USE, description="use | bypass | refresh.")
    deadline: AwareDatetime | None = Field(
        default=None, description="UTC time after which the answer is useless."
    )
    allow_fallback: bool = Field(default=False, description="May another provider answer if this one fails.")

    @field_validator("metadata")
    @classmethod
    def _metadata_fits_in_a_result(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value and len(pydantic_core.to_json(value, serialize_unknown=True)) > MAX_METADATA_JSON_BYTES:
            raise ValueError(f"metadata over {MAX_METADATA_JSON_BYTES} bytes as JSON")
        return value
