"""MeSH in Postgres: the 2023 trees with UIs joined from 2017, subtrees, reloads, and the
UIs that arrive later with articles' headings."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshdistill.errors import UnknownSubtreeError
from meshdistill.mesh.combine import combine
from meshdistill.mesh.formats import read_mtrees
from meshdistill.mesh.load import load_release, load_sources, mesh_counts
from meshdistill.mesh.subtree import get_subtree, subtree_descriptor_uis
from meshdistill.mesh.tree import in_subtree
from meshdistill.pubmed.load import load_records
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.records import Article
from meshdistill.store import connect
from sqlalchemy import Connection, text

from tests.support import DESC_SAMPLES, EUTILS_DIR, MESH_TREE_2017, MTREES_2023

SOURCES = [str(MTREES_2023), str(MESH_TREE_2017), str(DESC_SAMPLES)]
NO_CACHE = Path("/nonexistent-cache")  # local files only: nothing may be downloaded

pytestmark = pytest.mark.integration


def _fingerprint(conn: Connection) -> tuple[str, str, str]:
    """Content of the three MeSH tables, so a reload is compared row by row, not only by count."""
    row = conn.execute(
        text(
            """
            SELECT (SELECT md5(string_agg(concat_ws('|', tree_number, name, ui, mesh_year), ','
                                          ORDER BY tree_number)) FROM mesh_tree),
                   (SELECT md5(string_agg(concat_ws('|', ui, name, scope_note, descriptor_class),
                                          ',' ORDER BY ui)) FROM mesh_descriptor),
                   (SELECT md5(string_agg(ui || '|' || term, ',' ORDER BY ui, term))
                    FROM mesh_entry_term)
            """
        )
    ).one()
    return row[0], row[1], row[2]


def test_counts_and_idempotent_reload(fresh_mesh_url: str) -> None:
    with connect(fresh_mesh_url) as conn:
        first = mesh_counts(conn)
        before = _fingerprint(conn)
        by_sql = conn.execute(
            text(
                """
                SELECT count(*) FILTER (WHERE ui IS NOT NULL),
                       count(DISTINCT name), count(DISTINCT ui),
                       count(*) FILTER (WHERE tree_number = 'C04' OR tree_number LIKE 'C04.%')
                FROM mesh_tree
                """
            )
        ).one()
    assert first == {
        "descriptors": 28_471, "tree_numbers": 63_056, "tree_numbers_unjoined": 5_029,
        "entry_terms": 265,
    }
    # 58,027 joined tree numbers over 30,452 names; C04 has 1,056 tree numbers.
    assert tuple(by_sql) == (58_027, 30_452, by_sql[2], 1_056)
    assert by_sql[2] < 28_471  # some 2017 UIs have no 2023 tree number (moved or deleted)

    with connect(fresh_mesh_url) as conn:
        result = load_sources(conn, SOURCES, NO_CACHE, replace_trees=True)
    assert result["counts"] == first
    assert result["report"]["tree_numbers_removed"] == 0
    with connect(fresh_mesh_url) as conn:
        assert mesh_counts(conn) == first
        assert _fingerprint(conn) == before
        releases = conn.execute(text("SELECT count(*) FROM mesh_release")).scalar_one()
    assert releases == 2  # each load is logged with its report


def test_subtree_c04(mesh_loaded_url: str) -> None:
    with connect(mesh_loaded_url) as conn:
        sub = get_subtree(conn, "C04")
        uis = subtree_descriptor_uis(conn, "C04")
        ancestry = get_subtree(conn, "C04.557.337").ancestry
    assert (sub.name, sub.ui) == ("Neoplasms", "D009369")
    assert sub.ancestry == []
    assert sub.scope_note is not None and sub.scope_note.startswith("New abnormal growth")
    assert sub.tree_numbers == 1_056
    assert sub.tree_numbers - sub.unjoined_tree_numbers > 1_000
    assert "D009369" in uis and len(uis) == sub.descriptors
    assert ancestry == ["Neoplasms", "Neoplasms by Histologic Type"]
    # The same tree numbers as the file itself says are under C04.
    in_file = {t.tree_number for t in read_mtrees(MTREES_2023) if in_subtree(t.tree_number, "C04")}
    assert len(in_file) == sub.tree_numbers


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("C4", "C04"),  # missing zero
        ("c04", "C04"),  # lower case
        ("C99", "C09"),  # no such category number: close ones
        ("Neoplasm", "Neoplasms (C04)"),  # a name, not a tree number
        ("Neoplasms", "Neoplasms (C04)"),
    ],
)
def test_unknown_subtree_suggestions(mesh_loaded_url: str, prefix: str, expected: str) -> None:
    with connect(mesh_loaded_url) as conn, pytest.raises(UnknownSubtreeError) as info:
        get_subtree(conn, prefix)
    error = info.value
    assert error.prefix == prefix
    assert expected in error.suggestions
    assert f"unknown MeSH subtree {prefix!r}; closest valid:" in str(error)
    if prefix in ("C4", "c04", "Neoplasm"):
        assert error.suggestions[0] == expected  # the right one first


def test_replace_trees_removes_stale_numbers(database_url: str, tmp_path: Path) -> None:
    """Tree numbers move between MeSH years: a complete release replaces the old ones."""
    old = tmp_path / "mtrees2022.bin"
    old.write_text("Neoplasms;C04\nNeoplasms by Site;C04.588\nOld Heading;C04.999\n")
    new = tmp_path / "mtrees2023.bin"
    new.write_text("Neoplasms;C04\nNeoplasms by Site;C04.588\n")
    uis = tmp_path / "MeshTree.txt"
    uis.write_text("Tree Number\tDesc Ui\tTerm\nC04\tD009369\tNeoplasms\n")

    def tree_numbers(conn: Connection) -> list[str]:
        return list(conn.execute(text("SELECT tree_number FROM mesh_tree ORDER BY 1")).scalars())

    # One transaction per load, as the CLI and the DAG do (staging tables drop at commit).
    with connect(database_url) as conn:
        load_release(conn, combine([old, uis]))
    with connect(database_url) as conn:
        assert tree_numbers(conn) == ["C04", "C04.588", "C04.999"]
    with connect(database_url) as conn:
        kept = load_release(conn, combine([new, uis]), replace_trees=False)
    assert kept["report"]["tree_numbers_removed"] == 0
    with connect(database_url) as conn:
        assert tree_numbers(conn) == ["C04", "C04.588", "C04.999"]  # a sample never removes
    with connect(database_url) as conn:
        replaced = load_release(conn, combine([new, uis]), replace_trees=True)
    assert replaced["report"]["tree_numbers_removed"] == 1
    with connect(database_url) as conn:
        assert tree_numbers(conn) == ["C04", "C04.588"]
        ui = conn.execute(text("SELECT ui FROM mesh_tree WHERE tree_number = 'C04'")).scalar()
    assert ui == "D009369"


def test_article_headings_join_unjoined_tree_numbers(fresh_mesh_url: str) -> None:
    """The 2023 trees name descriptors created after 2017 (COVID-19, Betacoronavirus ...),
    which the 2017 table cannot give UIs. An article's headings pair UI and name, and
    loading it gives those tree numbers their UIs."""
    path = EUTILS_DIR / "metapub" / "pmid_32437181.xml.gz"
    (article,) = [r for r in iter_records(path) if isinstance(r, Article)]
    headings = {m.name.lower(): m.ui for m in article.mesh}
    assert headings["covid-19"] == "D000086382"
    with connect(fresh_mesh_url) as conn:
        unjoined: dict[str, str] = dict(
            conn.execute(
                text("SELECT tree_number, lower(name) FROM mesh_tree WHERE ui IS NULL")
            ).all()
        )
    expected = {t: headings[n] for t, n in unjoined.items() if n in headings}
    assert len([t for t in expected if unjoined[t] == "covid-19"]) == 5
    assert len(expected) > 5  # other post-2017 headings of this article too

    with connect(fresh_mesh_url) as conn:
        result = load_records(conn, iter_records(path), source="test", item=path.name)
        assert result.loaded == 1
        now: dict[str, str] = dict(
            conn.execute(
                text("SELECT tree_number, ui FROM mesh_tree WHERE tree_number = ANY(:t)"),
                {"t": list(expected)},
            ).all()
        )
        still = conn.execute(
            text("SELECT count(*) FROM mesh_tree WHERE ui IS NULL")
        ).scalar_one()
        covid = get_subtree(conn, "C01.925.705.500")  # a COVID-19 tree number (2023)
    assert now == expected
    assert still == len(unjoined) - len(expected)
    assert (covid.name, covid.ui) == ("COVID-19", "D000086382")
