"""The one small interface every LLM backend implements, and what flows through it.

Stages build an :class:`LLMRequest` (stage, prompt version, messages, the pydantic model
the output must validate against, sampling parameters, and the structured inputs the
prompt was rendered from) and get back an :class:`LLMResult`. A backend never raises for
bad model output or a failing server: the result carries either the parsed output or a
failure reason, so a caller can record a terminal ``failed`` state per item and move on
instead of losing a whole mapped task to one malformed reply.

:func:`cache_key` is the identity of a call, (model, prompt version, messages,
parameters) hashed over canonical JSON. The Postgres ``llm_call`` cache and the cost
ledger key on it; a caching or budgeting wrapper can implement
:class:`LLMBackend` itself and delegate to a real backend.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from meshdistill.llm.inputs import StageInput
from meshdistill.llm.prompts import ChatMessage
from meshdistill.llm.schemas import QuestionChoices, grammar_schema, output_schema

T = TypeVar("T", bound=BaseModel)


class Stage(StrEnum):
    """Pipeline stages that call an LLM."""

    GENERATE = "generate"
    JUDGE = "judge"
    ANSWER = "answer"


class FailureKind(StrEnum):
    """Why a call produced no valid output; stored with the failed item."""

    INVALID_OUTPUT = "invalid_output"  # not JSON or not the schema, after the repair attempt
    REFUSED = "refused"  # the model declined (structured-outputs refusal)
    RATE_LIMITED = "rate_limited"  # 429 after all attempts (or Retry-After beyond our cap)
    SERVER_ERROR = "server_error"  # 5xx after all attempts
    TIMEOUT = "timeout"  # no answer in time, after all attempts
    CONNECTION = "connection"  # could not reach the server, after all attempts
    REQUEST_REJECTED = "request_rejected"  # 4xx other than 429: retrying cannot help
    UNSUPPORTED = "unsupported"  # the backend cannot serve this request


MODEL_ANSWER_FAILURES = frozenset({FailureKind.INVALID_OUTPUT, FailureKind.REFUSED})
"""Failures that are the model's own answer to the request, as repeatable as a valid one:
the ``llm_call`` cache keeps them, and a run does not take their articles up again (only
another model, prompt version or parameters would answer differently). Every other
failure is the server's or the network's, worth trying again later."""


@dataclass(frozen=True)
class LLMParams:
    """Sampling parameters; part of the cache key."""

    temperature: float = 0.0
    max_tokens: int = 2048
    seed: int | None = 0

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}


# One encoder for every call: json.dumps with non-default options builds a new encoder
# per call. Same options, so the same text.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(value: Any) -> str:
    return _CANONICAL.encode(value)


def cache_key(
    model: str,
    prompt_version: str,
    messages: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
) -> str:
    """sha256 (hex) over canonical JSON of the call's identity.

    Canonical: keys sorted, no whitespace, UTF-8 kept as is, so the key does not depend on
    dict ordering or on the Python process. Message order matters (it is a conversation).
    """
    payload = {
        "model": model,
        "prompt_version": prompt_version,
        "messages": [dict(m) for m in messages],
        "params": dict(params),
    }
    return hashlib.sha256(_canonical(payload).encode("utf-8")).hexdigest()


@functools.cache
def schema_digest(model: type[BaseModel]) -> str:
    """Short digest of what a server may be sent for a pydantic model: its JSON schema and
    the form of it a grammar-constraining server gets. A change to either is a new call
    (a judge held to 1-5 answers another request than one that could score 10).

    Cached per model class: building the schema was the largest CPU cost of a call.
    """
    both = [output_schema(model), grammar_schema(model)]
    return hashlib.sha256(_canonical(both).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LLMRequest(Generic[T]):
    """One call: what to send and what the answer must validate against."""

    stage: Stage
    prompt_version: str
    messages: tuple[ChatMessage, ...]
    output_model: type[T]
    params: LLMParams = field(default_factory=LLMParams)
    inputs: StageInput | None = None  # what the prompt was rendered from (offline backend)
    # the output schema narrowed to this request's input (generate; see QuestionChoices)
    choices: QuestionChoices | None = None

    def key_params(self) -> dict[str, Any]:
        """Parameters that enter the cache key: sampling plus the output schema."""
        params = {
            **self.params.as_dict(),
            "output": self.output_model.__name__,
            "schema": schema_digest(self.output_model),
        }
        if self.choices is not None:
            params["choices"] = self.choices.digest
        return params

    def capped(self, max_tokens: int | None) -> LLMRequest[T]:
        """This request with ``max_tokens`` lowered to ``max_tokens`` (itself when it is
        None or not lower). The cap is a parameter like any other, in the cache key."""
        if max_tokens is None or max_tokens >= self.params.max_tokens:
            return self
        return replace(self, params=replace(self.params, max_tokens=max_tokens))

    def cache_key(self, model: str) -> str:
        # Memoised on the instance (the request is frozen, so the key cannot change): the
        # cache wrapper and the backend behind it both need it, and hashing the messages
        # is a measurable share of a request's CPU. Not a dataclass field: equality,
        # repr and the constructor are untouched.
        memo: dict[str, str] | None = self.__dict__.get("_cache_keys")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_cache_keys", memo)
        key = memo.get(model)
        if key is None:
            key = memo[model] = cache_key(
                model, self.prompt_version, self.messages, self.key_params())
        return key


@dataclass
class LLMResult(Generic[T]):
    """Outcome of one :class:`LLMRequest`: the output, or why there is none.

    ``attempts`` counts HTTP requests made (retries and the repair included), so retry
    storms are visible; tokens are summed over every response received.
    """

    stage: Stage
    prompt_version: str
    cache_key: str
    backend: str
    model: str
    output: T | None = None
    failure: FailureKind | None = None
    error: str | None = None
    raw_text: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
    attempts: int = 0
    response_format: str | None = None  # json_schema | json_object | offline
    repaired: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.output is not None

    @property
    def cacheable(self) -> bool:
        """Whether the ``llm_call`` cache may keep this result: an output, or the model's
        own unusable answer (:data:`MODEL_ANSWER_FAILURES`)."""
        return self.ok or self.failure in MODEL_ANSWER_FAILURES

    @classmethod
    def for_request(cls, request: LLMRequest[T], backend: str, model: str,
                    **fields: Any) -> LLMResult[T]:
        """A result carrying ``request``'s identity (stage, prompt version, cache key and
        key parameters for ``model``); ``fields`` set the rest."""
        return cls(stage=request.stage, prompt_version=request.prompt_version,
                   cache_key=request.cache_key(model), backend=backend, model=model,
                   params=request.key_params(), **fields)


@runtime_checkable
class LLMBackend(Protocol):
    """Anything that turns a request into a result; never raises for bad output."""

    name: str
    model: str

    async def complete(self, request: LLMRequest[T]) -> LLMResult[T]:
        """Run one request (retries, repair and concurrency limits are the backend's)."""
        ...


async def complete_all(
    backend: LLMBackend, requests: Iterable[LLMRequest[T]]
) -> list[LLMResult[T]]:
    """Run requests concurrently, results in request order.

    The backend bounds how many are in flight, so gathering them all is safe.
    """
    return list(await asyncio.gather(*(backend.complete(r) for r in requests)))


async def start(backend: LLMBackend) -> None:
    """Let a backend with something slow to set up (a client process) do it now.

    Optional for backends (a ``start()`` coroutine); a run calls this while it prepares,
    so its first requests do not wait for the setup. A no-op for the others.
    """
    starter = getattr(backend, "start", None)
    if starter is not None:
        await starter()
