"""Helpers for provider tests: the fake provider server on a free port and settings pointing at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import SecretStr

from contracts import PromptBlock, ProviderName
from worker.errors import ProviderError
from worker.fake_server import FakeProviderServer
from worker.providers import build_provider
from worker.providers.base import DEFAULT_SYSTEM_PROMPT, ComparisonCall
from worker.settings import ProviderSettings


@asynccontextmanager
async def fake_server(
    latency_ms: float = 0.0, slow_ms: float = 5000.0
) -> AsyncIterator[tuple[FakeProviderServer, str]]:
    server = FakeProviderServer(latency_ms=latency_ms, slow_ms=slow_ms)
    url = await server.start()
    try:
        yield server, url
    finally:
        await server.stop()


def settings_for(url: str, **overrides: object) -> ProviderSettings:
    """Every real provider configured against the fake server at `url`."""
    values: dict[str, object] = {
        "openai_api_key": SecretStr("sk-openai"),
        "openai_base_url": f"{url}/v1",
        "anthropic_api_key": SecretStr("sk-ant"),
        "anthropic_base_url": url,
        "gemini_api_key": SecretStr("gm-key"),
        "gemini_base_url": url,
        "openrouter_api_key": SecretStr("sk-or"),
        "openrouter_base_url": f"{url}/api/v1",
        "openai_compatible_api_key": SecretStr("sk-local"),
        "openai_compatible_base_url": f"{url}/v1",
        "http_read_timeout_s": 5.0,
    }
    values.update(overrides)
    return ProviderSettings(**values)  # type: ignore[arg-type]


def make_call(provider: str, model: str, *blocks: PromptBlock, **fields: object) -> ComparisonCall:
    system = "\n\n".join(b.content for b in blocks if b.target == "system") or DEFAULT_SYSTEM_PROMPT
    return ComparisonCall(
        provider=provider,
        model=model,
        system_prompt=str(fields.pop("system_prompt", system)),
        user_prompt="Essay A: cats.\n\nEssay B: dogs.",
        prompt_blocks=blocks,
        **fields,  # type: ignore[arg-type]
    )


async def failure_of(provider_name: ProviderName, scenario: str, call: ComparisonCall) -> ProviderError:
    """The error a provider raises for one answer of the fake server in `scenario`."""
    async with fake_server() as (server, url):
        provider = build_provider(provider_name, settings_for(url))
        assert provider is not None
        server.enqueue(scenario)
        try:
            await provider.compare(call)
        except ProviderError as exc:
            return exc
        finally:
            await provider.aclose()
    raise AssertionError(f"{provider_name.value} answered the {scenario!r} scenario")
