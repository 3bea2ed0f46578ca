"""Settings from the environment (pydantic-settings), one small class per concern. Every field is in the
README's settings table; the env name is the field name upper-cased."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, SecretStr, StrictInt, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts import ProviderName, Topics

_LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "max_concurrency")

_CONFIG = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)


class KafkaSettings(BaseSettings):
    model_config = _CONFIG

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "huleedu"
    consumer_group: str = "llm_provider_service"
    request_topic_partitions: int = Field(default=12, ge=1)
    topic_partitions: int = Field(default=6, ge=1, description="Partitions of the other topics.")
    topic_replication_factor: int = Field(
        default=1, ge=1, description="Replication factor of the topics `topics create` makes."
    )
    kafka_client_id: str = "llm-provider-worker"
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    kafka_fetch_max_wait_ms: int = Field(default=50, ge=0, description="Longest a fetch waits at the broker.")

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


class RedisSettings(BaseSettings):
    model_config = _CONFIG

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(default=1.0, gt=0)
    redis_max_connections: int = Field(default=128, ge=1)
    redis_pool_timeout_s: float = Field(default=5.0, gt=0, description="Wait for a free pooled connection.")
    redis_key_prefix: str = "llmw"
    idempotency_ttl_s: int = Field(default=86_400, gt=0)


class FlowSettings(BaseSettings):
    """Concurrency, commits, shutdown and poison-message handling of the consumer."""

    model_config = _CONFIG

    max_in_flight: int = Field(default=512, ge=1)
    commit_interval_ms: int = Field(default=200, ge=10)
    commit_every: int = Field(default=1000, ge=1, description="Commit early after this many finished.")
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    rebalance_grace_seconds: float = Field(default=10.0, ge=0)
    poison_max_attempts: int = Field(default=3, ge=1)
    max_uncommitted_per_partition: int = Field(
        default=100_000,
        ge=1,
        description="Records of a partition taken at or past its lowest unfinished one (the commit point) "
        "before fetching from it pauses; it resumes when they are down to half.",
    )


class ServiceSettings(BaseSettings):
    model_config = _CONFIG

    service_name: str = "llm_provider_service"
    default_provider: ProviderName = ProviderName.MOCK
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int = Field(default=0, ge=0, description="Prometheus /metrics port; 0 = off.")
    metrics_host: str = Field(default="127.0.0.1", description="Address the metrics server binds.")
    price_table_path: str | None = None


class MockSettings(BaseSettings):
    """The deterministic mock provider."""

    model_config = _CONFIG

    mock_model: str = "mock-comparator-1"
    mock_latency_ms: float = Field(default=0.0, ge=0)
    mock_jitter_ms: float = Field(default=0.0, ge=0)
    mock_error_rate: float = Field(default=0.0, ge=0, le=1)
    mock_seed: int = 0
    mock_winner: Literal["auto", "Essay A", "Essay B"] = "auto"


class ProviderSettings(BaseSettings):
    """Real LLM providers and their shared HTTP settings. A provider is configured only when its API key
    is set; base URLs include the API version prefix the provider's SDK uses (OpenAI-style: `.../v1`)."""

    model_config = _CONFIG

    openai_api_key: SecretStr | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    openai_default_model: str = "gpt-4.1-mini"
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str = "https://api.anthropic.com"
    anthropic_default_model: str = "claude-haiku-4-5"
    anthropic_version: str = "2023-06-01"
    gemini_api_key: SecretStr | None = None
    gemini_base_url: str = "https://generativelanguage.googleapis.com"
    gemini_default_model: str = "gemini-2.5-flash"
    openrouter_api_key: SecretStr | None = None
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    openrouter_default_model: str = "openai/gpt-4.1-mini"
    openrouter_referer: str = "https://github.com/huleedu/llm-provider-worker"
    openrouter_title: str = "LLM Provider Worker"
    openai_compatible_api_key: SecretStr | None = None
    openai_compatible_base_url: str | None = None
    openai_compatible_default_model: str = "default"
    http_connect_timeout_s: float = Field(default=5.0, gt=0)
    http_read_timeout_s: float = Field(default=120.0, gt=0)
    http_max_connections: int = Field(default=1000, ge=1, description="Connection pool size per provider.")
    http_keepalive_expiry_s: float = Field(default=30.0, ge=0)


class CacheSettings(BaseSettings):
    """The answer cache (Redis + in-process LRU) and single-flight of identical requests."""

    model_config = _CONFIG

    cache_enabled: bool = Field(default=True, description="Off: every request is treated as bypass.")
    cache_ttl_s: int = Field(default=86_400, gt=0)
    cache_local_max_entries: int = Field(default=10_000, ge=1)
    cache_local_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    cache_redis_retry_s: float = Field(
        default=5.0, gt=0, description="After a Redis error, skip Redis this long, then probe once."
    )
    single_flight_lease_ms: int = Field(default=30_000, ge=100, description="Renewed while the call runs.")
    single_flight_poll_ms: int = Field(default=200, ge=1, description="Longest wait between polls.")


class SpendSettings(BaseSettings):
    """Sliding-window spend per organization and global: alerts and optional budgets (USD)."""

    model_config = _CONFIG

    cost_alert_window_s: int = Field(default=3_600, ge=1)
    cost_alert_threshold_usd: float | None = Field(default=None, gt=0, description="Global; unset = off.")
    org_cost_alert_threshold_usd: float | None = Field(default=None, gt=0, description="Per organization.")
    org_budget_usd: float | None = Field(default=None, gt=0, description="Per organization; unset = off.")
    org_budget_window_s: int = Field(default=30 * 86_400, ge=1)


class ResilienceSettings(BaseSettings):
    """Routing, fallback, retries, circuit breakers and rate limits of provider calls."""

    model_config = _CONFIG

    routing_strategy: Literal["priority", "round_robin", "least_cost", "latency"] = "priority"
    fallback_chain: str = Field(default="", description="Comma-separated providers tried after the first.")
    fallback_enabled: bool = Field(default=False, description="Fall back even if the request did not ask.")
    retry_max_attempts: int = Field(default=3, ge=1, description="Calls per provider per request.")
    retry_attempt_budget: int = Field(default=6, ge=1, description="Calls per request, all providers.")
    retry_base_s: float = Field(default=0.5, gt=0)
    retry_max_wait_s: float = Field(default=20.0, gt=0)
    retry_after_cap_s: float = Field(default=30.0, ge=0, description="Longest Retry-After honoured.")
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_window_s: float = Field(default=60.0, gt=0)
    breaker_recovery_s: float = Field(default=30.0, gt=0)
    breaker_half_open_probes: int = Field(default=1, ge=1)
    breaker_slow_call_s: float = Field(
        default=60.0,
        ge=0,
        description="A call our deadline cut after this long counts as a timeout; 0: never.",
    )
    rate_limits: dict[str, dict[str, StrictInt]] = Field(
        default_factory=dict,
        description='JSON: {"openai": {"requests_per_minute": 500, "tokens_per_minute": 200000, '
        '"max_concurrency": 50}, "openai:gpt-4.1": {...}}',
    )

    @field_validator("rate_limits")
    @classmethod
    def _limits_name_a_provider_and_are_positive(
        cls, value: dict[str, dict[str, int]]
    ) -> dict[str, dict[str, int]]:
        """Refused at start-up, not ignored: a scope that names no provider (a typo), a limit of unknown
        name, or one below 1 (0 read as "no limit", a negative one broke the shared limiter's script)."""
        providers = sorted(p.value for p in ProviderName)
        for scope, spec in value.items():
            if scope.split(":", 1)[0] not in providers:
                raise ValueError(f"{scope!r}: not a provider, nor provider:model ({', '.join(providers)})")
            for name, limit in spec.items():
                if name not in _LIMIT_NAMES:
                    raise ValueError(f"{scope!r}: unknown limit {name!r} ({', '.join(_LIMIT_NAMES)})")
                if limit < 1:
                    raise ValueError(f"{scope!r}: {name} must be at least 1 (leave it out for no limit)")
        return value

    expected_replicas: int = Field(default=1, ge=1, description="Local share = limit / this, Redis down.")
    rate_limit_max_wait_s: float = Field(default=120.0, ge=0, description="Wait for capacity, no deadline.")
    hedge_enabled: bool = Field(
        default=False, description="Past a provider's p95 latency, also ask the next one (needs fallback)."
    )

    @property
    def chain(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.fallback_chain.split(",") if p.strip())


@dataclass(frozen=True, slots=True)
class Settings:
    kafka: KafkaSettings
    redis: RedisSettings
    flow: FlowSettings
    service: ServiceSettings
    mock: MockSettings
    providers: ProviderSettings = field(default_factory=ProviderSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    spend: SpendSettings = field(default_factory=SpendSettings)
    resilience: ResilienceSettings = field(default_factory=ResilienceSettings)


def load_settings() -> Settings:
    return Settings(KafkaSettings(), RedisSettings(), FlowSettings(), ServiceSettings(), MockSettings())
