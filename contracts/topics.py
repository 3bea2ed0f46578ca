"""Topic names in one place: `<prefix>.llm_provider.<event>.v1`."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "huleedu"


def topic_name(event: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.llm_provider.{event}.v1"


@dataclass(frozen=True, slots=True)
class Topics:
    """All topics of the service for one TOPIC_PREFIX."""

    prefix: str = DEFAULT_PREFIX

    @property
    def comparison_request(self) -> str:
        return topic_name("comparison_request", self.prefix)

    @property
    def comparison_result(self) -> str:
        return topic_name("comparison_result", self.prefix)

    @property
    def failure(self) -> str:
        return topic_name("failure", self.prefix)

    @property
    def cache_hit(self) -> str:
        return topic_name("cache_hit", self.prefix)

    @property
    def cost_tracking(self) -> str:
        return topic_name("cost_tracking", self.prefix)

    @property
    def cost_alert(self) -> str:
        return topic_name("cost_alert", self.prefix)

    @property
    def dlq(self) -> str:
        return topic_name("dlq", self.prefix)

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
