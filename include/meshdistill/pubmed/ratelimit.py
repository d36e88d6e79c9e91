"""One NCBI request rate shared by every process, kept in Postgres.

NCBI allows 3 E-utilities requests per second per IP (or per API key) without a key and
10 with one; going over earns HTTP 429 and, if it persists, a block. The pipeline calls
NCBI from many places at once: one mapped ``pubmed_ingest`` task per subtree, backfill
runs beside the daily run, the CLI. So the limit has to hold across all of them:

* A per-process limiter (what ``Bio.Entrez`` has) would let N processes send N times
  the allowed rate.
* An Airflow pool caps how many tasks run at once, not how many requests they send per
  second: two slots can still send 20 requests/s between them.
* Under CeleryExecutor or KubernetesExecutor the workers are on different machines, so
  a lock file or a local semaphore does not reach them either.

Postgres is the one thing every worker already talks to (it is the pipeline's single
source of truth), so the schedule lives there: a row per limited service in
``rate_limit_slot`` holds the next free send time. Each request reserves a slot with one
atomic upsert in its own short autocommit transaction (the row lock is held for
microseconds, never while sleeping) and then sleeps until that slot. Slot times and "now"
both come from the database server's clock, so clock skew between workers does not
matter. Consecutive slots are exactly ``1/rate`` apart, whoever reserved them.
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


def ncbi_rate(api_key: str | None) -> float:
    """Requests per second NCBI allows: 10 with an API key, 3 without."""
    return NCBI_RATE_WITH_KEY if api_key else NCBI_RATE_WITHOUT_KEY


@dataclass(frozen=True)
class Slot:
    """A reserved send time.

    ``at`` is the slot in seconds since the epoch on the clock that issued it, ``waited``
    how long :meth:`RateLimiter.acquire` slept to reach it.
    """

    at: float
    waited: float


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
        self.interval = 1.0 / rate

    def reserve(self) -> tuple[float, float]:
        """Reserve the next free slot; return ``(slot, server_now)`` as epoch seconds."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            slot, now = conn.execute(
                self._RESERVE, {"name": self.name, "gap": self.interval}
            ).one()
        return float(slot), float(now)

    def acquire(self) -> Slot:
        """Block until this caller's reserved slot comes round."""
        slot, now = self.reserve()
        wait = max(0.0, slot - now)
        if wait > 0:
            time.sleep(wait)
        if wait > 5:
            log.info("rate limit %r: waited %.1f s for a slot", self.name, wait)
        return Slot(at=slot, waited=wait)


class LocalRateLimiter:
    """The same spacing within one process only (threads share it).

    For the CLI on a single machine with no database, and for tests of the HTTP client.
    It does NOT coordinate processes: the pipeline uses :class:`PostgresRateLimiter`.
    """

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> Slot:
        with self._lock:
            now = time.time()
            slot = max(self._next, now)
            self._next = slot + self.interval
        wait = max(0.0, slot - time.time())
        if wait > 0:
            time.sleep(wait)
        return Slot(at=slot, waited=wait)
