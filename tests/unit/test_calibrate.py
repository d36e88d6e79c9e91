"""Calibration without a database: ROC AUC by hand, the AUC tables on a synthetic case,
the PubMedQA-L reader, the A/B split, and the question-matcher variants it tuned."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from meshdistill.distill.grade import Headings, name_variants
from meshdistill.errors import ConfigError
from meshdistill.evaluate.auc import roc_auc
from meshdistill.evaluate.calibrate import (
    HIERARCHY_TARGET,
    Pair,
    PairSet,
    split_half,
    summarize,
    targets,
    verdict,
)
from meshdistill.evaluate.pubmedqa import PqalRecord, default_pqal_path, load_pqal
from meshdistill.fileio import read_text
from meshdistill.mesh.matcher import MeshMatcher

from tests.support import DATA_DIR, PQAL

# --- ROC AUC, checked by hand ---------------------------------------------------------------


def test_auc_counts_pairs_won() -> None:
    # Pairs (p, n): (.9,.1) won, (.9,.85) won, (.8,.1) won, (.8,.85) lost -> 3/4.
    assert roc_auc([0.9, 0.8], [0.1, 0.85]) == 0.75


def test_auc_counts_ties_half() -> None:
    # (.5,.5) tie = 1/2, (.5,.2) won = 1 -> 1.5/2.
    assert roc_auc([0.5], [0.5, 0.2]) == 0.75
    # Two positives, three negatives: 0.3 beats 0.1 and ties 0.3 (1.5); 0.7 beats all (3).
    assert roc_auc([0.3, 0.7], [0.1, 0.3, 0.5]) == pytest.approx(4.5 / 6)


def test_auc_extremes() -> None:
    assert roc_auc([2, 3], [0, 1]) == 1.0
    assert roc_auc([0, 1], [2, 3]) == 0.0
    assert roc_auc([1, 1], [1, 1, 1]) == 0.5  # no information: all ties


def test_auc_needs_both_sides() -> None:
    with pytest.raises(ValueError):
        roc_auc([], [1.0])
    with pytest.raises(ValueError):
        roc_auc([1.0], [])


def test_auc_equals_brute_force_count() -> None:
    rng = random.Random(3)
    for _ in range(20):
        # Few distinct values, so ties are common.
        pos = [rng.randint(0, 6) / 6 for _ in range(rng.randint(1, 15))]
        neg = [rng.randint(0, 6) / 6 for _ in range(rng.randint(1, 15))]
        brute = sum(1.0 if p > n else 0.5 if p == n else 0.0
                    for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))
        assert roc_auc(pos, neg) == pytest.approx(brute)


# --- AUC tables on a synthetic case ---------------------------------------------------------


def _pairset() -> PairSet:
    """Two questions; every figure below is worked out by hand in the test."""
    records = [PqalRecord(1, "q one?", "a", ()), PqalRecord(2, "q two?", "b", ())]

    def pair(q: int, cand: int, kind: str, r: float, h: float, b: float, j: float) -> Pair:
        return Pair(q, cand, kind == "positive", kind, retrieval=r, hierarchy=h, blend=b,
                    judge=j)

    pairs = [
        pair(0, 1, "positive", 0.5, 0.8, 0.65, 4.0),
        pair(0, 2, "random", 0.0, 0.1, 0.05, 1.5),
        pair(0, 3, "hard", 0.6, 0.2, 0.4, 4.0),
        pair(1, 2, "positive", 0.2, 0.3, 0.25, 3.0),
        pair(1, 1, "random", 0.1, 0.4, 0.25, 2.0),
        pair(1, 4, "hard", 0.3, 0.1, 0.2, 3.5),
    ]
    return PairSet(records, {p: Headings(()) for p in (1, 2, 3, 4)}, pairs, {})


def test_summarize_synthetic() -> None:
    out = summarize(_pairset())
    rnd, hard = out["random"], out["hard"]
    # Positives h = .8, .3; random h = .1, .4: .8 beats both, .3 beats .1 only -> 3/4.
    assert rnd["hierarchy_auc"] == 0.75
    # Per question: q0 .8 > .1 (1), q1 .3 < .4 (0) -> mean 0.5.
    assert rnd["within_question"]["hierarchy_auc"] == 0.5
    # Retrieval, random: .5 > 0, .5 > .1, .2 > 0, .2 > .1 -> 1.
    assert rnd["retrieval_auc"] == 1.0
    # Blend, random: .65 beats .05 and .25; .25 beats .05, ties .25 -> 3.5/4.
    assert rnd["blend_auc"] == 0.875
    assert rnd["within_question"]["blend_auc"] == 0.75  # q0: 1, q1: tie 0.5
    # Retrieval, hard: positives .5, .2; hard .6, .3 -> .5 beats .3 only -> 1/4.
    assert hard["retrieval_auc"] == 0.25
    # Blend, hard: .65 beats .4 and .2; .25 beats .2 -> 3/4; per question 1 and 1.
    assert hard["blend_auc"] == 0.75
    assert hard["within_question"]["blend_auc"] == 1.0
    # Judge, hard: 4 vs 4 tie (.5), 4 vs 3.5 (1), 3 vs 4 (0), 3 vs 3.5 (0) -> 1.5/4.
    assert hard["judge_auc"] == 0.375
    assert (rnd["questions"], rnd["positives"], rnd["negatives"]) == (2, 2, 2)
    # Split halves partition the questions.
    assert sum(h["random"]["questions"] for h in out["split"].values()) == 2


def test_summarize_without_judge_reports_none() -> None:
    out = summarize(_pairset(), judged=False)
    assert out["random"]["judge_auc"] is None
    assert out["hard"]["within_question"]["judge_auc"] is None
    assert out["hard"]["blend_auc"] == 0.75


def test_targets_and_verdict_say_plainly_when_not_met() -> None:
    result = summarize(_pairset())
    t = targets(result)
    assert t["hierarchy_random_met"] is False  # 0.75 < 0.85
    assert t["blend_beats_retrieval_hard_met"] is True  # 0.75 > 0.25
    lines = verdict(result)
    assert lines[0].startswith("target 1 NOT MET") and "0.750 < 0.85" in lines[0]
    assert lines[1].startswith("target 2 met") and "0.750 > retrieval alone 0.250" in lines[1]
    assert HIERARCHY_TARGET == 0.85


# --- the data file ----------------------------------------------------------------------


def test_load_pqal_reads_the_real_file() -> None:
    records = load_pqal(PQAL)
    assert len(records) == 1000
    assert [r.pmid for r in records] == sorted(r.pmid for r in records)
    raw = json.loads(read_text(PQAL))
    first = records[0]
    item = raw[str(first.pmid)]
    assert first.question == item["QUESTION"].strip()
    assert first.mesh_names == tuple(item["MESHES"])
    assert item["LONG_ANSWER"].strip() not in first.abstract  # no conclusion
    assert all(c.strip() in first.abstract for c in item["CONTEXTS"])
    assert sum(len(r.mesh_names) for r in records) == 14455
    assert len(load_pqal(PQAL, limit=10)) == 10


def test_default_path_follows_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MESHDISTILL_DATA_DIR", raising=False)
    assert default_pqal_path() == DATA_DIR / "pubmedqa" / "ori_pqal.json.gz" == PQAL
    monkeypatch.setenv("MESHDISTILL_DATA_DIR", str(tmp_path))
    assert default_pqal_path() == tmp_path / "pubmedqa" / "ori_pqal.json.gz"
    with pytest.raises(ConfigError, match="MESHDISTILL_DATA_DIR"):
        load_pqal()
    # A data directory holding the plain file is read as well.
    (tmp_path / "pubmedqa").mkdir()
    (tmp_path / "pubmedqa" / "ori_pqal.json").write_text(read_text(PQAL), encoding="utf-8")
    assert default_pqal_path() == tmp_path / "pubmedqa" / "ori_pqal.json"
    assert len(load_pqal(limit=3)) == 3


def test_split_is_deterministic_and_balanced() -> None:
    pmids = [r.pmid for r in load_pqal(PQAL)]
    halves = [split_half(p) for p in pmids]
    assert halves == [split_half(p) for p in pmids]
    assert set(halves) == {"A", "B"}
    assert 450 <= halves.count("A") <= 550


# --- question-matcher variants (grade.py) --------------------------------------------------


def test_name_variants() -> None:
    assert name_variants("Carcinoma, Squamous Cell") == ["Squamous Cell Carcinoma"]
    assert name_variants("Students, Medical") == ["Medical Students"]
    assert name_variants("Breast Neoplasms") == ["Breast Cancer"]
    assert name_variants("Neoplasms") == ["Cancer"]
    assert name_variants("Hyperbaric Oxygenation") == []
    assert name_variants("Centers for Disease Control and Prevention (U.S.)") == []


def test_name_variants_find_natural_order_in_questions() -> None:
    from meshdistill.distill.grade import add_name_variants

    names = {"D1": {"Fasciitis, Necrotizing"}, "D2": {"Fasciitis"}, "D3": {"Breast Neoplasms"},
             "D4": {"Cancer"}}  # D4 owns 'Cancer' already: no variant may take it
    matcher = MeshMatcher.from_terms({ui: sorted(ns) for ui, ns in names.items()})
    assert matcher.uis("Necrotizing fasciitis: an indication?") == ["D2"]
    add_name_variants(matcher, names)
    assert matcher.uis("Necrotizing fasciitis: an indication?") == ["D1"]
    assert matcher.uis("Do breast cancers recur?") == ["D3"]
    assert matcher.uis("Is cancer curable?") == ["D4"]


def test_retrieval_declares_every_table_its_sql_names() -> None:
    """Calibration shadows ``retrieve.TABLES``: a table retrieve.py's SQL names without
    declaring it would be read from the real corpus and falsify the figures silently."""
    import inspect
    import re

    from meshdistill.distill import retrieve
    from meshdistill.evaluate.corpus import SHADOWED_TABLES

    source = inspect.getsource(retrieve)
    # Table references, less the names of common table expressions ("WITH stale AS (")
    # and "DISTINCT FROM x.col" comparisons.
    pattern = re.compile(r"(?<!DISTINCT )\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+([a-z_][a-z0-9_]*)\b")
    ctes = set(re.findall(r"\b([a-z_][a-z0-9_]*) AS \(", source))
    named = set(pattern.findall(source)) - ctes - {"unnest"}
    assert named, "the pattern found no table: it no longer reads retrieve.py's SQL"
    assert named <= set(retrieve.TABLES), sorted(named - set(retrieve.TABLES))
    assert set(SHADOWED_TABLES) == set(retrieve.TABLES)
