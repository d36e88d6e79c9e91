"""The Postgres response cache (table ``llm_call``) as a wrapper around any backend.

:class:`CachedBackend` implements :class:`~meshdistill.llm.backend.LLMBackend` itself, so
stages do not know whether an answer came from the server or from the cache. A rerun, an
Airflow retry or a backfill makes no new call for work already done: every success is
stored under ``request.cache_key(model)``, and a hit returns it parsed, as a
:class:`CachedResult` with ``attempts=0``. Failures are returned but never stored, so the
next run retries them. Identical calls in flight in one loop share one call; across
processes ``INSERT ... ON CONFLICT DO NOTHING`` keeps one row. The budget is consulted on
a miss only. Each row carries its cost (:class:`~meshdistill.llm.pricing.Pricing`), so the
table is also the ledger :func:`usage` sums. Database work is synchronous psycopg2 in a
small thread pool, never on the event loop, and group-committed, so 32 calls in flight
cost a few round trips; when :meth:`CachedBackend.complete` returns a fresh success, its
row is committed. Why each piece: ``docs/llm.md``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any, Generic, TypeVar, cast

from psycopg2.extras import Json, execute_values
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, text

from meshdistill.errors import ConfigError
from meshdistill.llm.backend import FailureKind, LLMBackend, LLMRequest, LLMResult, T
from meshdistill.llm.backend import start as start_backend
from meshdistill.llm.budget import (
    Budget,
    Reservation,
    deferred_result,
    estimate_prompt_tokens,
    is_deferred,
)
from meshdistill.llm.pricing import Pricing, default_pricing
from meshdistill.llm.stages import narrowed
from meshdistill.store.bulk import upsert_sql, values_template

log = logging.getLogger(__name__)

R = TypeVar("R")
In = TypeVar("In")
Out = TypeVar("Out")

_SELECT = ("SELECT cache_key, backend, model, prompt_version, params, output, raw, "
           "tokens_in, tokens_out, latency_ms, failure, error FROM llm_call")
_LOOKUP_SQL = f"{_SELECT} WHERE cache_key = ANY(%s)"  # columns in _Row's field order
_INSERT_COLUMNS = ("cache_key", "stage", "backend", "model", "prompt_version", "params",
                   "output", "raw", "tokens_in", "tokens_out", "cost_usd", "latency_ms",
                   "attempts", "failure", "error", "subtree")  # _row_of's keys, in order
_JSON_COLUMNS = frozenset({"params", "output"})
_INSERT_SQL, _UPSERT_SQL = (
    upsert_sql("llm_call", _INSERT_COLUMNS, ("cache_key",), update=update,
               touch="created_at", returning=("cache_key",))
    for update in (False, True))
_INSERT_TEMPLATE = values_template(_INSERT_COLUMNS, dict.fromkeys(_JSON_COLUMNS, "::jsonb"))


def _values_of(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(Json(row[c]) if c in _JSON_COLUMNS else row[c] for c in _INSERT_COLUMNS)


class _GroupRunner(Generic[In, Out]):
    """Group commit: items queued while a batch is in the database go in the next batch.

    Why: one transaction (and one fsync) per stored call, or one round trip per lookup,
    makes the cache the bottleneck at 32 calls in flight (about 60% of a bare SDK loop's
    request rate on the bench). Batching what arrives meanwhile keeps each caller's guarantee
    (when its ``await`` returns, its row is committed / its lookup done) at a fraction
    of the database work. One batch runs at a time per event loop.
    """

    def __init__(self, run: Callable[[list[In]], Awaitable[list[Out]]]) -> None:
        self._run = run
        self._queue: list[tuple[In, asyncio.Future[Out]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def __call__(self, item: In) -> Out:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                outputs = await self._run([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in [*batch, *self._queue]:
                    future.cancel()
                self._queue = []
                raise
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), output in zip(batch, outputs, strict=True):
                if not future.done():
                    future.set_result(output)


@dataclass
class CachedResult(LLMResult[T]):
    """A result served from ``llm_call`` (or shared with an identical call in flight)."""

    cached: bool = True


def is_cached(result: LLMResult[Any]) -> bool:
    """True when no call was made for this result in this run."""
    return bool(getattr(result, "cached", False))


@dataclass(frozen=True)
class _Row:
    cache_key: str
    backend: str
    model: str
    prompt_version: str
    params: dict[str, Any]
    output: Any
    raw: str | None
    tokens_in: int
    tokens_out: int
    latency_ms: int
    failure: str | None
    error: str | None


_Lookups = _GroupRunner[str, "_Row | None"]
_Stores = _GroupRunner[tuple[dict[str, Any], bool], bool]


def _row_of(result: LLMResult[Any], cost: float, subtree: str | None) -> dict[str, Any]:
    """The ``llm_call`` row of a :attr:`~LLMResult.cacheable` result (a failure: output
    JSON ``null``, its kind and error kept), paid for by ``subtree``'s run."""
    assert result.cacheable
    return {
        "cache_key": result.cache_key, "stage": str(result.stage), "backend": result.backend,
        "model": result.model, "prompt_version": result.prompt_version, "params": result.params,
        "output": None if result.output is None else result.output.model_dump(mode="json"),
        "raw": result.raw_text, "tokens_in": result.tokens_in, "tokens_out": result.tokens_out,
        "cost_usd": round(cost, 6), "latency_ms": round(result.latency_ms),
        "attempts": result.attempts,
        "failure": None if result.failure is None else str(result.failure),
        "error": result.error, "subtree": subtree,
    }


def _as_cached(result: LLMResult[T]) -> CachedResult[T]:
    copy = CachedResult(**{f.name: getattr(result, f.name) for f in fields(LLMResult)})
    copy.attempts = 0
    if copy.output is not None:  # callers may mutate their output; do not alias it
        copy.output = copy.output.model_copy(deep=True)
    copy.params = dict(copy.params)
    return copy


def _shared(result: LLMResult[T]) -> LLMResult[T]:
    """What a caller that waited on an identical in-flight call receives."""
    if result.ok:
        return _as_cached(result)
    # a failure or a deferral: same outcome, but this caller made no request
    return replace(result, attempts=0, params=dict(result.params))


class CachedBackend:
    """``inner`` behind the ``llm_call`` cache, an optional run budget and cost accounting.

    ``engine_or_url`` is an Engine, a database URL or None (the configured database);
    URLs go through :func:`meshdistill.store.db.get_engine`, which migrates to head.
    ``max_output_tokens`` lowers every request's ``max_tokens`` before it is keyed and
    sent (:meth:`LLMRequest.capped`): a small local model that loops inside a string then
    holds its server for that many tokens, not for the stage's own limit.
    ``narrow_schema`` narrows each generate request's output schema to its input the same
    way (:func:`~meshdistill.llm.stages.narrowed`), for servers that constrain decoding to
    the schema. ``subtree`` is recorded on every call this backend stores (who paid for it).
    """

    def __init__(
        self,
        inner: LLMBackend,
        engine_or_url: Engine | str | None,
        *,
        budget: Budget | None = None,
        pricing: Pricing | None = None,
        db_threads: int = 4,
        max_output_tokens: int | None = None,
        narrow_schema: bool = False,
        subtree: str | None = None,
    ) -> None:
        if max_output_tokens is not None and max_output_tokens < 16:
            raise ConfigError(f"max_output_tokens must be at least 16, got {max_output_tokens}")
        self.max_output_tokens = max_output_tokens
        self.narrow_schema = narrow_schema
        self.subtree = subtree
        if isinstance(engine_or_url, Engine):
            self.engine = engine_or_url
        else:
            from meshdistill.store.db import get_engine

            self.engine = get_engine(engine_or_url)
        self.inner = inner
        self.name: str = inner.name
        self.model: str = inner.model
        self.budget = budget
        self.pricing = pricing or default_pricing()
        self._db_threads = db_threads
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._inflight: dict[tuple[int, str], asyncio.Task[Any]] = {}
        self._loop_runners: dict[int, tuple[_Lookups, _Stores]] = {}
        self._stats_lock = threading.Lock()
        # tokens_in/tokens_out: what the backend reported for the calls this instance
        # made (failed ones too); cache hits cost nothing and add nothing.
        self.stats = {"hits": 0, "misses": 0, "shared": 0, "deferred": 0, "stored": 0,
                      "failed": 0, "tokens_in": 0, "tokens_out": 0}

    def __repr__(self) -> str:
        return f"CachedBackend({self.inner!r}, budget={self.budget!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the database threads (the engine is shared and stays open)."""
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    async def start(self) -> None:
        """Set up the inner backend now (see :func:`meshdistill.llm.backend.start`)."""
        await start_backend(self.inner)

    async def aclose(self) -> None:
        """Close the inner backend's client (if it has one) and the database threads."""
        closer = getattr(self.inner, "aclose", None)
        if closer is not None:
            await closer()
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> CachedBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- database ----------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., R], *args: Any) -> R:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._db_threads, thread_name_prefix="llm-cache")
            executor = self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _lookup(self, keys: list[str]) -> dict[str, _Row]:
        # Plain psycopg2 on a pooled connection: SQLAlchemy's statement building and row
        # mapping cost more CPU (and GIL time taken from the event loop) than the query.
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(_LOOKUP_SQL, (keys,))
            found = {r[0]: _Row(*r) for r in cur.fetchall()}
            cur.close()
            raw.rollback()  # end the read-only transaction before the pool gets it back
            return found
        finally:
            raw.close()

    async def _lookup_batch(self, keys: list[str]) -> list[_Row | None]:
        found = await self._db(self._lookup, sorted(set(keys)))
        return [found.get(key) for key in keys]

    def _store(self, items: list[tuple[dict[str, Any], bool]]) -> list[bool]:
        """Insert rows in one transaction; True for each row this call inserted.

        ``ON CONFLICT DO NOTHING``: a task racing us on the same key has stored the same
        answer already. Rows replacing an entry that fails to validate are updated.

        One multi-row ``INSERT`` per batch through psycopg2's ``execute_values`` on a
        pooled connection (SQLAlchemy's multi-values insert compiles a fresh statement for
        every batch: most of a batch's 14-18 ms, in a thread holding the GIL the event
        loop needs). ``synchronous_commit = off`` for this transaction only: the commit returns
        without waiting for the WAL flush. The row is still committed and visible to
        every other session when this returns (the caller's guarantee); what is relaxed
        is durability across a server crash in the next few hundred milliseconds, which
        costs at most a repeated LLM call, since a missing cache row only means a miss.
        The rows a run's results depend on (``qa_item``, ``preference_pair``) are written
        elsewhere, with normal durable commits.
        """
        keep = [row for row, replace_existing in items if not replace_existing]
        stale = [row for row, replace_existing in items if replace_existing]
        inserted: set[str] = set()
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute("SET LOCAL synchronous_commit = off")
            for rows, sql in ((keep, _INSERT_SQL), (stale, _UPSERT_SQL)):
                if rows:
                    returned = execute_values(
                        cur, sql, [_values_of(row) for row in rows],
                        template=_INSERT_TEMPLATE, page_size=len(rows), fetch=True)
                    inserted.update(r[0] for r in returned)
            cur.close()
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            raw.close()
        return [row["cache_key"] in inserted for row, _ in items]

    async def _store_batch(self, items: list[tuple[dict[str, Any], bool]]) -> list[bool]:
        return await self._db(self._store, items)

    def _runners(self) -> tuple[_Lookups, _Stores]:
        """This event loop's batchers (futures and tasks belong to one loop)."""
        loop_id = id(asyncio.get_running_loop())
        runners = self._loop_runners.get(loop_id)
        if runners is None:
            runners = (_GroupRunner(self._lookup_batch), _GroupRunner(self._store_batch))
            self._loop_runners[loop_id] = runners
        return runners

    # -- accounting --------------------------------------------------------------------------

    def cost_of(self, model: str, tokens_in: int, tokens_out: int) -> float:
        """USD for a call of this backend (the offline backend never costs anything)."""
        if self.inner.name == "offline":
            return 0.0
        return self.pricing.cost_usd(model, tokens_in, tokens_out)

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    # -- the interface -----------------------------------------------------------------------

    async def complete(self, request: LLMRequest[T]) -> LLMResult[T]:
        """Cached output, a deferral, or the inner backend's result (stored when
        :attr:`~LLMResult.cacheable`)."""
        request = request.capped(self.max_output_tokens)
        if self.narrow_schema:
            request = narrowed(request)
        key = request.cache_key(self.model)
        slot = (id(asyncio.get_running_loop()), key)
        task = self._inflight.get(slot)
        if task is not None:
            self._count("shared")
            return _shared(cast(LLMResult[T], await asyncio.shield(task)))
        task = asyncio.ensure_future(self._resolve(request, key))
        self._inflight[slot] = task
        task.add_done_callback(lambda _: self._inflight.pop(slot, None))
        # shield: if this caller is cancelled, callers sharing the task still get it
        return cast(LLMResult[T], await asyncio.shield(task))

    def _from_row(self, request: LLMRequest[T], row: _Row) -> CachedResult[T] | None:
        output: T | None = None
        if row.failure is None:
            try:
                output = request.output_model.model_validate(row.output)
            except ValidationError as exc:
                log.warning("cached llm_call %s no longer validates as %s; calling again: %s",
                            row.cache_key[:12], request.output_model.__name__, exc)
                return None
        return CachedResult(
            stage=request.stage, prompt_version=row.prompt_version, cache_key=row.cache_key,
            backend=row.backend, model=row.model, output=output, raw_text=row.raw,
            failure=None if row.failure is None else FailureKind(row.failure),
            error=row.error, tokens_in=row.tokens_in, tokens_out=row.tokens_out,
            latency_ms=float(row.latency_ms), attempts=0, params=dict(row.params),
        )

    async def _resolve(self, request: LLMRequest[T], key: str) -> LLMResult[T]:
        row = await self._runners()[0](key)
        stale = False
        if row is not None:
            hit = self._from_row(request, row)
            if hit is not None:
                self._count("hits")
                return hit
            stale = True
        self._count("misses")
        reservation = self._reserve(request)
        if self.budget is not None and reservation is None:
            self._count("deferred")
            return deferred_result(request, self.name, self.model)
        try:
            result = await self.inner.complete(request)
        except BaseException:
            if reservation is not None and self.budget is not None:
                # the request may have reached the server: keep the estimate as spent
                self.budget.settle(reservation, reservation.tokens, reservation.usd)
            raise
        self._count("tokens_in", result.tokens_in)
        self._count("tokens_out", result.tokens_out)
        cost = self.cost_of(result.model, result.tokens_in, result.tokens_out)
        if reservation is not None and self.budget is not None:
            self.budget.settle(reservation, result.tokens_in + result.tokens_out, cost)
        if not result.ok:
            self._count("failed")
        if is_deferred(result) or not result.cacheable:
            return result
        # the key we look up by
        row_values = _row_of(result, cost, self.subtree) | {"cache_key": key}
        if await self._runners()[1]((row_values, stale)):
            self._count("stored")
        return result

    def _reserve(self, request: LLMRequest[Any]) -> Reservation | None:
        if self.budget is None:
            return None
        tokens_in = estimate_prompt_tokens(request)
        tokens_out = self.budget.output_estimate(request)
        usd = self.cost_of(self.model, tokens_in, tokens_out)
        return self.budget.try_reserve(tokens_in + tokens_out, usd)


def usage(conn: Connection, *, model: str | None = None) -> dict[str, Any]:
    """Calls, tokens and cost recorded in ``llm_call`` (for ``status --json``'s ``llm.*``)."""
    where = " WHERE model = :model" if model is not None else ""
    row = conn.execute(text(
        "SELECT count(*) AS calls, coalesce(sum(tokens_in), 0) AS tokens_in, "
        "coalesce(sum(tokens_out), 0) AS tokens_out, coalesce(sum(cost_usd), 0) AS cost_usd "
        f"FROM llm_call{where}"), {"model": model}).one()
    tokens_in, tokens_out = int(row.tokens_in), int(row.tokens_out)
    return {"calls": int(row.calls), "tokens_in": tokens_in, "tokens_out": tokens_out,
            "tokens": tokens_in + tokens_out, "cost_usd": float(row.cost_usd)}
