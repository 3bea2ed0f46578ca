"""Topic names in one place: `<prefix>.llm_provider.<event>.v1`."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PREFIX = "huleedu"


def topic_name(event: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.llm_provider.{event}.v1"


_EVENTS = (
    "comparison_request",
    "comparison_result",
    "failure",
    "cache_hit",
    "cost_tracking",
    "cost_alert",
    "dlq",
)


@dataclass(frozen=True, slots=True)
class Topics:
    """All topics of the service for one TOPIC_PREFIX (named once: they are read per message)."""

    prefix: str = DEFAULT_PREFIX
    comparison_request: str = field(init=False)
    comparison_result: str = field(init=False)
    failure: str = field(init=False)
    cache_hit: str = field(init=False)
    cost_tracking: str = field(init=False)
    cost_alert: str = field(init=False)
    dlq: str = field(init=False)
    #: The service's own topics a request may not name as its callback topic: the request topic (the
    #: service would read its result as a request) and those of other events (their consumers read
    #: another schema). The result topic is the default callback topic.
    not_callbacks: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        for event in _EVENTS:
            object.__setattr__(self, event, topic_name(event, self.prefix))
        others = frozenset(self.all()) - {self.comparison_result}
        object.__setattr__(self, "not_callbacks", others)

    def all(self) -> list[str]:
        return [
            self.comparison_request,
            self.comparison_result,
            self.failure,
            self.cache_hit,
            self.cost_tracking,
            self.cost_alert,
            self.dlq,
        ]
