"""Which LLM a run uses: ``offline`` (the default: no keys, no network) or ``openai``.

Settings come, in order, from the caller (CLI flags, DAG Params), the Airflow connection
``meshdistill_llm`` (read by the DAG glue and passed in here: host = base URL, password =
API key, extra ``model``/``organization``/``max_concurrency``/``timeout``/
``max_attempts``/``max_output_tokens``/``narrow_schema``/``client_process``) and the
environment (``MESHDISTILL_LLM_BACKEND``, ``MESHDISTILL_LLM_MODEL``, ``OPENAI_BASE_URL``,
``OPENAI_API_KEY``, ``OPENAI_ORG_ID``). The key is never logged; repr hides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

from meshdistill.errors import ConfigError

if TYPE_CHECKING:  # the backends load when one is made: options and forms need none of them
    from sqlalchemy import Engine

    from meshdistill.llm.backend import LLMBackend
    from meshdistill.llm.cache import CachedBackend

Backend = Literal["offline", "openai"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_CONCURRENCY = 32
"""Requests in flight per distill task (per ``openai`` backend) unless configured."""
OPENAI_API_URL = "https://api.openai.com/v1"
"""The SDK's own default, passed explicitly: given no base URL the SDK reads
``OPENAI_BASE_URL`` itself, and Docker Compose passes an unset setting as an empty one."""


@dataclass(frozen=True)
class LLMConfig:
    """How to reach the LLM; ``None`` fields fall back to the environment."""

    backend: str | None = None
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    organization: str | None = None
    # None: OpenAIBackend's defaults (32 in flight, 60 s per request, 5 attempts)
    max_concurrency: int | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    # None: each stage's own max_tokens; else at most this many output tokens per call
    max_output_tokens: int | None = None
    # None: MESHDISTILL_LLM_CLIENT_PROCESS (default on); see meshdistill.llm.client_process
    client_process: bool | None = None
    # True: generate requests carry a schema narrowed to their input (QuestionChoices):
    # for servers that constrain decoding to the schema (llama.cpp, vLLM). Off by default:
    # a schema per request defeats a hosted API's cache of compiled schemas.
    narrow_schema: bool | None = None

    def merged(self, fallback: LLMConfig | None) -> LLMConfig:
        """This config with its unset fields taken from ``fallback`` (e.g. the connection)."""
        if fallback is None:
            return self
        return replace(fallback, **{k: v for k, v in vars(self).items() if v is not None})

    @property
    def kind(self) -> str:
        kind = self.backend or os.environ.get("MESHDISTILL_LLM_BACKEND") or (
            "openai" if self.base_url or os.environ.get("OPENAI_BASE_URL") else "offline")
        if kind not in BACKENDS:
            raise ConfigError(f"unknown LLM backend {kind!r}; use one of {BACKENDS}")
        return kind

    @property
    def in_child_process(self) -> bool:
        """Whether the ``openai`` client runs in a child process of its own (the default:
        replies are read while the run's event loop grades; docs/llm.md gives the
        figures)."""
        if self.client_process is not None:
            return self.client_process
        value = os.environ.get("MESHDISTILL_LLM_CLIENT_PROCESS", "").strip().lower()
        if value not in ("", "0", "1", "false", "true", "no", "yes"):
            raise ConfigError(f"MESHDISTILL_LLM_CLIENT_PROCESS={value!r}: use 1 or 0")
        return value not in ("0", "false", "no")

    @classmethod
    def from_extra(cls, host: str | None, password: str | None,
                   extra: dict[str, Any]) -> LLMConfig:
        """From an Airflow connection's parts (no Airflow import here)."""
        allowed = {"backend", "model", "organization", "max_concurrency", "timeout",
                   "max_attempts", "max_output_tokens", "client_process", "narrow_schema"}
        unknown = set(extra) - allowed
        if unknown:
            raise ConfigError(f"unknown keys in the meshdistill_llm connection extra: "
                              f"{sorted(unknown)}; allowed: {sorted(allowed)}")
        for flag in ("narrow_schema", "client_process"):
            if flag in extra and not isinstance(extra[flag], bool):
                raise ConfigError(f"the meshdistill_llm connection extra {flag!r} must be "
                                  f"true or false (JSON), got {extra[flag]!r}")
        base = host if not host or "://" in host else f"https://{host}"
        return cls(base_url=base or None, api_key=password or None,
                   backend=extra.get("backend") or ("openai" if host else None),
                   **{k: v for k, v in extra.items() if k != "backend"})


def make_backend(config: LLMConfig) -> LLMBackend:
    """The bare backend a config names."""
    if config.kind == "offline":
        from meshdistill.llm.offline import OfflineBackend

        return OfflineBackend(config.model) if config.model else OfflineBackend()
    from meshdistill.llm.client_process import ClientProcessBackend
    from meshdistill.llm.openai_backend import OpenAIBackend

    given = {"max_concurrency": config.max_concurrency, "timeout": config.timeout,
             "max_attempts": config.max_attempts}
    tuning: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    kind = ClientProcessBackend if config.in_child_process else OpenAIBackend
    return kind(model=config.model, base_url=config.base_url, api_key=config.api_key,
                organization=config.organization, **tuning)


def cached_backend(config: LLMConfig, engine: Engine, *, budget_usd: float | None = None,
                   budget_tokens: int | None = None, subtree: str | None = None
                   ) -> CachedBackend:
    """The configured backend behind the ``llm_call`` cache and the run budget; the calls
    it stores are recorded as ``subtree``'s."""
    from meshdistill.llm.budget import Budget
    from meshdistill.llm.cache import CachedBackend

    budget = (Budget(usd=budget_usd, tokens=budget_tokens)
              if budget_usd is not None or budget_tokens is not None else None)
    return CachedBackend(make_backend(config), engine, budget=budget,
                         max_output_tokens=config.max_output_tokens,
                         narrow_schema=bool(config.narrow_schema), subtree=subtree)
