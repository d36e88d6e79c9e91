"""Distilling one subtree over several worker processes (``processes > 1``).

One event loop is bound by the GIL (a few ms of CPU per LLM request: building prompts,
grading, parsing replies), so with ``processes > 1`` the parent selects the sources once, deals
them round-robin to that many spawned worker processes and reconciles the lot; each
worker runs :meth:`SubtreeDistiller.run_pmids` with its own engine and backend. The LLM
concurrency cap and the budget are split evenly between the workers, so neither total is
ever exceeded (a worker whose budget share is spent defers its remaining candidates even
if another still has some left: the next run picks them up). Workers log through a queue
into the parent's loggers. A failed worker fails the run with its error once every worker
has ended; what the others (and it) flushed before stays committed, as with one process.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from sqlalchemy import Engine

from meshdistill import aio
from meshdistill.distill.run import SubtreeDistiller
from meshdistill.distill.settings import DistillSettings
from meshdistill.llm.config import DEFAULT_CONCURRENCY

log = logging.getLogger(__name__)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares differing by at most one (32, 3 -> 11, 11, 10)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _worker_logging(queue: Any, level: int) -> None:
    import logging.handlers

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(queue))
    root.setLevel(level)


def _worker(database_url: str, subtree: str, llm: Any, settings: DistillSettings,
            run_id: str, pmids: list[int], concurrency: int, budget_usd: float | None,
            budget_tokens: int | None, label: str) -> dict[str, Any]:
    """One worker process's share (module level: pickled by reference under spawn)."""
    from dataclasses import replace

    from meshdistill.llm.config import cached_backend
    from meshdistill.store.db import get_engine

    engine = get_engine(database_url)

    async def go() -> dict[str, Any]:
        async with cached_backend(replace(llm, max_concurrency=concurrency), engine,
                                  budget_usd=budget_usd, budget_tokens=budget_tokens,
                                  subtree=subtree) as backend:
            distiller = SubtreeDistiller(engine, subtree, backend, settings, run_id)
            distiller.label = label
            read = await distiller.run_pmids(pmids)
            budget = getattr(backend, "budget", None)
            st = distiller.stats
            return {"read": read, "articles": st.articles, "stages": dict(st.stages),
                    "states": dict(st.states), "reasons": dict(st.reasons),
                    "pairs": st.pairs, "llm": dict(backend.stats),
                    "budget": budget.snapshot() if budget is not None else None}

    try:
        return aio.run(go())
    except BaseException:
        log.exception("%s failed", label)
        raise
    finally:
        engine.dispose()


def _merge_budgets(snapshots: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not snapshots:
        return None

    def total(key: str) -> Any:
        values = [s[key] for s in snapshots]
        return None if any(v is None for v in values) else sum(values)

    merged = {k: total(k) for k in ("limit_usd", "limit_tokens", "spent_usd",
                                    "spent_tokens", "calls", "deferred")}
    if merged["spent_usd"] is not None:
        merged["spent_usd"] = round(merged["spent_usd"], 6)
    merged["exhausted"] = any(s["exhausted"] for s in snapshots)
    return merged


def distill_subtree_processes(engine: Engine, subtree: str, llm: Any,
                              settings: DistillSettings, run_id: str, *,
                              budget_usd: float | None = None,
                              budget_tokens: int | None = None) -> dict[str, Any]:
    """Run one subtree over ``settings.processes`` worker processes (see above).

    ``llm`` is the :class:`~meshdistill.llm.config.LLMConfig`; its
    ``max_concurrency`` (default 32) is the cap shared by all workers. The summary has the
    same keys as a one-process run's.
    """
    import concurrent.futures
    import logging.handlers
    import multiprocessing

    from meshdistill.llm.config import make_backend

    started = time.perf_counter()
    backend = make_backend(llm)  # name and model only (no client until a call)
    parent = SubtreeDistiller(engine, subtree, backend, settings, run_id)
    pmids = parent.prepare(grade=False)
    cap = llm.max_concurrency or DEFAULT_CONCURRENCY
    n = min(settings.processes, cap, len(pmids))  # no idle workers; at least 1 call each
    if not n:
        summary = parent.summary([], time.perf_counter() - started, llm={})
        summary["processes"] = 0
        return summary
    shares = [pmids[i::n] for i in range(n)]
    caps = split_evenly(cap, n)
    usd = None if budget_usd is None else budget_usd / n
    tokens = None if budget_tokens is None else split_evenly(budget_tokens, n)
    url = engine.url.render_as_string(hide_password=False)  # never logged
    log.info("%s: %d source articles over %d worker processes (LLM cap %s, budget %s each)",
             subtree, len(pmids), n, "+".join(map(str, caps)),
             "unlimited" if usd is None and tokens is None else
             f"usd {usd}, tokens {tokens}")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()

    class _ToLogger(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logging.getLogger(record.name).handle(record)

    listener = logging.handlers.QueueListener(queue, _ToLogger())
    listener.start()
    results: list[dict[str, Any]] = []
    error: BaseException | None = None
    try:
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=n, mp_context=ctx, initializer=_worker_logging,
                initargs=(queue, logging.getLogger().getEffectiveLevel())) as pool:
            futures = [pool.submit(_worker, url, subtree, llm, settings, run_id, shares[i],
                                   caps[i], usd, tokens[i] if tokens else None,
                                   f"{subtree} [worker {i + 1}/{n}]") for i in range(n)]
            for future in futures:  # every worker ends (keeping its flushes) before a raise
                try:
                    results.append(future.result())
                except BaseException as exc:
                    error = error or exc
    finally:
        listener.stop()
        queue.close()
    if error is not None:
        raise error
    stats = parent.stats
    llm_stats: Counter[str] = Counter()
    for r in results:
        stats.articles += r["articles"]
        stats.stages.update(r["stages"])
        stats.states.update(r["states"])
        stats.reasons.update(r["reasons"])
        stats.pairs += r["pairs"]
        llm_stats.update(r["llm"])
    read = [p for r in results for p in r["read"]]
    summary = parent.summary(
        read, time.perf_counter() - started, llm=dict(llm_stats),
        budget=_merge_budgets([r["budget"] for r in results if r["budget"] is not None]))
    summary["processes"] = n
    parent.log_progress(len(read), started, final=True)
    return summary
