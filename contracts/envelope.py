"""The envelope every event travels in."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from uuid import UUID, uuid4

from pydantic import BaseModel, Field, model_validator

T = TypeVar("T")


def utc_now() -> datetime:
    return datetime.now(UTC)


class EventEnvelope(BaseModel, Generic[T]):
    """One event on a topic: identity, timing, origin, correlation, and the data."""

    event_id: UUID = Field(default_factory=uuid4, description="Unique id of this event (UUID4).")
    event_type: str = Field(default="", description="Class name of data, e.g. LLMComparisonResultV1.")
    event_timestamp: datetime = Field(default_factory=utc_now, description="When the event was made (UTC).")
    source_service: str = Field(default="llm_provider_service", description="Service that emitted it.")
    schema_version: int = Field(default=1, description="Envelope schema version.")
    correlation_id: UUID = Field(description="Correlation id of the originating request.")
    data: T = Field(description="The event payload.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form metadata.")

    @model_validator(mode="after")
    def _default_event_type(self) -> EventEnvelope[T]:
        if not self.event_type and isinstance(self.data, BaseModel):
            self.event_type = type(self.data).__name__
        return self
