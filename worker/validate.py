"""Raw Kafka bytes -> a Job, or a clear reason why not.

Unparseable: not JSON, or not an envelope -> DLQ (plus a failure event when a correlation id is recoverable).
Invalid: an envelope whose data violates the request schema -> VALIDATION_ERROR result naming the fields.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from contracts import EventEnvelope, LLMComparisonRequestV1, ProviderName
from contracts.requests import TOPIC_NAME_PATTERN

RequestEnvelope = EventEnvelope[LLMComparisonRequestV1]
#: RequestEnvelope.model_validate_json without its Python wrapper (once per record).
_VALIDATE_JSON = RequestEnvelope.__pydantic_validator__.validate_json
_PROVIDERS = frozenset(p.value for p in ProviderName)
_TOPIC_NAME = re.compile(TOPIC_NAME_PATTERN)


@dataclass(slots=True)  # not frozen: see ComparisonCall
class Job:
    """A valid request, ready to process."""

    request: LLMComparisonRequestV1
    request_id: str
    correlation_id: UUID
    requested_at: datetime
    callback_topic: str
    #: str(correlation_id), made once: the UUID's text is written per event and logged.
    correlation_text: str = field(init=False)

    def __post_init__(self) -> None:
        self.correlation_text = str(self.correlation_id)


class Unparseable(Exception):
    def __init__(self, reason: str, correlation_id: UUID | None, request_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.correlation_id = correlation_id
        #: The caller's request id when one could be read (it names the failure event), else "".
        self.request_id = request_id


class Invalid(Exception):
    def __init__(
        self,
        fields: list[str],
        reason: str,
        correlation_id: UUID,
        request_id: str,
        callback_topic: str,
        provider: str | None = None,
        requested_at: datetime | None = None,
    ) -> None:
        super().__init__(reason)
        self.fields = fields
        self.reason = reason
        self.correlation_id = correlation_id
        self.request_id = request_id
        self.callback_topic = callback_topic
        #: The provider the request named, when it named a known one (echoed on the failure result).
        self.provider = provider
        #: The envelope's event time when it could be read (the result's requested_at), else None.
        self.requested_at = requested_at


def decode_request(
    raw: bytes | None, headers: Any, default_topic: str, not_callbacks: frozenset[str] = frozenset()
) -> Job:
    """Parse and validate once; only the failure path looks at the bytes a second time, and at the record's
    headers (their correlation id, for a document without one). Raises Unparseable or Invalid, never
    anything else, whatever the bytes. `not_callbacks`: topics a request may not name as its callback."""
    try:
        envelope = _VALIDATE_JSON(raw or b"")
    except ValidationError as exc:
        header_correlation_id = header_text(headers, "correlation_id")
        try:
            reason = _explain(raw, exc, header_correlation_id, default_topic)
        except Exception:  # a document too odd to explain (e.g. nested too deep for json): still no crash
            reason = Unparseable("not an envelope: unreadable", _as_uuid(header_correlation_id))
        raise reason from exc
    data = envelope.data
    requested_at = envelope.event_timestamp
    if requested_at.tzinfo is None:  # written by a producer's utcnow(): UTC, and said so in the result
        requested_at = requested_at.replace(tzinfo=UTC)
    job = Job(
        request=data,
        request_id=data.request_id or _request_id_of(envelope, raw or b""),
        correlation_id=envelope.correlation_id,
        requested_at=requested_at,
        callback_topic=data.callback_topic or default_topic,
    )
    if job.callback_topic in not_callbacks:
        overrides = data.llm_config_overrides
        raise Invalid(
            fields=["callback_topic"],
            reason="invalid request fields: callback_topic (a topic of this service's own)",
            correlation_id=job.correlation_id,
            request_id=job.request_id,
            callback_topic=default_topic,
            provider=overrides.provider_override.value if overrides and overrides.provider_override else None,
            requested_at=job.requested_at,
        )
    return job


def _request_id_of(envelope: EventEnvelope[LLMComparisonRequestV1], raw: bytes) -> str:
    """A request without a request_id is keyed by its envelope's event_id, or, when the envelope has none
    either (the model would make a new one on every decode), by its bytes: the same on every redelivery,
    so a redelivered request is still answered from the outcome store."""
    if "event_id" in envelope.model_fields_set:
        return str(envelope.event_id)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:40]


def header_text(headers: Any, name: str) -> str | None:
    """A Kafka header's value as text (the first non-empty one of that name), or None."""
    for key, value in headers or ():
        if key == name and value:  # a header value may be null
            return bytes(value).decode(errors="replace")
    return None


def _event_time(value: Any) -> datetime | None:
    """An envelope's event_timestamp as the model reads it (naive taken as UTC), or None."""
    if value is None:
        return None
    try:
        at = _DATETIME.validate_python(value)
    except ValidationError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


_DATETIME = TypeAdapter(datetime)


def _utf8_text(text: str) -> bool:
    """False for text with a lone surrogate (json.loads reads "\ud83d" so): no JSON writer takes it."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _as_uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value)) if value is not None else None
    except ValueError:
        return None


def _explain(
    raw: bytes | None, exc: ValidationError, header_correlation_id: str | None, default_topic: str
) -> Exception:
    try:  # integers read as floats: past 4300 digits int() refuses them, and only ids are read here
        doc = json.loads(raw or b"", parse_int=float)
    except (ValueError, RecursionError):
        return Unparseable("not JSON", _as_uuid(header_correlation_id))
    if not isinstance(doc, dict):
        return Unparseable("not a JSON object", _as_uuid(header_correlation_id))
    correlation_id = _as_uuid(doc.get("correlation_id")) or _as_uuid(header_correlation_id)
    envelope_errors = [e for e in exc.errors() if not e["loc"] or e["loc"][0] != "data"]
    data = doc.get("data")
    if envelope_errors or not isinstance(data, dict) or correlation_id is None:
        fields = sorted({".".join(map(str, e["loc"])) or e["type"] for e in envelope_errors}) or ["data"]
        named = data.get("request_id") if isinstance(data, dict) else None
        if not (isinstance(named, str) and 0 < len(named) <= 200 and _utf8_text(named)):
            named = ""
        return Unparseable(f"not an envelope: invalid {', '.join(fields)}", correlation_id, named)
    fields = sorted({".".join(map(str, e["loc"][1:])) for e in exc.errors()})
    request_id = data.get("request_id")
    callback = data.get("callback_topic")
    overrides = data.get("llm_config_overrides")
    named = overrides.get("provider_override") if isinstance(overrides, dict) else None
    return Invalid(
        fields=fields,
        reason=f"invalid request fields: {', '.join(fields)}",
        correlation_id=correlation_id,
        # The caller's id when it is one the contract allows (it keys the result, which must stay small),
        # else the envelope's event id, else none.
        request_id=request_id
        if isinstance(request_id, str) and 0 < len(request_id) <= 200
        else str(_as_uuid(doc.get("event_id")) or ""),
        # The result of an invalid request goes to its callback topic only if that is a usable name.
        callback_topic=callback
        if isinstance(callback, str) and callback and len(callback) <= 249 and _TOPIC_NAME.fullmatch(callback)
        else default_topic,
        provider=named if isinstance(named, str) and named in _PROVIDERS else None,
        requested_at=_event_time(doc.get("event_timestamp")),
    )
