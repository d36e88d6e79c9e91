"""Exports end to end on real PostgreSQL: formats loaded with ``datasets``, splits,
stability, byte-identical re-export, atomicity, object storage, the CLI and the DAG.

One corpus per module: MeSH and the first 3,000 citations of pubmed20n0014, with C04
distilled by the offline backend (the demo's settings, 60 articles), so every format has
rows in every split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from meshdistill.cli import main
from meshdistill.export.run import MANIFEST, list_exports
from meshdistill.export.schemas import SCHEMAS
from meshdistill.export.settings import SPLITS, ExportSettings
from meshdistill.export.splits import split_index
from meshdistill.llm.config import LLMConfig
from meshdistill.pipeline import distill_settings, export_shards
from meshdistill.store.db import get_engine
from sqlalchemy import text

from tests.support import REPO

pytestmark = pytest.mark.integration

FIRST_ARTICLES = 60


def distill(url: str, run_id: str, articles: int) -> None:
    from meshdistill.pipeline import distill_subtree

    distill_subtree("C04", run_id=run_id, llm=LLMConfig(backend="offline"),
                    settings=distill_settings({"max_articles": articles,
                                               "questions_per_article": 4}),
                    database_url=url)


@pytest.fixture(scope="module")
def export_url(corpus_url: str) -> Iterator[str]:
    with get_engine(corpus_url).begin() as conn:
        conn.execute(text("TRUNCATE qa_item, preference_pair, llm_call, export"))
    distill(corpus_url, "export-1", FIRST_ARTICLES)
    os.environ["MESHDISTILL_DATABASE_URL"] = corpus_url
    try:
        yield corpus_url
    finally:
        os.environ.pop("MESHDISTILL_DATABASE_URL", None)


def run(url: str, out: str, **values: Any) -> dict[str, Any]:
    settings = ExportSettings(out=out, **values)
    return export_shards(settings, database_url=url)


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_format_loads_with_datasets_from_parquet_and_jsonl(
        export_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = run(export_url, str(tmp_path), file_format="both", split_ratios=(0.6, 0.2, 0.2))
    root = Path(out["path"])
    manifest = json.loads((root / MANIFEST).read_text())
    assert set(out["counts"]) == set(SCHEMAS)
    for fmt, schema in SCHEMAS.items():
        card = datasets.load_dataset(str(root), fmt, cache_dir=str(tmp_path / "hf"))
        assert set(card) == set(SPLITS), fmt
        for split in SPLITS:
            assert card[split].column_names == schema.names
            assert card[split].num_rows == manifest["formats"][fmt][split] > 0
        jsonl = {s: sorted(str(p) for p in (root / fmt).glob(f"{s}-*.jsonl.gz")) for s in SPLITS}
        loaded = datasets.load_dataset("json", data_files=jsonl, cache_dir=str(tmp_path / "hf"))
        for split in SPLITS:
            assert loaded[split].num_rows == card[split].num_rows
            assert set(loaded[split].column_names) == set(schema.names)
    sft = datasets.load_dataset(str(root), "sft", cache_dir=str(tmp_path / "hf"))["train"][0]
    assert [m["role"] for m in sft["messages"]] == ["system", "user", "assistant"]
    assert "[PMID " in sft["messages"][1]["content"]  # the contexts, open book
    dpo = datasets.load_dataset(str(root), "dpo", cache_dir=str(tmp_path / "hf"))["train"][0]
    assert dpo["chosen"][0]["content"] != dpo["rejected"][0]["content"]
    assert dpo["metadata"]["margin"] >= 0.05 - 1e-9
    assert str(dpo["metadata"]["source_pmid"]) in dpo["prompt"][1]["content"]
    for shard in manifest["shards"]:
        digest = hashlib.sha256((root / shard["path"]).read_bytes()).hexdigest()
        assert digest == shard["sha256"]


def test_yesno_targets_start_with_their_label_and_closed_book_has_no_contexts(
        export_url: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = run(export_url, str(tmp_path), formats=("sft", "alpaca"), closed_book=True,
              question_types=("yesno",))
    root = Path(out["path"])
    rows = pq.read_table(sorted((root / "sft").glob("train-*.parquet"))[0]).to_pylist()
    assert rows
    for row in rows:
        label = row["metadata"]["label"]
        assert row["metadata"]["question_type"] == "yesno"
        assert row["messages"][2]["content"].lower().startswith(label)
        assert "[PMID" not in row["messages"][1]["content"]
    alpaca = pq.read_table(sorted((root / "alpaca").glob("train-*.parquet"))[0]).to_pylist()
    assert all(r["input"] == "" for r in alpaca)


def _split_by_pmid(root: Path) -> dict[int, set[str]]:
    import pyarrow.parquet as pq

    seen: dict[int, set[str]] = {}
    for fmt in ("qca", "dpo"):
        for path in (root / fmt).glob("*.parquet"):
            split = path.name.split("-")[0]
            for meta in pq.read_table(path, columns=["metadata"]).column(0).to_pylist():
                seen.setdefault(meta["source_pmid"], set()).add(split)
    return seen


def test_no_article_in_two_splits_and_articles_keep_their_split(
        export_url: str, tmp_path: Path) -> None:
    first = _split_by_pmid(Path(run(export_url, str(tmp_path), formats=("qca", "dpo"))["path"]))
    assert first and all(len(s) == 1 for s in first.values())
    expected = split_index(list(first), ExportSettings().seed, (0.9, 0.05, 0.05))
    assert [next(iter(first[p])) for p in first] == [SPLITS[i] for i in expected]
    distill(export_url, "export-2", FIRST_ARTICLES + 30)  # 30 more articles
    second = _split_by_pmid(Path(run(export_url, str(tmp_path), formats=("qca", "dpo"))["path"]))
    assert len(second) > len(first)
    assert all(len(s) == 1 for s in second.values())
    moved = [p for p in first if p in second and second[p] != first[p]]
    assert moved == []


def test_reexport_is_byte_identical_but_for_id_and_time(export_url: str,
                                                       tmp_path: Path) -> None:
    a = Path(run(export_url, str(tmp_path), file_format="both")["path"])
    b = Path(run(export_url, str(tmp_path), file_format="both")["path"])
    assert a != b and sorted(tmp_path.iterdir()) == sorted([a, b])
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys() and len(fa) > 20
    differing = [k for k in fa if fa[k] != fb[k]]
    assert differing == [MANIFEST]
    ma, mb = (json.loads((p / MANIFEST).read_text()) for p in (a, b))
    assert ma["export_id"] != mb["export_id"]
    for m in (ma, mb):
        m.pop("export_id")
        m.pop("created_at")
    assert ma == mb
    card = (a / "README.md").read_text()
    assert a.name not in card and "configs:" in card


def test_failure_mid_export_leaves_no_folder_and_no_row(export_url: str,
                                                       tmp_path: Path) -> None:
    engine = get_engine(export_url)
    with engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM export")).scalar_one()

    def fail(phase: str, rows: int) -> None:
        raise RuntimeError("disk full (injected)")

    with pytest.raises(RuntimeError, match="injected"):
        export_shards(ExportSettings(out=str(tmp_path)), database_url=export_url,
                      progress=fail)
    assert list(tmp_path.iterdir()) == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM export")).scalar_one() == before


def test_a_stream_left_unfinished_is_closed_with_its_snapshot(export_url: str) -> None:
    from meshdistill.export.source import snapshot

    engine = get_engine(export_url)

    def sessions() -> int:
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()")).scalar_one())

    idle = sessions()
    with pytest.raises(RuntimeError, match="caller failed"), \
            snapshot(engine, ExportSettings()) as snap:
        rows = snap.item_plan_rows()
        assert next(rows).num_rows > 0
        raise RuntimeError("caller failed")  # the stream is still open here
    assert sessions() <= idle


def test_cli_export_to_memory_storage_and_status(export_url: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--out", "memory://exports-test", "--formats", "sft,dpo",
                 "--file-format", "jsonl", "--shard-rows", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    fs = fsspec.filesystem("memory")
    assert list_exports(fs, "/exports-test") == [out["export_id"]]
    manifest = json.loads(fs.cat(f"/exports-test/{out['export_id']}/{MANIFEST}"))
    assert manifest["formats"] == out["counts"]
    train = manifest["data_files"]["sft"]["train"]
    assert len(train) == -(-out["counts"]["sft"]["train"] // 50) > 1
    assert train[0].endswith(f"-of-{len(train):05d}.jsonl")
    assert set(out["removed"]) >= {"exact_duplicate", "near_duplicate", "contamination_pmid"}
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["exports"]["count"] >= 1
    assert status["exports"]["latest"]["id"] == out["export_id"]
    assert status["exports"]["latest"]["formats"] == out["counts"]


def test_unknown_subtree_and_empty_selection_are_clear_errors(
        export_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--out", str(tmp_path), "--subtree", "C99"]) == 2
    assert "unknown MeSH subtree 'C99'" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path), "--subtree", "C14"]) == 2
    assert "nothing to export" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path), "--split-ratios", "0.5,0.5,0.5"]) == 2
    assert "split_ratios" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_shards_dag_after_distill(export_url: str, tmp_path: Path,
                                         airflow_metadata: None) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from sqlalchemy.engine import make_url

    conn_url = make_url(export_url).set(drivername="postgresql")
    os.environ["AIRFLOW_CONN_MESHDISTILL_DB"] = conn_url.render_as_string(hide_password=False)
    try:
        dag = DagBag(str(REPO / "dags")).dags["export_shards"]
        dr = dag.test(run_conf={"out": f"file://{tmp_path}", "formats": ["sft", "qca"]})
    finally:
        os.environ.pop("AIRFLOW_CONN_MESHDISTILL_DB", None)
    assert dr.state == "success"
    (folder,) = [p for p in tmp_path.iterdir()]
    assert (folder / MANIFEST).is_file() and (folder / "README.md").is_file()
    with get_engine(export_url).connect() as conn:
        row = conn.execute(text("SELECT location, counts FROM export WHERE id = :i"),
                           {"i": folder.name}).one()
    assert row.location.endswith(folder.name)
    assert set(row.counts["formats"]) == {"sft", "qca"}
