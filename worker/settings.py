"""Settings from the environment (pydantic-settings), one small class per concern. Every field is in the
README's settings table; the env name is the field name upper-cased."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts import ProviderName, Topics

_CONFIG = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)


class KafkaSettings(BaseSettings):
    model_config = _CONFIG

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "huleedu"
    consumer_group: str = "llm_provider_service"
    request_topic_partitions: int = Field(default=12, ge=1)
    topic_partitions: int = Field(default=6, ge=1, description="Partitions of the other topics.")
    kafka_client_id: str = "llm-provider-worker"
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100)

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


class RedisSettings(BaseSettings):
    model_config = _CONFIG

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(default=1.0, gt=0)
    redis_max_connections: int = Field(default=64, ge=1)
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


class ServiceSettings(BaseSettings):
    model_config = _CONFIG

    service_name: str = "llm_provider_service"
    default_provider: ProviderName = ProviderName.MOCK
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int = Field(default=0, ge=0, description="Prometheus /metrics port; 0 = off.")
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


@dataclass(frozen=True, slots=True)
class Settings:
    kafka: KafkaSettings
    redis: RedisSettings
    flow: FlowSettings
    service: ServiceSettings
    mock: MockSettings


def load_settings() -> Settings:
    return Settings(KafkaSettings(), RedisSettings(), FlowSettings(), ServiceSettings(), MockSettings())
