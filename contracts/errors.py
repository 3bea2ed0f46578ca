"""The one error-code enum of the wire.

Members are our names; `.wire` is the string the upstream platform validates against its fixed set, and
`.retryable` says whether a caller may try the same request again (member -> wire value):

- VALIDATION_ERROR -> VALIDATION_ERROR; retryable: no; the request violates the contract
- CONFIGURATION_ERROR -> CONFIGURATION_ERROR; retryable: no; provider/model not configured here
- AUTHENTICATION_ERROR -> AUTHENTICATION_ERROR; retryable: no; provider rejected our credentials (401/403)
- RATE_LIMIT -> RATE_LIMIT; retryable: yes; provider or local limiter said slow down (429)
- TIMEOUT -> TIMEOUT; retryable: yes; provider did not answer in time
- CONNECTION_ERROR -> CONNECTION_ERROR; retryable: yes; provider could not be reached
- EXTERNAL_SERVICE_ERROR -> EXTERNAL_SERVICE_ERROR; retryable: yes; provider failed (5xx, 529 overloaded)
- PARSING_ERROR -> PARSING_ERROR; retryable: yes; provider answered, but not a valid comparison
- PROVIDER_UNAVAILABLE -> CIRCUIT_BREAKER_OPEN; retryable: yes; breaker open: failing fast
- CONTENT_TOO_LONG -> LLM_CONTENT_TOO_LONG; retryable: no; prompt exceeds the model's context
- CONTENT_POLICY -> LLM_INVALID_PROMPT; retryable: no; provider refused the content (safety)
- COST_LIMIT_EXCEEDED -> LLM_COST_LIMIT_EXCEEDED; retryable: no; organization budget would be exceeded
- INTERNAL_ERROR -> PROCESSING_ERROR; retryable: no; a bug or poison message in this service
- EXPIRED -> TIMEOUT (reason deadline_expired); retryable: no; the request's deadline passed
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    VALIDATION_ERROR = "VALIDATION_ERROR"
    CONFIGURATION_ERROR = "CONFIGURATION_ERROR"
    AUTHENTICATION_ERROR = "AUTHENTICATION_ERROR"
    RATE_LIMIT = "RATE_LIMIT"
    TIMEOUT = "TIMEOUT"
    CONNECTION_ERROR = "CONNECTION_ERROR"
    EXTERNAL_SERVICE_ERROR = "EXTERNAL_SERVICE_ERROR"
    PARSING_ERROR = "PARSING_ERROR"
    PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE"
    CONTENT_TOO_LONG = "CONTENT_TOO_LONG"
    CONTENT_POLICY = "CONTENT_POLICY"
    COST_LIMIT_EXCEEDED = "COST_LIMIT_EXCEEDED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    EXPIRED = "EXPIRED"

    @property
    def wire(self) -> str:
        """The value sent in error_detail.error_code."""
        return _WIRE.get(self, self.value)

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_WIRE = {
    ErrorCode.PROVIDER_UNAVAILABLE: "CIRCUIT_BREAKER_OPEN",
    ErrorCode.CONTENT_TOO_LONG: "LLM_CONTENT_TOO_LONG",
    ErrorCode.CONTENT_POLICY: "LLM_INVALID_PROMPT",
    ErrorCode.COST_LIMIT_EXCEEDED: "LLM_COST_LIMIT_EXCEEDED",
    ErrorCode.INTERNAL_ERROR: "PROCESSING_ERROR",
    ErrorCode.EXPIRED: "TIMEOUT",
}

_RETRYABLE = frozenset(
    {
        ErrorCode.RATE_LIMIT,
        ErrorCode.TIMEOUT,
        ErrorCode.CONNECTION_ERROR,
        ErrorCode.EXTERNAL_SERVICE_ERROR,
        ErrorCode.PARSING_ERROR,
        ErrorCode.PROVIDER_UNAVAILABLE,
    }
)

#: Every value that may appear in error_detail.error_code.
WIRE_ERROR_CODES = frozenset(code.wire for code in ErrorCode)
