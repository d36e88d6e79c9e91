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
from meshdistill.llm.offline import OFFLINE_MODEL, OfflineBackend

__all__ = [
    "OFFLINE_MODEL",
    "FailureKind",
    "LLMBackend",
    "LLMParams",
    "LLMRequest",
    "LLMResult",
    "OfflineBackend",
    "Stage",
    "cache_key",
    "complete_all",
]
