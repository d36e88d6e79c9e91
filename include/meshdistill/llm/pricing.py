"""Per-model prices, so every cached call records what it cost and budgets can be in USD.

Prices are USD per 1M input and per 1M output tokens. They change often and differ per
provider (and are zero on a local vLLM/Ollama server), so nothing is hard-coded except the
offline backend's model, which is free: prices come from a dict or from the environment
variable ``MESHDISTILL_LLM_PRICES``, a JSON object such as
``{"gpt-4o-mini": {"input": 0.15, "output": 0.6}}``.

A model is priced by its exact name, else by the longest configured name it starts with
followed by ``-`` (so ``gpt-4o-mini`` also prices ``gpt-4o-mini-2024-07-18``). An unknown
model costs 0 and is logged once per model as a warning: a missing price must not stop a
run, but it must not go unnoticed either (a USD budget cannot limit an unpriced model;
use a token budget for those).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshdistill.errors import ConfigError
from meshdistill.llm.offline import OFFLINE_MODEL

log = logging.getLogger(__name__)

PRICES_ENV = "MESHDISTILL_LLM_PRICES"
PER_TOKENS = 1_000_000

_warned: set[str] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M input tokens and per 1M output tokens."""

    input: float
    output: float

    def __post_init__(self) -> None:
        for name, value in (("input", self.input), ("output", self.output)):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"LLM price {name!r} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"LLM price {name!r} must be finite and >= 0, got {value!r}")

    @classmethod
    def parse(cls, model: str, value: Any) -> ModelPrice:
        """From ``{"input": x, "output": y}`` (or a ModelPrice); a clear error otherwise."""
        if isinstance(value, ModelPrice):
            return value
        if not isinstance(value, Mapping) or set(value) != {"input", "output"}:
            raise ConfigError(
                f"price of LLM model {model!r} must be an object with exactly the keys "
                f"'input' and 'output' (USD per 1M tokens), got {value!r}"
            )
        return cls(input=value["input"], output=value["output"])


FREE = ModelPrice(0.0, 0.0)


class Pricing:
    """A price table; :meth:`cost_usd` turns a call's tokens into dollars."""

    def __init__(self, prices: Mapping[str, ModelPrice | Mapping[str, float]] | None = None):
        table: dict[str, ModelPrice] = {OFFLINE_MODEL: FREE}
        for model, value in (prices or {}).items():
            if not isinstance(model, str) or not model:
                raise ConfigError(f"LLM price table keys must be model names, got {model!r}")
            table[model] = ModelPrice.parse(model, value)
        self.prices: dict[str, ModelPrice] = table

    @classmethod
    def from_json(cls, text: str) -> Pricing:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{PRICES_ENV} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{PRICES_ENV} must be a JSON object keyed by model name")
        return cls(data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Pricing:
        """Prices from ``MESHDISTILL_LLM_PRICES``; only the offline model when unset."""
        text = (os.environ if environ is None else environ).get(PRICES_ENV, "").strip()
        return cls.from_json(text) if text else cls()

    def price(self, model: str) -> ModelPrice | None:
        """The price of ``model``: exact name, else the longest ``<name>-`` prefix."""
        exact = self.prices.get(model)
        if exact is not None:
            return exact
        prefixes = [name for name in self.prices if model.startswith(name + "-")]
        return self.prices[max(prefixes, key=len)] if prefixes else None

    def cost_usd(self, model: str, tokens_in: int, tokens_out: int) -> float:
        """Dollars for one call; 0 (and one warning per model) when the model has no price."""
        price = self.price(model)
        if price is None:
            with _warned_lock:
                first = model not in _warned
                _warned.add(model)
            if first:
                log.warning("no price configured for LLM model %r: its calls are counted as "
                            "costing 0 USD (set %s)", model, PRICES_ENV)
            return 0.0
        return (tokens_in * price.input + tokens_out * price.output) / PER_TOKENS

    def __repr__(self) -> str:
        return f"Pricing({sorted(self.prices)})"


_default: tuple[str, Pricing] | None = None
_default_lock = threading.Lock()


def default_pricing() -> Pricing:
    """The environment's price table, re-read only when the variable changes."""
    global _default
    text = os.environ.get(PRICES_ENV, "").strip()
    with _default_lock:
        if _default is None or _default[0] != text:
            _default = (text, Pricing.from_json(text) if text else Pricing())
        return _default[1]


def cost_usd(model: str, tokens_in: int, tokens_out: int) -> float:
    """Cost of one call with the prices from ``MESHDISTILL_LLM_PRICES``."""
    return default_pricing().cost_usd(model, tokens_in, tokens_out)
