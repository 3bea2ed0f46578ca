"""Providers by name. The mock is always there; a real provider only when its API key is set (a request
for an unconfigured one fails fast with CONFIGURATION_ERROR in the orchestrator)."""

from __future__ import annotations

from contracts import ProviderName
from worker.providers.anthropic import AnthropicProvider
from worker.providers.base import Provider
from worker.providers.gemini import GeminiProvider
from worker.providers.http import make_endpoint
from worker.providers.mock import MockProvider
from worker.providers.openai import OPENAI, OPENROUTER, OpenAIProvider
from worker.settings import ProviderSettings, Settings

REAL_PROVIDERS = (
    ProviderName.OPENAI,
    ProviderName.ANTHROPIC,
    ProviderName.GOOGLE,
    ProviderName.OPENROUTER,
    ProviderName.OPENAI_COMPATIBLE,
)


def build_providers(settings: Settings) -> dict[str, Provider]:
    """Name -> provider for the mock and every configured real provider."""
    mock = MockProvider(settings.mock)
    providers: dict[str, Provider] = {mock.name: mock}
    for name in REAL_PROVIDERS:
        provider = build_provider(name, settings.providers)
        if provider is not None:
            providers[name.value] = provider
    return providers


def unconfigured_providers(settings: ProviderSettings) -> list[str]:
    """Real providers without an API key (or, for openai_compatible, without a base URL)."""
    return [name.value for name in REAL_PROVIDERS if not _configured(name, settings)]


def _configured(name: ProviderName, s: ProviderSettings) -> bool:
    if name is ProviderName.OPENAI_COMPATIBLE:
        return s.openai_compatible_api_key is not None and bool(s.openai_compatible_base_url)
    key = {
        ProviderName.OPENAI: s.openai_api_key,
        ProviderName.ANTHROPIC: s.anthropic_api_key,
        ProviderName.GOOGLE: s.gemini_api_key,
        ProviderName.OPENROUTER: s.openrouter_api_key,
    }.get(name)
    return key is not None


def build_provider(name: ProviderName, s: ProviderSettings) -> Provider | None:
    """One real provider with its own connection pool, or None when it is not configured."""
    if not _configured(name, s):
        return None
    if name is ProviderName.OPENAI and s.openai_api_key:
        http = make_endpoint(s, s.openai_base_url, _bearer(s.openai_api_key.get_secret_value()))
        return OpenAIProvider(name.value, s.openai_default_model, http, OPENAI)
    if name is ProviderName.OPENROUTER and s.openrouter_api_key:
        headers = _bearer(s.openrouter_api_key.get_secret_value())
        headers.update({"HTTP-Referer": s.openrouter_referer, "X-Title": s.openrouter_title})
        http = make_endpoint(s, s.openrouter_base_url, headers)
        return OpenAIProvider(name.value, s.openrouter_default_model, http, OPENROUTER)
    if (
        name is ProviderName.OPENAI_COMPATIBLE
        and s.openai_compatible_api_key
        and s.openai_compatible_base_url
    ):
        key = s.openai_compatible_api_key.get_secret_value()
        http = make_endpoint(s, s.openai_compatible_base_url, _bearer(key))
        return OpenAIProvider(name.value, s.openai_compatible_default_model, http, OPENAI)
    if name is ProviderName.ANTHROPIC and s.anthropic_api_key:
        headers = {
            "x-api-key": s.anthropic_api_key.get_secret_value(),
            "anthropic-version": s.anthropic_version,
            # Prompt blocks cached for an hour (ttl "1h") are behind this beta: without it the API refuses
            # or shortens them. It changes nothing for requests without such blocks.
            "anthropic-beta": "extended-cache-ttl-2025-04-11",
        }
        return AnthropicProvider(s.anthropic_default_model, make_endpoint(s, s.anthropic_base_url, headers))
    if name is ProviderName.GOOGLE and s.gemini_api_key:
        headers = {"x-goog-api-key": s.gemini_api_key.get_secret_value()}
        return GeminiProvider(s.gemini_default_model, make_endpoint(s, s.gemini_base_url, headers))
    return None


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


__all__ = ["REAL_PROVIDERS", "build_provider", "build_providers", "unconfigured_providers"]
