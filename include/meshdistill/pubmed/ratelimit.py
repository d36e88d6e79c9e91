"""One NCBI request rate shared by every process, kept in Postgres.

NCBI allows 3 E-utilities requests per second without an API key and 10 with one; more
earns HTTP 429 and, if it persists, a block. Mapped tasks, backfills and the CLI call it
at once, possibly from several machines, and neither a per-process limiter nor an Airflow
pool (it caps tasks, not requests per second) holds the rate across them. Postgres, which
every worker already talks to, does: a row per service in ``rate_limit_slot`` holds the
next free send time; each request reserves a slot with one atomic upsert in its own short
transaction, on the database server's clock, then sleeps until it. NCBI counts arrivals,
which trail their slots by a sleep overshoot and a send time that vary under load: slots
are ``(1 + MARGIN)/rate`` apart, and a caller woken more than ``MARGIN/2`` late takes a
new slot instead of sending, so ``rate`` consecutive arrivals span a second despite up to
``MARGIN/2`` of send jitter. After ``_MAX_TRIES`` late wakes in a row (an overloaded
machine) it sends anyway and logs a warning; a 429 then is retried like any other.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

NCBI_RATE_WITHOUT_KEY = 3.0
NCBI_RATE_WITH_KEY = 10.0
DEFAULT_NAME = "ncbi-eutils"
MARGIN = 0.1  # seconds of arrival jitter the spacing absorbs (see module docstring)
SPACING = 1.0 + MARGIN  # slot spacing in units of 1/rate
LATE = MARGIN / 2  # a caller woken later than this after its slot takes a new one
_MAX_TRIES = 5  # late wakes in a row before going anyway (the machine is overloaded)


def ncbi_rate(api_key: str | None) -> float:
    """Requests per second NCBI allows: 10 with an API key, 3 without."""
    return NCBI_RATE_WITH_KEY if api_key else NCBI_RATE_WITHOUT_KEY


@dataclass(frozen=True)
class Slot:
    """A reserved send time.

    ``at`` is the slot in seconds since the epoch on the clock that issued it, ``waited``
    how long :meth:`RateLimiter.acquire` slept to reach it (all its tries), ``tries`` how
    many slots it reserved (more than one after waking too late for a slot).
    """

    at: float
    waited: float
    tries: int = 1


class RateLimiter(Protocol):
    """Anything that blocks until the caller may send its next request."""

    rate: float

    def acquire(self) -> Slot: ...


class PostgresRateLimiter:
    """The shared limiter: slots reserved in ``rate_limit_slot`` (see module docstring).

    ``engine`` must be an engine, not a connection in the caller's transaction: the
    reservation has to commit at once to be seen by the other workers, whatever the
    caller's transaction does later.
    """

    _RESERVE = text(
        """
        INSERT INTO rate_limit_slot AS s (name, next_slot)
        VALUES (:name, clock_timestamp() + make_interval(secs => :gap))
        ON CONFLICT (name) DO UPDATE
            SET next_slot = greatest(s.next_slot, clock_timestamp())
                            + make_interval(secs => :gap)
        RETURNING extract(epoch FROM s.next_slot - make_interval(secs => :gap))::float8,
                  extract(epoch FROM clock_timestamp())::float8
        """
    )

    def __init__(self, engine: Engine | str, rate: float, *, name: str = DEFAULT_NAME) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if isinstance(engine, str):
            from meshdistill.store.db import get_engine

            engine = get_engine(engine)
        self.engine = engine
        self.rate = rate
        self.name = name
        self.interval = SPACING / rate

    def reserve(self) -> tuple[float, float]:
        """Reserve the next free slot; return ``(slot, server_now)`` as epoch seconds."""
        slot, now, _ = self._reserve()
        return slot, now

    def _reserve(self) -> tuple[float, float, float]:
        """``reserve`` and the local monotonic time just before sending the statement."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            sent = time.monotonic()
            slot, now = conn.execute(
                self._RESERVE, {"name": self.name, "gap": self.interval}
            ).one()
        return float(slot), float(now), sent

    def acquire(self) -> Slot:
        """Block until this caller's reserved slot comes round (a new slot if woken late).

        Lateness is bounded from above: the server's ``now`` is taken as the moment the
        statement is sent, so a slow round trip counts as late as well.
        """
        waited = 0.0
        tries = 0
        while True:
            tries += 1
            slot, now, sent = self._reserve()
            wait = max(0.0, slot - now)
            if wait > 0:
                time.sleep(wait)
            waited += wait
            late = time.monotonic() - sent - wait
            if late <= LATE:
                break
            if tries == _MAX_TRIES:
                log.warning("rate limit %r: %d slots in a row missed by over %.2f s "
                            "(overloaded machine?); sending anyway", self.name, tries, LATE)
                break
            log.debug("rate limit %r: %.3f s late for a slot, reserving another", self.name, late)
        if waited > 5:
            log.info("rate limit %r: waited %.1f s for a slot", self.name, waited)
        return Slot(at=slot, waited=waited, tries=tries)


class LocalRateLimiter:
    """The same spacing within one process only (threads share it).

    For the CLI on a single machine with no database, and for tests of the HTTP client.
    It does NOT coordinate processes: the pipeline uses :class:`PostgresRateLimiter`.
    """

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.interval = SPACING / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> Slot:
        waited = 0.0
        tries = 0
        while True:
            tries += 1
            with self._lock:
                slot = max(self._next, time.time())
                self._next = slot + self.interval
            wait = max(0.0, slot - time.time())
            if wait > 0:
                time.sleep(wait)
            waited += wait
            if time.time() - slot <= LATE or tries == _MAX_TRIES:
                return Slot(at=slot, waited=waited, tries=tries)
