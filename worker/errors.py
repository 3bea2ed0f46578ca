"""The worker's one error tree; mapped to the wire ErrorCode here and nowhere else.

    WorkerError(code, message, details)          every failure that ends a request
    ├── ProviderError                            a provider call failed (classified from status/body)
    │     retryable per code; details: provider, http_status, retry_after_s, provider_error_type
    └── RequestRejected                          the request itself can't be served
          VALIDATION_ERROR, CONFIGURATION_ERROR, EXPIRED, COST_LIMIT_EXCEEDED

Anything else raised while processing is a bug: it becomes INTERNAL_ERROR after the poison-message
attempts are spent, with the message routed to the DLQ.
"""

from __future__ import annotations

from typing import Any

from contracts import ErrorCode


class WorkerError(Exception):
    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    @property
    def retryable(self) -> bool:
        return bool(self.details.get("retryable", self.code.retryable))

    @property
    def retry_after_s(self) -> float | None:
        value = self.details.get("retry_after_s")
        return float(value) if value is not None else None


class ProviderError(WorkerError):
    """A provider call failed."""


class RequestRejected(WorkerError):
    """The request can't be served as asked; no provider was called."""
