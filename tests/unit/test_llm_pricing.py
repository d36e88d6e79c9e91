"""Prices per model: configuration, prefix matching, unknown models, the run budget's maths."""

from __future__ import annotations

import logging

import pytest
from meshdistill.errors import ConfigError
from meshdistill.llm.budget import Budget
from meshdistill.llm.offline import OFFLINE_MODEL
from meshdistill.llm.pricing import PRICES_ENV, ModelPrice, Pricing, cost_usd, default_pricing

PRICES = {"gpt-4o-mini": {"input": 0.15, "output": 0.6}, "gpt-4o": {"input": 2.5, "output": 10}}


def test_cost_is_tokens_times_price_per_million() -> None:
    pricing = Pricing(PRICES)
    assert pricing.cost_usd("gpt-4o-mini", 1_000_000, 0) == pytest.approx(0.15)
    assert pricing.cost_usd("gpt-4o-mini", 0, 1_000_000) == pytest.approx(0.6)
    assert pricing.cost_usd("gpt-4o-mini", 1200, 300) == pytest.approx(
        1200 * 0.15e-6 + 300 * 0.6e-6)
    assert pricing.cost_usd("gpt-4o", 1000, 1000) == pytest.approx(0.0125)


def test_dated_model_names_use_the_longest_prefix() -> None:
    pricing = Pricing(PRICES)
    assert pricing.price("gpt-4o-mini-2024-07-18") == ModelPrice(0.15, 0.6)
    assert pricing.price("gpt-4o-2024-08-06") == ModelPrice(2.5, 10)
    assert pricing.price("gpt-4omni") is None  # a prefix must end at a '-'


def test_offline_model_is_free_without_configuration() -> None:
    assert Pricing().cost_usd(OFFLINE_MODEL, 10_000, 10_000) == 0.0


def test_unknown_model_costs_zero_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    pricing = Pricing(PRICES)
    with caplog.at_level(logging.WARNING, logger="meshdistill.llm.pricing"):
        assert pricing.cost_usd("mystery-model-unit-test", 500, 500) == 0.0
        assert pricing.cost_usd("mystery-model-unit-test", 500, 500) == 0.0
        assert Pricing().cost_usd("mystery-model-unit-test", 1, 1) == 0.0
    warnings = [r for r in caplog.records if "mystery-model-unit-test" in r.getMessage()]
    assert len(warnings) == 1 and PRICES_ENV in warnings[0].getMessage()


def test_prices_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PRICES_ENV, '{"local-llama": {"input": 0, "output": 0}, '
                                   '"gpt-4o-mini": {"input": 0.15, "output": 0.6}}')
    assert cost_usd("gpt-4o-mini", 2_000_000, 1_000_000) == pytest.approx(0.9)
    assert default_pricing().price("local-llama") == ModelPrice(0, 0)
    monkeypatch.setenv(PRICES_ENV, '{"gpt-4o-mini": {"input": 1, "output": 1}}')
    assert cost_usd("gpt-4o-mini", 1_000_000, 0) == pytest.approx(1.0)  # re-read on change
    monkeypatch.delenv(PRICES_ENV)
    assert default_pricing().price("gpt-4o-mini") is None


@pytest.mark.parametrize("bad", [
    "not json",
    "[1, 2]",
    '{"m": 1}',
    '{"m": {"input": 1}}',
    '{"m": {"input": 1, "output": -1}}',
    '{"m": {"input": "cheap", "output": 1}}',
    '{"m": {"input": 1, "output": 1, "cached": 0.5}}',
])
def test_bad_price_configuration_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        Pricing.from_env({PRICES_ENV: bad})


def test_budget_reserves_then_settles_and_stays_exhausted() -> None:
    budget = Budget(tokens=1000)
    first = budget.try_reserve(600, 0.0)
    assert first is not None
    assert budget.try_reserve(600, 0.0) is None  # 600 reserved + 600 > 1000
    assert budget.exhausted
    budget.settle(first, 100, 0.0)  # it used far less than reserved...
    assert budget.try_reserve(10, 0.0) is None  # ...but a stopped run stays stopped
    snap = budget.snapshot()
    assert (snap["calls"], snap["deferred"], snap["spent_tokens"]) == (1, 2, 100)


def test_budget_in_usd() -> None:
    budget = Budget(usd=0.01)
    reservations = [budget.try_reserve(0, 0.004) for _ in range(3)]
    assert [r is not None for r in reservations] == [True, True, False]
    for r in reservations[:2]:
        assert r is not None
        budget.settle(r, 0, 0.005)
    assert budget.spent_usd == pytest.approx(0.01)
    with pytest.raises(ConfigError):
        Budget(usd=-1)
