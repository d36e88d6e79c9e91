"""``processes > 1``: the same rows as one process, counts that reconcile, a free rerun,
and the LLM concurrency cap shared by the workers (never more in flight in total).

Same database set-up as ``test_distill_run.py`` (MeSH plus the first 3,000 citations of
pubmed20n0014); every test starts from empty ``qa_item``/``preference_pair``/``llm_call``.
Worker processes are spawned, so each builds its own MeSH grader (a few seconds).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
from meshdistill.distill.workers import split_evenly
from meshdistill.llm.config import LLMConfig
from meshdistill.pipeline import distill_subtree
from meshdistill.store.db import get_engine
from sqlalchemy import text

from tests.fakes.llm_responder import realistic_responder
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.integration

SUBTREE = "C04"
SETTINGS: dict[str, Any] = {"max_articles": 12, "questions_per_article": 2}
FLAT = ("accepted", "rejected", "failed", "deferred")
VOLATILE = {"id", "run_id", "created_at", "updated_at"}


def rows(distill_url: str) -> list[dict[str, Any]]:
    """Every qa_item column but ids, timestamps and the run id, in natural-key order."""
    with get_engine(distill_url).connect() as conn:
        result = conn.execute(text(
            "SELECT * FROM qa_item ORDER BY source_pmid, profile, ordinal"))
        return [{k: v for k, v in r._mapping.items() if k not in VOLATILE} for r in result]


def pairs(distill_url: str) -> list[tuple[Any, ...]]:
    with get_engine(distill_url).connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            """
            SELECT p.source_pmid, p.ordinal, c.profile, r.profile, p.chosen_score,
                   p.rejected_score, p.margin
            FROM preference_pair p JOIN qa_item c ON c.id = p.chosen_id
            JOIN qa_item r ON r.id = p.rejected_id
            ORDER BY p.source_pmid, p.ordinal
            """))]


def scalar(distill_url: str, sql: str) -> Any:
    with get_engine(distill_url).connect() as conn:
        return conn.execute(text(sql)).scalar_one()


def check_counts(distill_url: str, summary: dict[str, Any]) -> None:
    assert summary["reconciled"] is True
    with get_engine(distill_url).connect() as conn:
        states = Counter(conn.execute(text(
            "SELECT state FROM qa_item WHERE run_id = :r"), {"r": summary["run_id"]}).scalars())
    assert {s: states.get(s, 0) for s in FLAT} == {s: summary[s] for s in FLAT}
    assert summary["candidates"] == sum(states.values())
    assert summary["stages"]["generate"] == 2 * summary["articles"]


def test_split_evenly() -> None:
    assert split_evenly(32, 2) == [16, 16]
    assert split_evenly(32, 3) == [11, 11, 10]
    assert split_evenly(8, 8) == [1] * 8


def test_two_processes_store_what_one_process_stores(distill_url: str) -> None:
    offline = LLMConfig(backend="offline")
    one = distill_subtree(SUBTREE, run_id="p-1", settings=SETTINGS, llm=offline,
                          database_url=distill_url)
    check_counts(distill_url, one)
    assert one["articles"] == SETTINGS["max_articles"]
    rows_one, pairs_one = rows(distill_url), pairs(distill_url)
    assert rows_one and pairs_one

    with get_engine(distill_url).begin() as conn:
        conn.execute(text("TRUNCATE qa_item, preference_pair, llm_call"))
    two = distill_subtree(SUBTREE, run_id="p-2", settings={**SETTINGS, "processes": 2},
                          llm=offline, database_url=distill_url)
    check_counts(distill_url, two)
    assert two["processes"] == 2
    assert rows(distill_url) == rows_one
    assert pairs(distill_url) == pairs_one
    keys = ("articles", "candidates", *FLAT, "preference_pairs", "stages", "reasons")
    assert {k: two[k] for k in keys} == {k: one[k] for k in keys}
    assert two["llm"]["misses"] == two["llm"]["stored"] == one["llm"]["stored"]

    # A rerun of the same run redoes the same articles from the cache: no new calls.
    calls = scalar(distill_url, "SELECT count(*) FROM llm_call")
    again = distill_subtree(SUBTREE, run_id="p-2", settings={**SETTINGS, "processes": 2},
                            llm=offline, database_url=distill_url)
    check_counts(distill_url, again)
    assert again["llm"]["misses"] == 0 and again["llm"]["hits"] == two["llm"]["stored"]
    assert scalar(distill_url, "SELECT count(*) FROM llm_call") == calls
    assert rows(distill_url) == rows_one and pairs(distill_url) == pairs_one


def test_workers_share_the_concurrency_cap(distill_url: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with FakeOpenAI(realistic_responder, latency=0.02) as server:
        config = LLMConfig(backend="openai", base_url=server.url, model="fake-model",
                           api_key="sk-test", max_concurrency=8, timeout=5.0)
        summary = distill_subtree(SUBTREE, run_id="cap-1",
                                  settings={**SETTINGS, "max_articles": 8, "processes": 2},
                                  llm=config, database_url=distill_url)
        check_counts(distill_url, summary)
        assert summary["processes"] == 2 and summary["failed"] == 0
        assert len(server.requests) == summary["llm"]["stored"] > 0
        assert server.max_in_flight <= 8
    # the workers' progress reaches the parent's logging
    done = [r.getMessage() for r in caplog.records if "done:" in r.getMessage()]
    assert any("[worker 1/2]" in m for m in done) and any("[worker 2/2]" in m for m in done)
