"""LLM layer: stage schemas, versioned prompts, and backends behind one interface.

``backend`` defines the interface (:class:`LLMBackend`, :class:`LLMRequest`,
:class:`LLMResult`, :func:`cache_key`); ``offline`` and ``openai_backend`` implement it;
``stages`` builds each stage's request from its structured inputs.
"""

from meshdistill.llm.backend import (
    FailureKind,
    LLMBackend,
    LLMParams,
    LLMRequest,
    LLMResult,
    Stage,
    cache_key,
    complete_all,
)
from meshdistill.llm.budget import Budget, DeferredResult, is_deferred
from meshdistill.llm.cache import CachedBackend, CachedResult, is_cached, usage
from meshdistill.llm.offline import OFFLINE_MODEL, OfflineBackend
from meshdistill.llm.pricing import ModelPrice, Pricing, cost_usd

__all__ = [
    "OFFLINE_MODEL",
    "Budget",
    "CachedBackend",
    "CachedResult",
    "DeferredResult",
    "FailureKind",
    "LLMBackend",
    "LLMParams",
    "LLMRequest",
    "LLMResult",
    "ModelPrice",
    "OfflineBackend",
    "Pricing",
    "Stage",
    "cache_key",
    "complete_all",
    "cost_usd",
    "is_cached",
    "is_deferred",
    "usage",
]
