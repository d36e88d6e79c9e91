"""Embeddings from an OpenAI-compatible ``/embeddings`` endpoint, via the official SDK.

Used by vector retrieval (:mod:`meshdistill.distill.vector`). The SDK's own retries are
off: 429, 408/409, 5xx, timeouts and connection errors are retried with the policy of
:mod:`meshdistill.llm.retrying` (exponential backoff with jitter, at least
``Retry-After``), shared with the chat backend. Inputs go out in batches with at most
``max_concurrency`` requests in flight per embedder. It is synchronous and thread-safe,
since retrieval runs in worker threads. The API key is never logged or put in a repr.
"""

from __future__ import annotations

import array
import base64
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import openai
from openai import OpenAI

from meshdistill.errors import ConfigError, MeshDistillError
from meshdistill.llm.config import OPENAI_API_URL
from meshdistill.llm.retrying import RetryPolicy

DEFAULT_BATCH_SIZE = 128
DEFAULT_CONCURRENCY = 4
DEFAULT_MAX_INPUT_CHARS = 6000


class EmbeddingError(MeshDistillError):
    """The embeddings endpoint kept failing, or answered something unusable."""


@dataclass
class EmbedderStats:
    """What an embedder has done so far (all threads together)."""

    requests: int = 0  # logical requests (one batch each), successful or not
    attempts: int = 0  # HTTP attempts, retries included
    inputs: int = 0
    tokens: int = 0

def truncate(value: str, max_chars: int) -> str:
    """``value`` cut to at most ``max_chars`` characters, at a word boundary if one is near."""
    if len(value) <= max_chars:
        return value
    cut = value[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars * 0.8 else cut


class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible ``/embeddings`` endpoint via the official SDK.

    ``dimensions`` is sent to the server (OpenAI's text-embedding-3 models shorten their
    vectors to it; other servers may ignore it: the vectors' real length is checked
    against the table). ``encoding_format`` defaults to ``"float"``, which every
    OpenAI-compatible server understands; ``"base64"`` is smaller on the wire.
    """

    name = "openai"

    def __init__(
        self,
        *,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        organization: str | None = None,
        dimensions: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = 60.0,
        max_attempts: int = 6,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        max_input_chars: int = DEFAULT_MAX_INPUT_CHARS,
        encoding_format: Literal["float", "base64"] = "float",
    ) -> None:
        resolved = model or os.environ.get("MESHDISTILL_EMBEDDING_MODEL")
        if not resolved:
            raise ConfigError(
                "no embedding model: pass model= or set MESHDISTILL_EMBEDDING_MODEL")
        if batch_size < 1 or max_concurrency < 1 or max_attempts < 1 or max_input_chars < 1:
            raise ConfigError("batch_size, max_concurrency, max_attempts and max_input_chars "
                              "must be at least 1")
        if dimensions is not None and dimensions < 1:
            raise ConfigError(f"dimensions must be at least 1, got {dimensions}")
        self.model = resolved
        self.base_url = (base_url or os.environ.get("MESHDISTILL_EMBEDDING_BASE_URL")
                         or os.environ.get("OPENAI_BASE_URL") or None)
        # Local servers accept any key; the SDK insists on one.
        self._api_key = (api_key or os.environ.get("MESHDISTILL_EMBEDDING_API_KEY")
                         or os.environ.get("OPENAI_API_KEY") or "unused")
        self.organization = organization or os.environ.get("OPENAI_ORG_ID") or None
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.max_input_chars = max_input_chars
        self.encoding_format = encoding_format
        self.stats = EmbedderStats()
        self._dim: int | None = None
        self._client: OpenAI | None = None
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency)

    def __repr__(self) -> str:  # never the key
        return (f"OpenAIEmbedder(model={self.model!r}, base_url={self.base_url!r}, "
                f"dimensions={self.dimensions}, batch_size={self.batch_size}, "
                f"max_concurrency={self.max_concurrency})")

    # -- lifecycle -------------------------------------------------------------------------

    def _get_client(self) -> OpenAI:
        with self._lock:
            if self._client is None:
                self._client = OpenAI(
                    api_key=self._api_key, base_url=self.base_url or OPENAI_API_URL,
                    organization=self.organization, timeout=self.timeout, max_retries=0,
                )
            return self._client

    def close(self) -> None:
        """Close the pooled HTTP connections (a later call opens new ones)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> OpenAIEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def retry_policy(self) -> RetryPolicy:
        """Attempts, backoff and Retry-After cap (:mod:`meshdistill.llm.retrying`)."""
        return RetryPolicy(self.max_attempts, self.backoff_initial, self.backoff_max,
                           self.max_retry_after)

    # -- embedding -------------------------------------------------------------------------

    def dimension(self) -> int:
        """Length of this model's vectors: seen in a reply, configured, or probed once."""
        if self._dim is None and self.dimensions is None:
            self.embed_batch(["dimension probe"])
        return self._dim or self.dimensions or 0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order: batches of ``batch_size``, run concurrently."""
        batches = [list(texts[i:i + self.batch_size])
                   for i in range(0, len(texts), self.batch_size)]
        if len(batches) <= 1:
            return self.embed_batch(batches[0]) if batches else []
        with ThreadPoolExecutor(min(self.max_concurrency, len(batches)),
                                thread_name_prefix="embed") as pool:
            parts = list(pool.map(self.embed_batch, batches))
        return [v for part in parts for v in part]

    def embed_batch(self, texts: Sequence[str]) -> list[list[float]]:
        """One request (retried) for at most ``batch_size`` non-blank texts."""
        if not texts:
            return []
        if len(texts) > self.batch_size:
            raise ValueError(f"{len(texts)} inputs exceed batch_size={self.batch_size}")
        inputs = [truncate(t, self.max_input_chars) for t in texts]
        if any(not t.strip() for t in inputs):
            raise ValueError("cannot embed a blank text (servers reject empty inputs)")
        with self._lock:
            self.stats.requests += 1
            self.stats.inputs += len(inputs)
        kwargs: dict[str, Any] = {"model": self.model, "input": inputs,
                                  "encoding_format": self.encoding_format}
        if self.dimensions is not None:
            kwargs["dimensions"] = self.dimensions
        client = self._get_client()
        attempts = 0
        try:
            for attempt in self.retry_policy.retrying():
                with attempt:
                    attempts += 1
                    with self._lock:
                        self.stats.attempts += 1
                    with self._slots:
                        response = client.embeddings.create(**kwargs)
        except openai.APIError as exc:
            raise EmbeddingError(self._describe(exc, attempts)) from exc
        except ValueError as exc:  # a 200 whose body is not JSON
            raise EmbeddingError(
                f"embeddings at {self.base_url or 'the OpenAI API'}: unreadable reply "
                f"({type(exc).__name__}: {exc})"[:500]) from exc
        vectors = self._vectors(response, len(inputs))
        with self._lock:
            self.stats.tokens += response.usage.prompt_tokens if response.usage else 0
        return vectors

    def _vectors(self, response: Any, expected: int) -> list[list[float]]:
        data = sorted(response.data or [], key=lambda d: d.index)
        if len(data) != expected or [d.index for d in data] != list(range(expected)):
            raise EmbeddingError(
                f"{self.base_url or 'the embeddings endpoint'} returned {len(data)} "
                f"embeddings for {expected} inputs")
        vectors: list[list[float]] = []
        for item in data:
            raw = item.embedding
            vector = (array.array("f", base64.b64decode(raw)).tolist()
                      if isinstance(raw, str) else [float(x) for x in raw])
            vectors.append(vector)
        dims = {len(v) for v in vectors}
        if len(dims) != 1 or 0 in dims:
            raise EmbeddingError(f"embeddings of unequal or zero length: {sorted(dims)}")
        (dim,) = dims
        with self._lock:
            if self._dim is None:
                self._dim = dim
            elif self._dim != dim:
                raise EmbeddingError(
                    f"model {self.model!r} returned {dim}-dimensional embeddings after "
                    f"{self._dim}-dimensional ones")
        return vectors

    def _describe(self, exc: openai.APIError, attempts: int) -> str:
        where = self.base_url or "the OpenAI API"
        if isinstance(exc, openai.APIStatusError):
            asked = self.retry_policy.beyond_cap(exc)
            if asked is not None:
                return (f"embeddings at {where}: HTTP {exc.status_code} asks to retry after "
                        f"{asked:g}s, beyond the {self.max_retry_after:g}s cap")
            detail = f"HTTP {exc.status_code}: {exc.message}"[:500]
        elif isinstance(exc, openai.APITimeoutError):
            detail = f"timed out after {self.timeout:g}s"
        else:
            detail = f"{type(exc).__name__}: {exc}"[:500]
        return (f"embeddings with model {self.model!r} at {where} failed after {attempts} "
                f"attempt(s): {detail}")
