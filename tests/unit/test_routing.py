"""Routing: override, model name, default; the four strategies."""

from __future__ import annotations

import pytest

from contracts import LLMComparisonRequestV1, ProviderName
from worker.orchestrate import FallbackPolicy, Orchestrator
from worker.pricing import ModelPrice, PriceTable
from worker.providers.base import Answer, ComparisonCall
from worker.routing import Router, Strategy, provider_for_model

PRICES = PriceTable(
    {
        "cheap": ModelPrice(input=0.1, output=0.2),
        "mid": ModelPrice(input=1.0, output=2.0),
        "dear": ModelPrice(input=10.0, output=20.0),
    }
)


class Named:
    def __init__(self, name: str, default_model: str) -> None:
        self.name = name
        self.default_model = default_model

    async def compare(self, call: ComparisonCall) -> Answer:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def orchestrator(*names: str, chain: tuple[str, ...] = (), strategy: Strategy = Strategy.PRIORITY):
    providers = {n: Named(n, f"{n}-default") for n in names}
    return Orchestrator(
        providers,  # type: ignore[arg-type]
        PRICES,
        ProviderName.MOCK,
        router=Router(strategy, PRICES),
        fallback=FallbackPolicy(chain),
    )


def request(**overrides: object) -> LLMComparisonRequestV1:
    return LLMComparisonRequestV1(
        user_prompt="Essay A ... Essay B ...", llm_config_overrides=overrides or None
    )


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("claude-haiku-4-5", "anthropic"),
        ("gpt-4.1-mini", "openai"),
        ("o1-preview", "openai"),
        ("o3-mini", "openai"),
        ("o4-mini", "openai"),
        ("gemini-2.5-flash", "google"),
        ("anthropic/claude-haiku-4.5", "openrouter"),
        ("openai/gpt-4.1", "openrouter"),
        ("mistral-large", None),
    ],
)
def test_model_name_routes_to_its_provider(model: str, provider: str | None) -> None:
    assert provider_for_model(model) == provider


def test_explicit_provider_override_wins_over_model_name() -> None:
    o = orchestrator("mock", "openai", "anthropic")
    call = o.resolve(request(provider_override="anthropic", model_override="gpt-4.1-mini"))
    assert (call.provider, call.model) == ("anthropic", "gpt-4.1-mini")


def test_model_override_routes_by_name() -> None:
    call = orchestrator("mock", "anthropic").resolve(request(model_override="claude-sonnet-4-5"))
    assert (call.provider, call.model) == ("anthropic", "claude-sonnet-4-5")


def test_unknown_model_name_goes_to_the_default_provider() -> None:
    call = orchestrator("mock", "openai").resolve(request(model_override="my-finetune"))
    assert (call.provider, call.model) == ("mock", "my-finetune")


def test_no_override_uses_the_default_provider_and_its_model() -> None:
    call = orchestrator("mock", "openai", chain=("openai",)).resolve(request())
    assert (call.provider, call.model) == ("mock", "mock-default")


def test_priority_keeps_the_configured_order() -> None:
    router = Router(Strategy.PRIORITY, PRICES)
    items = [("a", "dear"), ("b", "cheap"), ("c", "mid")]
    assert router.order(items) == items
    assert router.order(items) == items


def test_round_robin_rotates_the_first_choice() -> None:
    router = Router(Strategy.ROUND_ROBIN, PRICES)
    items = [("a", "x"), ("b", "x"), ("c", "x")]
    firsts = [router.order(items)[0][0] for _ in range(4)]
    assert firsts == ["a", "b", "c", "a"]


def test_round_robin_default_pick_spreads_over_the_chain() -> None:
    o = orchestrator("mock", "openai", chain=("openai",), strategy=Strategy.ROUND_ROBIN)
    assert [o.resolve(request()).provider for _ in range(3)] == ["mock", "openai", "mock"]


def test_least_cost_orders_by_price_with_unknown_last() -> None:
    router = Router(Strategy.LEAST_COST, PRICES)
    items = [("a", "dear"), ("u", "no-price"), ("b", "cheap"), ("c", "mid")]
    assert [p for p, _ in router.order(items)] == ["b", "c", "a", "u"]


def test_latency_orders_by_ewma_with_unmeasured_first() -> None:
    router = Router(Strategy.LATENCY, PRICES, ewma_alpha=0.5)
    router.observe_latency("slow", 2.0)
    router.observe_latency("fast", 0.5)
    router.observe_latency("fast", 1.5)  # ewma 1.0
    items = [("slow", "x"), ("fast", "x"), ("new", "x")]
    assert [p for p, _ in router.order(items)] == ["new", "fast", "slow"]


def test_latency_ewma_weights_recent_observations() -> None:
    router = Router(Strategy.LATENCY, PRICES, ewma_alpha=0.2)
    router.observe_latency("p", 1.0)
    router.observe_latency("p", 2.0)
    assert router.latency_ewma_s["p"] == pytest.approx(1.2)


def test_latency_p95_needs_enough_samples_then_tracks_the_tail() -> None:
    router = Router(Strategy.LATENCY, PRICES)
    for _ in range(19):
        router.observe_latency("p", 0.1)
    assert router.latency_p95_s("p") is None
    for _ in range(81):
        router.observe_latency("p", 0.1)
    for _ in range(10):
        router.observe_latency("p", 3.0)
    assert router.latency_p95_s("p") == 3.0


def test_round_robin_with_fallback_spreads_the_first_choice_over_every_provider() -> None:
    # One turn per request: the fallback chain's order took a second one, and "anthropic" never came first.
    o = orchestrator(
        "mock", "openai", "anthropic", chain=("openai", "anthropic"), strategy=Strategy.ROUND_ROBIN
    )
    firsts = []
    for _ in range(30):
        call = o.resolve(request())
        candidates = o._candidates(call, priced_only=False)  # as a request allowing fallback does
        firsts.append(candidates[0].provider)
    assert {p: firsts.count(p) for p in set(firsts)} == {"mock": 10, "openai": 10, "anthropic": 10}


def test_a_provider_that_fails_fast_goes_behind_those_that_answer() -> None:
    # A revoked key answers 401 in 80 ms: by latency alone it would come first for every request.
    router = Router(Strategy.LATENCY, PRICES, ewma_alpha=0.2)
    router.observe_latency("openai", 2.0)
    router.observe_latency("anthropic", 3.0)
    router.observe_failure("google")
    items = [("google", "x"), ("openai", "x"), ("anthropic", "x")]
    assert [p for p, _ in router.order(items)] == ["openai", "anthropic", "google"]
    assert router.latency_p95_s("google", min_samples=1) is None  # hedging reads answered calls only


async def test_the_orchestrator_counts_a_failed_call_as_a_failure_not_as_its_latency() -> None:
    from contracts import ErrorCode
    from worker.errors import ProviderError

    class Refusing(Named):
        async def compare(self, call: ComparisonCall) -> Answer:
            raise ProviderError(ErrorCode.AUTHENTICATION_ERROR, "bad key", provider=self.name)

    router = Router(Strategy.LATENCY, PRICES)
    o = Orchestrator({"google": Refusing("google", "g")}, PRICES, ProviderName.GOOGLE, router=router)  # type: ignore[dict-item]
    outcome = await o.run(
        ComparisonCall(provider="google", model="g", system_prompt="s", user_prompt="u"), None
    )
    assert outcome.error is not None
    assert router.latency_ewma_s["google"] == Router.FAILURE_PENALTY_S


async def test_a_failure_the_request_caused_does_not_count_against_the_provider() -> None:
    from contracts import ErrorCode
    from worker.errors import ProviderError

    class NoSuchModel(Named):
        async def compare(self, call: ComparisonCall) -> Answer:
            raise ProviderError(
                ErrorCode.CONFIGURATION_ERROR, "HTTP 404: model not found", provider=self.name
            )

    router = Router(Strategy.LATENCY, PRICES)
    router.observe_latency("anthropic", 1.0)
    o = Orchestrator(
        {"anthropic": NoSuchModel("anthropic", "a")}, PRICES, ProviderName.ANTHROPIC, router=router
    )  # type: ignore[dict-item]
    call = ComparisonCall(provider="anthropic", model="bad-model", system_prompt="s", user_prompt="u")
    outcome = await o.run(call, None)
    assert outcome.error is not None and router.latency_ewma_s["anthropic"] == 1.0
