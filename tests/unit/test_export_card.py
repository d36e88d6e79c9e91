"""The export's dataset card and plots: YAML that ``datasets`` and the Hub read, an honest
body, and bytes that depend only on the data."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import DatasetCard, DatasetCardData
from meshdistill.export.card import (
    PLOTS,
    CardStats,
    hf_features,
    render_card,
    render_plots,
    size_category,
)
from meshdistill.export.schemas import FORMATS, JUDGE_CRITERIA, SCHEMAS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPORT_ID, CREATED_AT = "20261202T211500Z-3fa2c1", "2026-12-02T21:15:00.123456+00:00"
ROWS: dict[str, dict[str, int]] = {
    "sft": {"train": 5, "validation": 2, "test": 1},
    "prompt_completion": {"train": 5, "validation": 2, "test": 1},
    "dpo": {"train": 3, "test": 1},  # no validation pairs: that split has no files
    "alpaca": {"train": 5, "validation": 2, "test": 1},
    "sharegpt": {"train": 5, "validation": 2, "test": 1},
    "qca": {"train": 5, "validation": 2, "test": 1},
}


def _value(t: pa.DataType, i: int) -> Any:
    """A small valid value of any type the schemas use."""
    if pa.types.is_struct(t):
        return {f.name: _value(f.type, i) for f in t}
    if pa.types.is_list(t):
        return [_value(t.value_type, i), _value(t.value_type, i + 1)]
    if pa.types.is_string(t):
        return f"text {i}"
    if pa.types.is_boolean(t):
        return i % 2 == 0
    if pa.types.is_integer(t):
        return 1 + i % 5
    return 0.25 * (i % 4)


def _table(fmt: str, n: int) -> pa.Table:
    schema = SCHEMAS[fmt]
    return pa.Table.from_pylist([{f.name: _value(f.type, i) for f in schema}
                                 for i in range(n)], schema=schema)


def _write_shard(path: Path, table: pa.Table, file_format: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "parquet":
        pq.write_table(table, path)
        return
    lines = "".join(json.dumps(r) + "\n" for r in table.to_pylist()).encode()
    path.write_bytes(gzip.compress(lines, mtime=0) if file_format == "jsonl.gz" else lines)


def _write_export(root: Path, rows: dict[str, dict[str, int]],
                  file_format: str = "parquet") -> dict[str, Any]:
    """Tiny shards written from the schemas, and a manifest as ``run.py`` makes."""
    data_files: dict[str, dict[str, list[str]]] = {}
    shards = []
    for fmt, splits in rows.items():
        for split, n in splits.items():
            path = f"{fmt}/{split}-00000-of-00001.{file_format}"
            _write_shard(root / path, _table(fmt, n), file_format)
            data_files.setdefault(fmt, {})[split] = [path]
            shards.append({"path": path, "format": fmt, "split": split,
                           "file_format": file_format, "rows": n,
                           "bytes": (root / path).stat().st_size, "sha256": "0" * 64})
    return _manifest(rows, data_files, shards) | {"primary_file_format": file_format}


def _manifest(rows: dict[str, dict[str, int]], data_files: dict[str, Any],
              shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "export_id": EXPORT_ID, "created_at": CREATED_AT,
        "package_version": "0.1.0", "git_commit": "fc4969d6cea5e6d9855bd95f24dd4ea38a7447bd",
        "params": {"subtrees": ["C04", "C14.280"], "min_hierarchy": 0.2,
                   "min_judge": {c: 1 for c in JUDGE_CRITERIA} | {"groundedness": 4},
                   "question_types": ["yesno", "factoid"], "formats": list(rows),
                   "file_format": "parquet", "split_ratios": [0.9, 0.05, 0.05],
                   "closed_book": False, "near_dup_threshold": 0.8, "seed": 20250127},
        "formats": rows, "data_files": data_files, "primary_file_format": "parquet",
        "shards": shards,
        "counts": {"items": 8, "pairs": 4, "by_split": {"train": 5, "validation": 2, "test": 1},
                   "by_subtree": {"C04": 5, "C14.280": 3}, "by_type": {"yesno": 6, "factoid": 2},
                   "by_label": {"yes": 5, "no": 1, "": 2}},
        "removed": {"near_duplicate": 3, "contamination_pmid": 1, "cap_label": 0},
        "decontamination": {"pubmedqa_l": {"pmid": 1, "ngram": 0}},
        "mesh_year": 2023, "backends": ["openai"], "models": ["gpt-4o-mini-2024-07-18"],
        "prompt_versions": ["answer_v1", "generate_domain_v1", "generate_general_v1",
                            "judge_v1"],
    }


def _stats(seed: int = 0, margins: int = 4) -> CardStats:
    rng = np.random.default_rng(seed)
    return CardStats(
        items_per_subtree={"C04": 5, "C14.280": 3},
        hierarchy_scores=rng.random(8),
        judge_scores={c: rng.integers(1, 6, 8).astype(np.int8) for c in JUDGE_CRITERIA},
        question_types={"yesno": 6, "factoid": 2}, labels={"yes": 5, "no": 1, "": 2},
        pair_margins=rng.random(margins))


SAMPLES = {"sft": {"messages": [{"role": "user", "content": "Does X cause Y? " + "z" * 2000}],
                   "metadata": {"item_id": 1, "hierarchy_score": 0.5}},
           "dpo": {"prompt": [{"role": "system", "content": "Write one question"}],
                   "chosen": [], "rejected": [], "metadata": {"margin": 0.25}}}


def _front(card: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "no YAML front matter"
    data: dict[str, Any] = yaml.safe_load(match.group(1))
    return data


@pytest.fixture
def export(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    return tmp_path / "export", _write_export(tmp_path / "export", ROWS)


# --- features and sizes ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(SCHEMAS))
def test_features_are_what_datasets_writes(fmt: str) -> None:
    datasets = pytest.importorskip("datasets")
    expected = datasets.Features.from_arrow_schema(SCHEMAS[fmt])._to_yaml_list()
    assert hf_features(SCHEMAS[fmt]) == expected


def test_features_of_other_arrow_types_match_datasets_too() -> None:
    datasets = pytest.importorskip("datasets")
    schema = pa.schema([
        ("nested", pa.list_(pa.list_(pa.int64()))), ("large", pa.large_list(pa.string())),
        ("fixed", pa.list_(pa.float32(), 3)), ("half", pa.float16()),
        ("deep", pa.struct([("x", pa.struct([("y", pa.list_(pa.bool_()))]))])),
        ("when", pa.timestamp("ms", tz="UTC")), ("day", pa.date32()), ("ms", pa.date64()),
        ("coded", pa.dictionary(pa.int32(), pa.string())), ("raw", pa.binary(4)),
        ("blob", pa.binary()), ("big", pa.large_string()), ("u", pa.uint16()),
        ("structs", pa.list_(pa.struct([("k", pa.list_(pa.float64()))]))),
    ])
    assert hf_features(schema) == datasets.Features.from_arrow_schema(schema)._to_yaml_list()
    with pytest.raises(TypeError):
        hf_features(pa.schema([("m", pa.map_(pa.string(), pa.int64()))]))


@pytest.mark.parametrize(("n", "bucket"), [
    (0, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"), (9_999, "1K<n<10K"),
    (10_000, "10K<n<100K"), (99_999, "10K<n<100K"), (100_000, "100K<n<1M"),
    (999_999, "100K<n<1M"), (1_000_000, "1M<n<10M"), (10**7, "10M<n<100M"),
    (10**9, "1B<n<10B"), (10**12 - 1, "100B<n<1T"), (10**12, "n>1T")])
def test_size_category_bucket_edges(n: int, bucket: str) -> None:
    assert size_category(n) == bucket


def test_size_category_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        size_category(-1)


# --- the card -------------------------------------------------------------------------


def test_front_matter_parses_and_matches_the_manifest(
        export: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = export
    card = render_card(manifest, _stats(), SAMPLES, sorted(render_plots(_stats())))
    front = _front(card)
    configs = front["configs"]
    assert [c["config_name"] for c in configs] == [f for f in FORMATS if f in ROWS]
    assert [c.get("default", False) for c in configs] == [True] + [False] * (len(configs) - 1)
    for config in configs:
        fmt = config["config_name"]
        assert {d["split"]: d["path"] for d in config["data_files"]} == \
            manifest["data_files"][fmt]
    infos = {i["config_name"]: i for i in front["dataset_info"]}
    assert list(infos) == [c["config_name"] for c in configs]
    for fmt, info in infos.items():
        assert {s["name"]: s["num_examples"] for s in info["splits"]} == ROWS[fmt]
        assert info["features"] == hf_features(SCHEMAS[fmt])
        assert info["download_size"] == sum(
            sh["bytes"] for sh in manifest["shards"] if sh["format"] == fmt)
    assert front["license"] == "other" and front["license_name"] and front["license_link"]
    assert front["language"] == ["en"]
    assert front["size_categories"] == ["n<1K"]
    assert {"question-answering", "text-generation"} <= set(front["task_categories"])
    assert {"biomedical", "pubmed", "mesh", "synthetic", "kailin"} <= set(front["tags"])

    hub = DatasetCard(card)
    assert isinstance(hub.data, DatasetCardData)
    assert hub.data.license == "other" and hub.data.pretty_name == front["pretty_name"]
    assert [c["config_name"] for c in hub.data.to_dict()["configs"]] == list(infos)
    assert hub.text.lstrip().startswith("# ")


def test_only_formats_and_splits_with_files_get_configs(tmp_path: Path) -> None:
    manifest = _write_export(tmp_path, {"dpo": {"train": 2}, "sft": {"train": 3, "test": 1}})
    manifest["data_files"]["qca"] = {"train": []}  # a format without any file
    front = _front(render_card(manifest, _stats(), {}, []))
    assert [c["config_name"] for c in front["configs"]] == ["sft", "dpo"]
    assert [d["split"] for d in front["configs"][1]["data_files"]] == ["train"]


def test_card_leaves_out_the_export_id_and_time(export: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = export
    card = render_card(manifest, _stats(), SAMPLES, PLOTS)
    assert EXPORT_ID not in card and CREATED_AT not in card
    assert "2026-12-02" not in card and "3fa2c1" not in card
    other = manifest | {"export_id": "20270101T000000Z-000000", "created_at": "2027-01-01"}
    assert render_card(other, _stats(), SAMPLES, PLOTS) == card


def test_card_is_byte_identical_on_re_render(export: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = export
    first = render_card(manifest, _stats(), SAMPLES, sorted(PLOTS))
    again = render_card(json.loads(json.dumps(manifest)), _stats(), dict(SAMPLES),
                        reversed(sorted(PLOTS)))
    assert again.encode() == first.encode()
    assert render_card(manifest | {"mesh_year": 2024}, _stats(), SAMPLES, PLOTS) != first


def test_card_credits_nlm_and_names_the_mesh_year(export: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = export
    card = render_card(manifest, _stats(), SAMPLES, [])
    assert "National Library of Medicine (NLM)" in card
    assert "2023 MeSH" in card
    assert "not NLM's own" in card and "does not endorse" in card
    assert "publishers" in card  # copyright of the abstracts is theirs
    unknown = render_card(manifest | {"mesh_year": None}, _stats(), SAMPLES, [])
    assert "MeSH year was not recorded" in unknown


def test_card_body_reports_method_settings_counts_and_cleaning(
        export: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = export
    body = render_card(manifest, _stats(), SAMPLES, []).split("\n---\n", 1)[1]
    for text in ("KAILIN", "2501.15108", "gpt-4o-mini-2024-07-18", "`openai`",
                 "generate_domain_v1", "groundedness ≥ 4", "0.2",
                 "| `sft` |", "| `dpo` |", "`near_duplicate` | 3", "`contamination_pmid` | 1",
                 "`pubmedqa_l` | 1 | 0", "92.8%", "yes 83.3%", "heuristic", "Abstracts only",
                 'load_dataset("path/to/export", "sft")', "DPOTrainer", "completion only"):
        assert text in body, text
    assert "cap_label" not in body  # a reason that removed nothing is not listed
    assert "offline" not in body


def test_plots_are_embedded_in_card_order(export: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = export
    card = render_card(manifest, _stats(), {}, sorted(PLOTS))
    embedded = re.findall(r"!\[[^\]]+\]\((plots/[^)]+)\)", card)
    assert embedded == list(PLOTS)
    assert "![" not in render_card(manifest, _stats(), {}, [])


def test_samples_are_clipped_valid_json(export: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = export
    card = render_card(manifest, _stats(), SAMPLES, [])
    blocks = re.findall(r"```json\n(.*?)\n```", card, re.S)
    assert len(blocks) == 2  # sft and dpo: the formats with a sample
    sft = json.loads(blocks[0])
    content = sft["messages"][0]["content"]
    assert content.startswith("Does X cause Y?") and content.endswith("more characters]")
    assert len(content) < 400
    assert "z" * 2000 not in card


def test_missing_optional_keys_do_not_crash() -> None:
    empty = CardStats({}, np.zeros(0), {}, {}, {})
    card = render_card({"formats": {"sft": {"train": 2}},
                        "data_files": {"sft": {"train": ["sft/train-00000-of-00001.parquet"]}}},
                       empty, {}, [])
    front = _front(card)
    assert front["dataset_info"][0]["splits"] == [
        {"name": "train", "num_bytes": 0, "num_examples": 2}]
    assert "National Library of Medicine" in render_card({}, empty, {}, [])


# --- plots ----------------------------------------------------------------------------


def test_plots_are_png_deterministic_and_follow_the_stats() -> None:
    plots = render_plots(_stats())
    assert list(plots) == list(PLOTS)
    for data in plots.values():
        assert data.startswith(PNG_MAGIC)
        assert b"Software" not in data and b"tEXt" not in data
        assert len(data) < 60_000
    assert render_plots(_stats()) == plots
    changed = render_plots(_stats(seed=1))
    assert changed["plots/hierarchy_scores.png"] != plots["plots/hierarchy_scores.png"]
    assert changed["plots/judge_scores.png"] != plots["plots/judge_scores.png"]
    assert changed["plots/items_per_subtree.png"] == plots["plots/items_per_subtree.png"]


def test_plots_with_nothing_to_show_are_left_out() -> None:
    assert "plots/pair_margins.png" not in render_plots(_stats(margins=0))
    assert render_plots(CardStats({}, np.zeros(0), {}, {}, {})) == {}


def test_plots_ignore_and_keep_the_callers_matplotlib_settings() -> None:
    plain = render_plots(_stats())
    before = dict(matplotlib.rcParams)
    with matplotlib.rc_context({"axes.facecolor": "black", "font.size": 20}):
        assert render_plots(_stats()) == plain
    assert dict(matplotlib.rcParams) == before
    pyplot = __import__("sys").modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()


# --- end to end: datasets reads the card ----------------------------------------------


@pytest.fixture
def offline_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return datasets


def _publish(root: Path, manifest: dict[str, Any]) -> None:
    stats = _stats()
    plots = render_plots(stats)
    for name, data in plots.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "README.md").write_text(render_card(manifest, stats, SAMPLES, sorted(plots)),
                                    encoding="utf-8")


def test_load_dataset_reads_every_config_of_the_card(
        export: tuple[Path, dict[str, Any]], offline_datasets: Any, tmp_path: Path) -> None:
    root, manifest = export
    _publish(root, manifest)
    cache = str(tmp_path / "cache")
    sft = offline_datasets.load_dataset(str(root), "sft", cache_dir=cache)
    assert {s: sft[s].num_rows for s in sft} == ROWS["sft"]
    assert list(sft) == ["train", "validation", "test"]
    assert sft["train"].column_names == ["messages", "metadata"]
    assert sft["train"][0]["messages"][0] == {"role": "text 0", "content": "text 0"}
    for fmt, rows in ROWS.items():
        ds = offline_datasets.load_dataset(str(root), fmt, cache_dir=cache)
        assert {s: ds[s].num_rows for s in ds} == rows, fmt
        assert ds[next(iter(rows))].features == \
            offline_datasets.Features.from_arrow_schema(SCHEMAS[fmt]), fmt
    default = offline_datasets.load_dataset(str(root), cache_dir=cache)
    assert default["train"].column_names == ["messages", "metadata"]


def test_datasets_takes_the_cards_dataset_info_whole(
        export: tuple[Path, dict[str, Any]], offline_datasets: Any,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # datasets warns and ignores part of a config's split sizes when a split lacks a field
    # it expects (num_bytes): read the card as it does and watch for that warning.
    _, manifest = export
    card = DatasetCard(render_card(manifest, _stats(), {}, []))
    monkeypatch.setattr(logging.getLogger("datasets"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        infos = offline_datasets.info.DatasetInfosDict.from_dataset_card_data(card.data)
    assert not [r for r in caplog.records if "dataset_info" in r.getMessage()]
    assert list(infos) == [f for f in FORMATS if f in ROWS]
    for fmt, info in infos.items():
        assert {s: info.splits[s].num_examples for s in info.splits} == ROWS[fmt]
        assert info.features == offline_datasets.Features.from_arrow_schema(SCHEMAS[fmt])


def test_load_dataset_checks_the_cards_split_sizes(
        tmp_path: Path, offline_datasets: Any) -> None:
    root = tmp_path / "export"
    manifest = _write_export(root, {"sft": {"train": 3, "test": 1}})
    manifest["formats"]["sft"]["train"] = 4  # the card now disagrees with the file
    _publish(root, manifest)
    with pytest.raises(offline_datasets.exceptions.NonMatchingSplitsSizesError):
        offline_datasets.load_dataset(str(root), "sft", cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("file_format", ["jsonl", "jsonl.gz"])
def test_load_dataset_reads_json_lines_shards_with_the_schemas_types(
        tmp_path: Path, offline_datasets: Any, file_format: str) -> None:
    root = tmp_path / "export"
    rows = {"sft": {"train": 3, "test": 1}, "dpo": {"train": 2}}
    _publish(root, _write_export(root, rows, file_format))
    for fmt, counts in rows.items():
        ds = offline_datasets.load_dataset(str(root), fmt, cache_dir=str(tmp_path / "c"))
        assert {s: ds[s].num_rows for s in ds} == counts
        assert ds["train"].features == offline_datasets.Features.from_arrow_schema(SCHEMAS[fmt])
