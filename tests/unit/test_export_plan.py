"""Export planning without a database: splits, MinHash, duplicates, caps, shard names."""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash
from meshdistill.export import dedup, plan
from meshdistill.export.benchmarks import Benchmark, ContaminationIndex
from meshdistill.export.dedup import MinHasher, NearDuplicates, band_layout
from meshdistill.export.plan import Population, Rows
from meshdistill.export.schemas import SCHEMAS
from meshdistill.export.settings import FORMATS, ExportSettings
from meshdistill.export.shards import ShardSet, shard_names
from meshdistill.export.splits import split_index
from meshdistill.export.text import Tokens, normalize_text, word_ngrams, words
from pydantic import ValidationError

QUESTIONS = [
    "Does tamoxifen reduce the recurrence of estrogen receptor positive breast cancer "
    "in postmenopausal women?",
    "Which genes are mutated most often in pediatric acute lymphoblastic leukemia?",
    "Is adjuvant radiotherapy associated with longer survival after resection of "
    "glioblastoma multiforme?",
]


def test_normalisation_folds_case_width_punctuation_and_space() -> None:
    wide = "  Does ＴＡＭＯＸＩＦＥＮ -- work?!\n(yes) "
    assert normalize_text(wide) == "does tamoxifen work yes"
    assert word_ngrams(words("a b c"), 5) == ["a b c"]
    assert len(word_ngrams(words(QUESTIONS[0]), 5)) == len(words(QUESTIONS[0])) - 4


def _datasketch(question: str) -> MinHash:
    m = MinHash(num_perm=128)
    m.update_batch([s.encode() for s in word_ngrams(words(question), 5)])
    return m


def test_signatures_estimate_jaccard_as_datasketch_does() -> None:
    """Our signatures and datasketch's estimate the same Jaccard similarities of
    question pairs spanning 0 to 1 (each within sampling error of the true value)."""
    base = words(QUESTIONS[0] + " " + QUESTIONS[2])
    variants = [" ".join(base[:len(base) - k] + [f"w{j}" for j in range(k)])
                for k in range(0, len(base), 2)]
    sigs = MinHasher().signatures(Tokens.of([*variants, "?!", "one"]))
    assert (sigs[-2] == np.iinfo(np.uint32).max).all()  # no words: never a candidate
    assert (sigs[-1] < np.iinfo(np.uint32).max).all()  # one word: one shingle
    reference = _datasketch(variants[0])
    for i, v in enumerate(variants):
        a = set(word_ngrams(words(variants[0]), 5))
        b = set(word_ngrams(words(v), 5))
        true = len(a & b) / len(a | b)
        ours = float((sigs[0] == sigs[i]).mean())
        theirs = reference.jaccard(_datasketch(v))
        assert abs(ours - true) < 0.15 and abs(theirs - true) < 0.15, (i, true, ours, theirs)
    assert np.array_equal(sigs[:3], MinHasher().signatures(Tokens.of(variants[:3])))


def test_word_runs_hash_as_their_words() -> None:
    tokens = Tokens.of(["a b c d e f", "", "x y", "A b, c d E f!", "b c d e f g"])
    whole = tokens.runs().whole()
    assert whole[0] == whole[3] and len({*whole[[0, 1, 2, 4]].tolist()}) == 4
    hashes, offsets = tokens.runs().shingles(5)
    assert np.diff(offsets).tolist() == [2, 0, 1, 2, 2]
    assert hashes[1] == hashes[5]  # "b c d e f" in rows 0 and 4
    assert len(set(hashes.tolist())) == 4


def test_band_layout_is_datasketchs() -> None:
    assert band_layout(0.8) == (9, 13)
    assert band_layout(0.5)[0] > band_layout(0.9)[0]


def test_split_is_a_function_of_pmid_seed_and_ratios() -> None:
    pmids = np.arange(1, 200_001)
    a = split_index(pmids, 7, (0.9, 0.05, 0.05))
    assert np.array_equal(a, split_index(pmids, 7, (0.9, 0.05, 0.05)))
    assert np.array_equal(a[5000:6000], split_index(pmids[5000:6000], 7, (0.9, 0.05, 0.05)))
    shares = np.bincount(a, minlength=3) / len(a)
    assert np.allclose(shares, (0.9, 0.05, 0.05), atol=0.005)
    assert not np.array_equal(a, split_index(pmids, 8, (0.9, 0.05, 0.05)))
    assert set(split_index(pmids[:5000], 7, (0.95, 0.0, 0.05)).tolist()) == {0, 2}


def _population(settings: ExportSettings, rows: list[dict[str, Any]],
                check: Any = None) -> Any:
    pop = Population("items", settings, check)
    pop.add(Rows.of(ids=[r["id"] for r in rows], pmids=[r["pmid"] for r in rows],
                    subtrees=[r.get("subtree", "C04") for r in rows],
                    qtypes=[r.get("qtype", "factoid") for r in rows],
                    labels=[r.get("label") for r in rows], questions=[r["q"] for r in rows],
                    primary=[r.get("h", 0.5) for r in rows],
                    secondary=[r.get("j", 15) for r in rows],
                    contexts=[r.get("ctx", []) for r in rows]))
    return pop.decide()


def test_duplicates_keep_the_best_scored_and_are_counted_by_reason() -> None:
    near = QUESTIONS[0].replace("postmenopausal", "post-menopausal older")
    rows = [
        {"id": 1, "pmid": 11, "q": QUESTIONS[0], "h": 0.4},
        {"id": 2, "pmid": 12, "q": QUESTIONS[0].upper().replace(" ", "  "), "h": 0.9},
        {"id": 3, "pmid": 13, "q": QUESTIONS[0] + " Explain.", "h": 0.3},
        {"id": 4, "pmid": 14, "q": QUESTIONS[1]},
        {"id": 5, "pmid": 15, "q": QUESTIONS[2]},
        {"id": 6, "pmid": 16, "q": near, "h": 0.1},
    ]
    d = _population(ExportSettings(), rows)
    assert d.removed["exact_duplicate"] == 1
    assert 2 in d.ids and 1 not in d.ids  # the better-scored of the exact pair
    assert d.removed["near_duplicate"] == 1 and 3 not in d.ids  # 19 of 20 shingles shared
    assert 6 in d.ids  # two words changed: Jaccard well below 0.8
    assert list(d.ids) == sorted(d.ids)


def test_contamination_strict_splits_and_caps() -> None:
    check = ContaminationIndex([Benchmark("bench", "bench.json", frozenset({999}),
                                          (QUESTIONS[1],))])

    rows = [{"id": i, "pmid": 100 + i, "q": f"{QUESTIONS[2]} case {i} of {i * 7} {i * 13}",
             "subtree": "C04" if i % 2 else "C14", "h": i / 100} for i in range(1, 41)]
    rows += [{"id": 41, "pmid": 999, "q": "What is measured in trial nine nine nine?"},
             {"id": 42, "pmid": 142, "q": QUESTIONS[1]},
             {"id": 43, "pmid": 143, "q": "Is x y z related to q r s?", "ctx": [999]}]
    for r in rows[40:]:
        r["subtree"] = "C15"
    d = _population(ExportSettings(near_dup_threshold=1.0), rows, check)
    assert d.removed["contamination_pmid"] == 2 and d.removed["contamination_ngram"] == 1
    assert d.by_benchmark == {"bench:ngram": 1, "bench:pmid": 2}
    capped = _population(ExportSettings(near_dup_threshold=1.0, max_per_subtree=5), rows)
    c04 = [i for i in capped.ids if i % 2 and i <= 40]
    assert c04 == [31, 33, 35, 37, 39]  # the best-scored five of C04
    assert capped.removed["cap_subtree"] == 30  # 15 of C04, 15 of C14, none of C15
    settings = ExportSettings(near_dup_threshold=1.0, split_ratios=(0.5, 0.25, 0.25))
    split = dict(zip(range(1, 41), split_index([100 + i for i in range(1, 41)], settings.seed,
                                                settings.split_ratios), strict=True))
    foreign = next(i for i in range(2, 41) if split[i] != split[1])
    leaky = [{**r, "ctx": [100 + foreign]} if r["id"] == 1 else r for r in rows[:40]]
    assert _population(settings, leaky).cross_split == 1
    strict = _population(settings.model_copy(update={"strict_splits": True}), leaky)
    assert strict.removed["cross_split_context"] == 1 and 1 not in strict.ids


def test_cross_split_contexts_are_the_same_checked_in_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    pmids = rng.integers(1, 60, size=200)
    rows = [{"id": i + 1, "pmid": int(p), "q": f"question {i} about {p}",
             "ctx": [int(c) for c in rng.integers(1, 80, size=int(rng.integers(0, 4)))]}
            for i, p in enumerate(pmids)]
    settings = ExportSettings(near_dup_threshold=1.0, strict_splits=True,
                              split_ratios=(0.5, 0.25, 0.25))
    whole = _population(settings, rows)
    monkeypatch.setattr(plan, "CHUNK_ROWS", 7)
    chunked = _population(settings, rows)
    assert whole.removed["cross_split_context"] == chunked.removed["cross_split_context"] > 0
    assert np.array_equal(whole.ids, chunked.ids)
    by_id = {r["id"]: r for r in rows}
    split = dict(zip(whole.ids.tolist(), whole.split.tolist(), strict=True))
    kept_source_split = {by_id[i]["pmid"]: split[i] for i in split}
    for i in split:  # no kept item shows the source article of a kept item in another split
        assert all(kept_source_split.get(c, split[i]) == split[i]
                   for c in by_id[i]["ctx"] if c != by_id[i]["pmid"])


def test_majority_label_cap() -> None:
    rows = [{"id": i, "pmid": i, "qtype": "yesno", "label": "yes" if i <= 30 else "no",
             "q": f"Is marker {i} raised in tumour {i * 3} tissue of type {i * 11}?",
             "h": i / 100} for i in range(1, 41)]
    d = _population(ExportSettings(near_dup_threshold=1.0, max_label_share=0.6), rows)
    labels = d.counts()["by_label"]
    assert labels == {"no": 10, "yes": 15}
    assert d.removed["cap_label"] == 15
    assert [i for i in d.ids if i <= 30] == list(range(16, 31))  # the best-scored yes


def test_near_duplicates_scale_with_bounded_state(tmp_path: Any) -> None:
    nd = NearDuplicates(0.8, workdir=tmp_path)
    # the last word differs: Jaccard 13/15 (or 9/11) within each of three families
    qs = [f"{QUESTIONS[i % 3]} in cohort {i}" for i in range(3000)]
    nd.add(Tokens.of(qs[:1500]))
    nd.add(Tokens.of(qs[1500:]))
    dropped, pairs = nd.duplicates(np.arange(3000), np.ones(3000, dtype=bool))
    nd.close()
    assert pairs > 0 and 2000 < dropped.sum() < 3000
    assert not list(tmp_path.iterdir())  # the signature file is removed


def test_settings_and_shard_names() -> None:
    assert ExportSettings().formats == FORMATS
    with pytest.raises(ValidationError):
        ExportSettings(split_ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ValidationError):
        ExportSettings(formats=("csv",))  # type: ignore[arg-type]
    assert ExportSettings(file_format="both").file_formats() == ("parquet", "jsonl.gz")
    assert shard_names("sft", "train", "parquet", 250, 100) == [
        "sft/train-00000-of-00003.parquet", "sft/train-00001-of-00003.parquet",
        "sft/train-00002-of-00003.parquet"]
    assert shard_names("sft", "test", "jsonl.gz", 0, 100) == []


def test_stored_signatures_read_back_across_chunks(tmp_path: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedup, "READ_ROWS", 7)  # many chunk boundaries in 50 rows
    qs = [f"{QUESTIONS[i % 3]} seen in patient group number {i}" for i in range(50)]
    nd = NearDuplicates(0.8, workdir=tmp_path)
    nd.add(Tokens.of(qs[:23]))
    nd.add(Tokens.of(qs[23:]))
    nd._file.flush()
    rows = np.array([0, 6, 7, 8, 20, 21, 48, 49])
    want = MinHasher().signatures(Tokens.of(qs))[rows].astype(np.uint16)
    assert np.array_equal(nd._stored(rows), want)
    nd.close()


def test_candidates_verified_in_chunks_give_the_same_duplicates(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    qs = [f"{QUESTIONS[i % 3]} seen in patient group number {i % 7}" for i in range(60)]
    rank = np.arange(len(qs))[::-1].copy()
    active = np.ones(len(qs), dtype=np.bool_)

    def found() -> tuple[np.ndarray, int]:
        nd = NearDuplicates(0.8, workdir=tmp_path)
        nd.add(Tokens.of(qs))
        try:
            return nd.duplicates(rank, active)
        finally:
            nd.close()

    whole, pairs = found()
    monkeypatch.setattr(dedup, "VERIFY_EDGES", 3)
    chunked, chunked_pairs = found()
    assert pairs == chunked_pairs > 3
    assert np.array_equal(whole, chunked) and whole.sum() > 0


def test_shard_set_takes_rows_grouped_by_split() -> None:
    fs = fsspec.filesystem("memory")
    table = pa.Table.from_pylist([{"instruction": f"q{i}", "input": "", "output": "a",
                                   "metadata": None} for i in range(3)],
                                 schema=SCHEMAS["alpaca"])
    totals = {"train": 2, "validation": 0, "test": 1}
    with ShardSet(fs, "/grouped", ["alpaca"], ["jsonl"], totals, 10) as shards:
        with pytest.raises(ValueError, match="not grouped by split"):
            shards.write("alpaca", np.array([0, 2, 0], dtype=np.int8), table)
        shards.write("alpaca", np.array([0, 0, 2], dtype=np.int8), table)
        written = shards.close()
    assert {(s.split, s.rows) for s in written} == {("train", 2), ("test", 1)}
    assert fs.cat("/grouped/alpaca/test-00000-of-00001.jsonl").count(b'"q2"') == 1
