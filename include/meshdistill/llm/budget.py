"""A run budget in USD and/or tokens: stop making calls when it is spent, lose nothing.

Reserve, then settle: each call first reserves an estimate (prompt tokens from its text
plus the output it may produce, at the model's price) and is made only when that fits
next to what is already spent and reserved; when it returns, the reservation is settled
with the actual tokens and cost. Checking "spent < limit" alone would let all 32 calls in
flight start when there is room for one. Once a reservation does not fit, the budget is
exhausted for good: every later call is deferred, not made, so a run stops at a clear
point. A deferred call's result is a :class:`DeferredResult` (``deferred=True``, no
output, no failure kind); the stage marks the item deferred, the next run makes the call,
and nothing about it is cached. Methods take a ``threading.Lock`` for a few arithmetic
operations only, so coroutines and threads can share one budget. More: ``docs/llm.md``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, cast

from meshdistill.errors import ConfigError
from meshdistill.llm.backend import LLMRequest, LLMResult, T

DEFERRED_REASON = "deferred: budget exhausted"
CHARS_PER_TOKEN = 4  # rough but stable; actual usage replaces the estimate on settle
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per chat message


@dataclass
class DeferredResult(LLMResult[T]):
    """A call that was not made because the run budget is spent; retry it next run."""

    deferred: bool = True


def is_deferred(result: LLMResult[Any]) -> bool:
    """True for a call skipped by the budget (no output, not a failure: run it next time)."""
    return bool(getattr(result, "deferred", False))


def deferred_result(request: LLMRequest[T], backend: str, model: str) -> DeferredResult[T]:
    """The result returned instead of a call the budget does not allow."""
    return cast(DeferredResult[T], DeferredResult.for_request(
        request, backend, model, error=DEFERRED_REASON, attempts=0))


def estimate_prompt_tokens(request: LLMRequest[Any]) -> int:
    """Prompt tokens guessed from the message text (about 4 characters per token)."""
    chars = sum(len(m["content"]) for m in request.messages)
    return chars // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS * len(request.messages) + 1


@dataclass(frozen=True)
class Reservation:
    """What one admitted call holds against the budget until it is settled."""

    tokens: int
    usd: float


class Budget:
    """Limits for one run: ``usd`` and/or ``tokens`` (None means unlimited).

    ``expected_output_tokens`` is the output size a reservation assumes; by default the
    request's ``max_tokens``, the most a call can produce, which keeps the run inside the
    budget at the price of stopping a little early. A smaller figure lets more calls start
    near the end of the budget, with a bounded overshoot.
    """

    def __init__(
        self,
        *,
        usd: float | None = None,
        tokens: int | None = None,
        expected_output_tokens: int | None = None,
    ) -> None:
        if usd is not None and usd < 0:
            raise ConfigError(f"budget usd must be >= 0, got {usd}")
        if tokens is not None and tokens < 0:
            raise ConfigError(f"budget tokens must be >= 0, got {tokens}")
        if expected_output_tokens is not None and expected_output_tokens < 0:
            raise ConfigError("expected_output_tokens must be >= 0")
        self.limit_usd = usd
        self.limit_tokens = tokens
        self.expected_output_tokens = expected_output_tokens
        self._lock = threading.Lock()
        self.spent_usd = 0.0
        self.spent_tokens = 0
        self._reserved_usd = 0.0
        self._reserved_tokens = 0
        self.calls = 0  # calls admitted
        self.deferred = 0  # calls refused
        self._exhausted = False

    @property
    def exhausted(self) -> bool:
        """True once a call has been refused; stays true for the rest of the run."""
        with self._lock:
            return self._exhausted

    def output_estimate(self, request: LLMRequest[Any]) -> int:
        if self.expected_output_tokens is not None:
            return self.expected_output_tokens
        return request.params.max_tokens

    def try_reserve(self, tokens: int, usd: float) -> Reservation | None:
        """Admit a call estimated at ``tokens``/``usd``, or refuse it (None) for good."""
        with self._lock:
            if not self._exhausted:
                fits_tokens = self.limit_tokens is None or (
                    self.spent_tokens + self._reserved_tokens + tokens <= self.limit_tokens)
                fits_usd = self.limit_usd is None or (
                    self.spent_usd + self._reserved_usd + usd <= self.limit_usd + 1e-12)
                if fits_tokens and fits_usd:
                    self._reserved_tokens += tokens
                    self._reserved_usd += usd
                    self.calls += 1
                    return Reservation(tokens, usd)
                self._exhausted = True
            self.deferred += 1
            return None

    def settle(self, reservation: Reservation, tokens: int, usd: float) -> None:
        """Replace a reservation by what the call actually used (failed calls cost too)."""
        with self._lock:
            self._reserved_tokens -= reservation.tokens
            self._reserved_usd -= reservation.usd
            self.spent_tokens += tokens
            self.spent_usd += usd

    def snapshot(self) -> dict[str, Any]:
        """Figures for logs and task summaries."""
        with self._lock:
            return {
                "limit_usd": self.limit_usd, "limit_tokens": self.limit_tokens,
                "spent_usd": round(self.spent_usd, 6), "spent_tokens": self.spent_tokens,
                "calls": self.calls, "deferred": self.deferred, "exhausted": self._exhausted,
            }

    def __repr__(self) -> str:
        return f"Budget({self.snapshot()})"
