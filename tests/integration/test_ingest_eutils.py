"""Subtree ingestion end to end: real PostgreSQL, real MeSH trees, real PubMed records,
served over HTTP by the local E-utilities server.

The corpus is the 2020 baseline sample's records entered April-July 1977; MeSH explosion
on the server comes from the real 2023 trees, so "Neoplasms"[MeSH Terms] finds what
PubMed would find among these records. Expectations are computed from the corpus
directly, not from the server's answers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date

import pytest
from meshdistill.errors import UnknownSubtreeError, WindowTooLargeError
from meshdistill.fileio import open_text
from meshdistill.pubmed.eutils import EutilsClient
from meshdistill.pubmed.ingest import ingest_subtree, next_window, read_watermark
from meshdistill.pubmed.ratelimit import PostgresRateLimiter
from meshdistill.store.db import get_engine
from sqlalchemy import text

from tests.fakes.eutils_server import (
    FakeArticle,
    FakeEutils,
    baseline_corpus,
    explode_from_mtrees,
)
from tests.support import MTREES_2023

pytestmark = pytest.mark.integration

CORPUS_FROM, CORPUS_TO = date(1977, 4, 1), date(1977, 7, 31)
# Inside May 1977 but past May 1st, the day most of the month's records were entered.
MAY_FROM, MAY_MID, MAY_TO = date(1977, 5, 2), date(1977, 5, 15), date(1977, 5, 31)
ROOTS = {"C04": "Neoplasms", "C04.557": "Neoplasms by Histologic Type"}


def _c_top_level() -> list[str]:
    with open_text(MTREES_2023) as fh:
        rows = [line.rstrip("\n").split(";") for line in fh]
    return [name for name, tn in rows if len(tn) == 3 and tn.startswith("C")]


@pytest.fixture(scope="module")
def corpus() -> tuple[FakeArticle, ...]:
    return baseline_corpus(CORPUS_FROM, CORPUS_TO)


@pytest.fixture(scope="module")
def explode() -> dict[str, set[str]]:
    return explode_from_mtrees([*ROOTS.values(), *_c_top_level()])


@pytest.fixture
def fake(corpus: tuple[FakeArticle, ...], explode: dict[str, set[str]]) -> Iterator[FakeEutils]:
    with FakeEutils(corpus, explode=explode) as server:
        yield server


def client_for(fake: FakeEutils, url: str) -> EutilsClient:
    """A client on the shared Postgres limiter (fast rate: the server is local)."""
    limiter = PostgresRateLimiter(get_engine(url), 500.0, name=f"test-{uuid.uuid4().hex[:8]}")
    return EutilsClient(
        fake.base_url, email="dev@example.org", limiter=limiter, backoff_initial=0.01
    )


def expected(
    corpus: tuple[FakeArticle, ...], explode: dict[str, set[str]], names: list[str],
    lo: date, hi: date,
) -> set[str]:
    under = set().union(*(explode[n.lower()] for n in names))
    return {a.pmid for a in corpus if a.entrez and lo <= a.entrez <= hi and a.mesh & under}


def db_counts(url: str, pmids: set[str] | None = None) -> dict[str, int]:
    where = "" if pmids is None else " WHERE pmid = ANY(:p)"
    params = {} if pmids is None else {"p": [int(p) for p in pmids]}
    with get_engine(url).connect() as conn:
        return {
            table: conn.execute(text(f"SELECT count(*) FROM {table}{where}"), params).scalar_one()
            for table in ("article", "article_mesh")
        }


def watermark_row(url: str, subtree: str) -> tuple[date, int] | None:
    with get_engine(url).connect() as conn:
        row = conn.execute(
            text(
                "SELECT watermark, last_count FROM ingest_watermark "
                "WHERE subtree = :s AND source = 'eutils'"
            ),
            {"s": subtree},
        ).first()
    return (row[0], row[1]) if row else None


# -- the main path ---------------------------------------------------------------------


def test_ingest_window_end_to_end(
    fresh_mesh_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    want = expected(corpus, explode, ["Neoplasms"], MAY_FROM, MAY_TO)
    assert len(want) > 20

    with client_for(fake, fresh_mesh_url) as client:
        summary = ingest_subtree(
            fresh_mesh_url, "C04", MAY_FROM, MAY_TO, client=client, batch_size=10
        )

    assert summary["subtree"] == "C04"
    assert summary["window"] == ["1977-05-02", "1977-05-31"]
    assert summary["term"] == '"Neoplasms"[MeSH Terms]'
    assert (summary["expected"], summary["fetched"], summary["loaded"]) == (
        len(want), len(want), len(want),
    )
    assert (summary["unchanged"], summary["deleted"], summary["skipped"]) == (0, 0, 0)
    assert summary["missing"] == [] and summary["reconciled"] is True
    assert summary["watermark"] == "1977-05-31" and summary["watermark_advanced"] is True

    assert db_counts(fresh_mesh_url)["article"] == len(want)
    assert db_counts(fresh_mesh_url, want)["article_mesh"] > len(want)
    assert watermark_row(fresh_mesh_url, "C04") == (MAY_TO, len(want))
    with get_engine(fresh_mesh_url).connect() as conn:
        batches = conn.execute(
            text(
                "SELECT item, source, subtree, window_from, window_to, expected, parsed, status "
                "FROM ingest_batch ORDER BY id"
            )
        ).all()
        sources = set(conn.execute(text("SELECT DISTINCT source FROM article")).scalars())
    # One part (the window fits one esearch): one load, one transaction, one batch row.
    (batch,) = batches
    assert batch.item == "C04 1977-05-02..1977-05-31"
    assert (batch.source, batch.subtree, batch.window_from, batch.window_to) == (
        "eutils", "C04", MAY_FROM, MAY_TO,
    )
    assert batch.expected == batch.parsed == len(want) and batch.status == "succeeded"
    assert sources == {"eutils"}

    # Every efetch went through the history server, in batches of 10.
    fetches = fake.requests_to("efetch.fcgi")
    assert len(fetches) == -(-len(want) // 10)
    assert all("WebEnv" in r.params and int(r.params["retmax"]) <= 10 for r in fetches)


def test_rerun_and_overlapping_subtrees_leave_identical_counts(
    fresh_mesh_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    want = expected(corpus, explode, ["Neoplasms"], MAY_FROM, MAY_TO)
    narrower = expected(corpus, explode, ["Neoplasms by Histologic Type"], MAY_FROM, MAY_TO)
    assert narrower and narrower < want  # C04.557 lies inside C04

    with client_for(fake, fresh_mesh_url) as client:
        first = ingest_subtree(fresh_mesh_url, "C04.557", MAY_FROM, MAY_TO, client=client)
        after_narrow = db_counts(fresh_mesh_url)
        broad = ingest_subtree(fresh_mesh_url, "C04", MAY_FROM, MAY_TO, client=client)
        after_broad = db_counts(fresh_mesh_url)
        again = ingest_subtree(fresh_mesh_url, "C04.557", MAY_FROM, MAY_TO, client=client)
        rerun = ingest_subtree(fresh_mesh_url, "C04", MAY_FROM, MAY_TO, client=client)
        final = db_counts(fresh_mesh_url)

    assert first["loaded"] == len(narrower)
    assert after_narrow["article"] == len(narrower)
    assert broad["loaded"] == len(want - narrower)
    assert broad["unchanged"] == len(narrower)
    assert after_broad["article"] == len(want)
    assert (again["loaded"], again["unchanged"]) == (0, len(narrower))
    assert (rerun["loaded"], rerun["unchanged"]) == (0, len(want))
    assert final == after_broad
    assert all(s["reconciled"] for s in (first, broad, again, rerun))


def test_empty_window_reconciles_and_advances(
    mesh_loaded_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    # C14 is ingested by no other test of the shared database; the server's corpus ends
    # on 1977-07-31, so this window is empty.
    lo, hi = date(1977, 8, 1), date(1977, 8, 3)
    assert not expected(corpus, explode, ["Cardiovascular Diseases"], lo, hi)
    assert watermark_row(mesh_loaded_url, "C14") is None
    with client_for(fake, mesh_loaded_url) as client:
        summary = ingest_subtree(mesh_loaded_url, "C14", lo, hi, client=client)
    assert (summary["expected"], summary["fetched"], summary["reconciled"]) == (0, 0, True)
    assert summary["term"] == '"Cardiovascular Diseases"[MeSH Terms]'
    assert summary["watermark"] == "1977-08-03"
    assert watermark_row(mesh_loaded_url, "C14") == (hi, 0)
    assert len(fake.requests_to("esearch.fcgi")) == 1
    assert fake.requests_to("efetch.fcgi") == []


def test_missing_records_hold_the_watermark_until_a_run_reconciles(
    fresh_mesh_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    engine = get_engine(fresh_mesh_url)
    with engine.connect() as conn:
        assert next_window(conn, "C04", MAY_FROM, MAY_TO) == MAY_FROM  # never ingested
    second_half = sorted(expected(corpus, explode, ["Neoplasms"], date(1977, 5, 16), MAY_TO))
    dropped = set(second_half[:3])

    with client_for(fake, fresh_mesh_url) as client:
        first = ingest_subtree(fresh_mesh_url, "C04", MAY_FROM, MAY_MID, client=client)
        assert first["reconciled"] and first["watermark"] == "1977-05-15"
        with engine.connect() as conn:
            assert next_window(conn, "C04", MAY_FROM, MAY_TO) == date(1977, 5, 16)

        fake.drop_pmids.update(dropped)  # efetch never returns these, by WebEnv or by id
        broken = ingest_subtree(
            fresh_mesh_url, "C04", date(1977, 5, 16), MAY_TO, client=client, missing_cap=2
        )
        assert broken["reconciled"] is False
        assert broken["missing_count"] == 3
        assert len(broken["missing"]) == 2 and set(broken["missing"]) < dropped
        assert broken["fetched"] == len(second_half) - 3
        assert broken["watermark"] == "1977-05-15" and not broken["watermark_advanced"]
        assert watermark_row(fresh_mesh_url, "C04") == (MAY_MID, first["expected"])
        # The missing ids were asked for once more, by id.
        by_id = [r for r in fake.requests_to("efetch.fcgi") if "id" in r.params]
        assert len(by_id) == 1 and set(by_id[0].params["id"].split(",")) == dropped
        with engine.connect() as conn:
            # A scheduled run still starts after the last reconciled window.
            assert next_window(conn, "C04", MAY_FROM, MAY_TO) == date(1977, 5, 16)

        fake.drop_pmids.clear()
        fixed = ingest_subtree(fresh_mesh_url, "C04", date(1977, 5, 16), MAY_TO, client=client)

    assert fixed["reconciled"] is True and fixed["missing"] == []
    assert fixed["loaded"] == 3  # only the three that were missing are new
    assert fixed["watermark"] == "1977-05-31"
    assert watermark_row(fresh_mesh_url, "C04") == (MAY_TO, len(second_half))
    with engine.connect() as conn:
        assert next_window(conn, "C04", MAY_FROM, MAY_TO) == MAY_TO  # up to date


def test_watermark_does_not_jump_a_gap(
    fresh_mesh_url: str, fake: FakeEutils
) -> None:
    with client_for(fake, fresh_mesh_url) as client:
        ingest_subtree(fresh_mesh_url, "C04", MAY_FROM, date(1977, 5, 10), client=client)
        later = ingest_subtree(fresh_mesh_url, "C04", date(1977, 5, 20), MAY_TO, client=client)
        older = ingest_subtree(fresh_mesh_url, "C04", MAY_FROM, date(1977, 5, 5), client=client)
    assert later["reconciled"] and not later["watermark_advanced"]
    assert older["reconciled"] and not older["watermark_advanced"]
    assert watermark_row(fresh_mesh_url, "C04") is not None
    assert watermark_row(fresh_mesh_url, "C04")[0] == date(1977, 5, 10)  # type: ignore[index]


# -- recovery and limits (shared MeSH database; assertions on the run's own summary) ---------


def test_history_gap_refetched_by_id(
    mesh_loaded_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    want = expected(corpus, explode, ["Neoplasms"], MAY_FROM, MAY_TO)
    gone = sorted(want)[:2]
    fake.drop_from_history.update(gone)  # absent from WebEnv batches, present by id
    with client_for(fake, mesh_loaded_url) as client:
        summary = ingest_subtree(mesh_loaded_url, "C04", MAY_FROM, MAY_TO, client=client)
    assert summary["reconciled"] is True
    assert summary["refetched"] == 2
    assert summary["fetched"] == len(want)
    assert db_counts(mesh_loaded_url, set(gone))["article"] == 2


def test_truncated_batch_recovered(
    mesh_loaded_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    want = expected(corpus, explode, ["Neoplasms"], MAY_FROM, MAY_TO)
    fake.truncate_next_efetch(1)  # the first batch breaks off mid-record
    with client_for(fake, mesh_loaded_url) as client:
        summary = ingest_subtree(
            mesh_loaded_url, "C04", MAY_FROM, MAY_TO, client=client, batch_size=10
        )
    assert summary["partial_loads"] == 1
    assert len(summary["faults"]) == 1 and "batch 1" in summary["faults"][0]
    assert 0 < summary["refetched"] <= 10
    assert summary["reconciled"] is True and summary["fetched"] == len(want)
    with get_engine(mesh_loaded_url).connect() as conn:
        partial = conn.execute(
            text(
                "SELECT count(*) FROM ingest_batch WHERE status = 'partial' "
                "AND item = 'C04 1977-05-02..1977-05-31' AND error LIKE '%batch 1: malformed%'"
            )
        ).scalar_one()
    assert partial >= 1


def test_window_split_when_count_exceeds_limit(
    mesh_loaded_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    limit = 12
    fake.max_ids = limit  # the server pages like PubMed, with a small ceiling
    want = expected(corpus, explode, ["Neoplasms"], MAY_FROM, MAY_TO)
    assert len(want) > 2 * limit
    with client_for(fake, mesh_loaded_url) as client:
        summary = ingest_subtree(
            mesh_loaded_url, "C04", MAY_FROM, MAY_TO, client=client, max_ids=limit,
            batch_size=5,
        )
    assert summary["parts"] >= 3
    assert summary["expected"] == summary["fetched"] == len(want)
    assert summary["reconciled"] is True
    for r in fake.requests_to("efetch.fcgi"):
        assert int(r.params["retstart"]) + int(r.params["retmax"]) <= limit
    searches = fake.requests_to("esearch.fcgi")
    assert all(int(r.params["retmax"]) == limit for r in searches)
    windows = {(r.params["mindate"], r.params["maxdate"]) for r in searches}
    assert ("1977/05/02", "1977/05/31") in windows and len(windows) > summary["parts"]


def test_single_day_over_limit_raises(
    mesh_loaded_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    day = date(1977, 5, 1)
    assert len(expected(corpus, explode, ["Neoplasms"], day, day)) > 50
    fake.max_ids = 50
    with client_for(fake, mesh_loaded_url) as client, pytest.raises(
        WindowTooLargeError, match="1977-05-01"
    ):
        ingest_subtree(mesh_loaded_url, "C04", day, MAY_TO, client=client, max_ids=50)
    assert fake.requests_to("efetch.fcgi") == []  # it failed while planning, before fetching


def test_unknown_subtree_names_suggestions(mesh_loaded_url: str, fake: FakeEutils) -> None:
    with client_for(fake, mesh_loaded_url) as client, pytest.raises(
        UnknownSubtreeError
    ) as info:
        ingest_subtree(mesh_loaded_url, "C4", MAY_FROM, MAY_TO, client=client)
    assert "C04" in info.value.suggestions
    assert "C04" in str(info.value)
    assert fake.requests == []


def test_category_letter_ors_its_top_level_descriptors(
    mesh_loaded_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    lo, hi = date(1977, 5, 2), date(1977, 5, 10)
    tops = _c_top_level()
    want = expected(corpus, explode, tops, lo, hi)
    assert len(want) > len(expected(corpus, explode, ["Neoplasms"], lo, hi))
    with client_for(fake, mesh_loaded_url) as client:
        summary = ingest_subtree(mesh_loaded_url, "C", lo, hi, client=client)
    term = fake.requests_to("esearch.fcgi")[0].params["term"]
    assert term.count("[MeSH Terms]") == len(tops)
    assert '"Neoplasms"[MeSH Terms] OR ' in term
    assert summary["expected"] == summary["fetched"] == len(want)


def test_modification_date_window_keeps_its_own_watermark(
    mesh_loaded_url: str, fake: FakeEutils, corpus: tuple[FakeArticle, ...],
    explode: dict[str, set[str]],
) -> None:
    names = explode["neoplasms"]
    revised = sorted(a.revised for a in corpus if a.revised and a.mesh & names)
    day = revised[len(revised) // 2]
    want = {a.pmid for a in corpus if a.revised == day and a.mesh & names}
    with client_for(fake, mesh_loaded_url) as client:
        summary = ingest_subtree(mesh_loaded_url, "C04", day, day, client=client, datetype="mdat")
    assert summary["expected"] == summary["fetched"] == len(want)
    assert fake.requests_to("esearch.fcgi")[0].params["datetype"] == "mdat"
    with get_engine(mesh_loaded_url).connect() as conn:
        assert read_watermark(conn, "C04", source="eutils-mdat") == day
