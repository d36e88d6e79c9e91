"""The retry policy shared by the OpenAI-compatible clients (chat backend and embedder).

Both turn the SDK's own retries off (``max_retries=0``) and retry here instead: 429,
408/409, 5xx, timeouts and connection errors, with exponential backoff and jitter,
waiting at least what the server asks for (``retry-after-ms`` or ``Retry-After``), for
at most ``max_attempts`` attempts. A ``Retry-After`` beyond ``max_retry_after`` is not
slept through: the caller decides what it becomes (the chat backend a ``rate_limited``
failure, the embedder an ``EmbeddingError``).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import openai
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
)

from meshdistill.httputil import parse_retry_after

RETRY_STATUS = frozenset({408, 409, 429})
"""Statuses retried besides every 5xx."""

TooLong = Callable[[float, openai.APIStatusError], BaseException]
"""Builds the exception raised for a ``Retry-After`` beyond the cap: (seconds, cause)."""


def retry_after_seconds(exc: BaseException) -> float | None:
    """The wait a 429/503 asks for: ``retry-after-ms``, ``Retry-After`` seconds or HTTP date."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


FORMAT_HINTS = ("response_format", "json_schema", "json_object")
"""Words by which a server's error names the request's response format."""
REQUEST_HINTS = (*FORMAT_HINTS, "structured", "schema")
"""What a 400 or 422 may say instead: a request error about structured outputs or the
schema is about the format too. A 5xx must name the format itself, since a server error
that merely mentions a schema is no refusal."""


def refuses_response_format(exc: BaseException) -> bool:
    """A 400 or 422 about the response format, or a 5xx that names it: the server cannot
    take the request in this shape, and the same request would fail the same way again
    (llama.cpp's Python server answers ``json_schema`` with a 500 saying ``Input should
    be 'text' or 'json_object'``)."""
    if not isinstance(exc, openai.APIStatusError):
        return False
    hints: tuple[str, ...]
    if exc.status_code in (400, 422):
        hints = REQUEST_HINTS
    elif exc.status_code >= 500:
        hints = FORMAT_HINTS
    else:
        return False
    text = f"{exc.message} {json.dumps(exc.body, default=str)}".lower()
    return any(hint in text for hint in hints)


def retryable(exc: BaseException) -> bool:
    """Worth another attempt: connection errors, timeouts, 408/409/429 and 5xx (but not
    a refused response format)."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        if refuses_response_format(exc):
            return False
        return exc.status_code in RETRY_STATUS or exc.status_code >= 500
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts, backoff and the ``Retry-After`` cap of one client."""

    max_attempts: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0

    def wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter, but at least the server's ``Retry-After``."""
        exc = state.outcome.exception() if state.outcome else None
        return self.delay(state.attempt_number, exc)

    def delay(self, attempt_number: int, exc: BaseException | None) -> float:
        """The wait after failed attempt ``attempt_number`` (1-based) with ``exc``."""
        backoff = min(self.backoff_max, self.backoff_initial * 2 ** (attempt_number - 1))
        backoff *= 0.5 + random.random() / 2  # jitter: spread synchronized retries
        asked = retry_after_seconds(exc) if exc is not None else None
        return max(backoff, asked) if asked is not None else backoff

    async def call(self, fn: Callable[[], Awaitable[Any]],
                   too_long: TooLong | None = None) -> Any:
        """Await ``fn()`` under this policy: the async twin of :meth:`retrying`.

        Same attempts, same waits (:meth:`delay`), same errors (the last one re-raised
        when attempts run out; ``too_long(seconds, error)`` for a ``Retry-After`` beyond
        the cap, else that error itself). Not tenacity's ``AsyncRetrying``: building and
        driving one costs about 0.1 ms of event-loop CPU per call, paid by every request
        although almost none is retried; this loop costs nothing until an attempt fails.
        """
        attempt = 1
        while True:
            try:
                return await fn()
            except Exception as exc:
                asked = self.beyond_cap(exc)
                if asked is not None and too_long is not None:
                    assert isinstance(exc, openai.APIStatusError)
                    raise too_long(asked, exc) from exc
                if not self.retryable(exc) or attempt >= self.max_attempts:
                    raise
                wait = self.delay(attempt, exc)
            await asyncio.sleep(wait)
            attempt += 1

    def beyond_cap(self, exc: BaseException) -> float | None:
        """The ``Retry-After`` of a retryable ``exc`` when it exceeds the cap, else None."""
        if not retryable(exc):
            return None
        asked = retry_after_seconds(exc)
        return asked if asked is not None and asked > self.max_retry_after else None

    def retryable(self, exc: BaseException) -> bool:
        """Retry ``exc``: retryable, and not asking to wait beyond the cap."""
        return retryable(exc) and self.beyond_cap(exc) is None

    def retrying(self, too_long: TooLong | None = None) -> Retrying:
        """A synchronous tenacity loop that re-raises the last error when attempts run out.

        A ``Retry-After`` beyond the cap ends the loop at once: with the error itself, or
        with ``too_long(seconds, error)`` (raised from the error) when given.
        """
        return Retrying(**self._tenacity(too_long))

    def _tenacity(self, too_long: TooLong | None) -> dict[str, Any]:
        def should_retry(exc: BaseException) -> bool:
            asked = self.beyond_cap(exc)
            if asked is not None and too_long is not None:
                assert isinstance(exc, openai.APIStatusError)
                raise too_long(asked, exc) from exc
            return self.retryable(exc)

        return {"stop": stop_after_attempt(self.max_attempts), "wait": self.wait,
                "retry": retry_if_exception(should_retry), "reraise": True}
