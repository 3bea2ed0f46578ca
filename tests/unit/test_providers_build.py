"""Issue 4: which providers exist is decided by which API keys are set."""

from __future__ import annotations

from pydantic import SecretStr

from worker import cli
from worker.providers import build_providers, unconfigured_providers
from worker.settings import (
    FlowSettings,
    KafkaSettings,
    MockSettings,
    ProviderSettings,
    RedisSettings,
    ServiceSettings,
    Settings,
)

from .fake_providers import fake_server


def settings(providers: ProviderSettings) -> Settings:
    return Settings(
        KafkaSettings(), RedisSettings(), FlowSettings(), ServiceSettings(), MockSettings(), providers
    )


async def test_only_the_mock_and_providers_with_a_key_are_built() -> None:
    providers = build_providers(settings(ProviderSettings(anthropic_api_key=SecretStr("k"))))
    assert sorted(providers) == ["anthropic", "mock"]
    for provider in providers.values():
        await provider.aclose()


def test_providers_without_a_key_are_listed_as_unconfigured() -> None:
    s = ProviderSettings(gemini_api_key=SecretStr("k"), openai_compatible_api_key=SecretStr("k"))
    assert unconfigured_providers(s) == ["openai", "anthropic", "openrouter", "openai_compatible"]


def test_provider_settings_read_the_issue_env_names(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("OPENAI_DEFAULT_MODEL", "gpt-5-mini")
    monkeypatch.setenv("OPENAI_COMPATIBLE_BASE_URL", "http://vllm:8000/v1")
    monkeypatch.setenv("GEMINI_DEFAULT_MODEL", "gemini-2.5-pro")
    s = ProviderSettings()
    assert s.openai_api_key is not None and s.openai_api_key.get_secret_value() == "sk-env"
    assert s.openai_base_url == "http://127.0.0.1:1/v1"
    assert s.openai_default_model == "gpt-5-mini"
    assert s.openai_compatible_base_url == "http://vllm:8000/v1"
    assert s.gemini_default_model == "gemini-2.5-pro"
    assert "sk-env" not in repr(s)


async def test_providers_test_command_reports_latency_and_usage(monkeypatch, capsys) -> None:
    async with fake_server() as (_, url):
        monkeypatch.setenv("OPENAI_API_KEY", "sk-cli")
        monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
        assert await cli.check_provider("openai", "gpt-5-mini") == 0
    out = capsys.readouterr().out
    assert out.startswith("openai gpt-5-mini: Essay")
    assert "'reasoning_tokens': 32" in out


async def test_providers_test_command_reports_the_classified_error(monkeypatch, capsys) -> None:
    async with fake_server() as (server, url):
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-cli")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
        server.enqueue("overloaded")
        assert await cli.check_provider("anthropic", None) == 1
    assert "EXTERNAL_SERVICE_ERROR" in capsys.readouterr().out


async def test_providers_test_command_refuses_an_unconfigured_provider(monkeypatch, capsys) -> None:
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    assert await cli.check_provider("openrouter", None) == 2
    assert "not configured" in capsys.readouterr().err
