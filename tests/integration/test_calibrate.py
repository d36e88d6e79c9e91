"""``meshdistill calibrate`` on a real database with MeSH 2023, on 100 PubMedQA-L questions.

The full 1,000 take ~25 s and are run by hand (README, "Calibration"); 100 questions keep
this test short while still exercising the shadowed retrieval, the grader and the judge.
"""

from __future__ import annotations

import json

import pytest
from meshdistill.cli import main
from meshdistill.evaluate.calibrate import calibrate
from meshdistill.evaluate.corpus import SHADOWED_TABLES
from meshdistill.evaluate.pubmedqa import load_pqal
from meshdistill.store.db import get_engine
from sqlalchemy import text

from tests.support import PQAL

pytestmark = pytest.mark.integration

KEYS = {"hierarchy_auc", "retrieval_auc", "blend_auc", "judge_auc", "within_question",
        "questions", "positives", "negatives"}


def test_calibrate_cli_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, mesh_loaded_url: str
) -> None:
    monkeypatch.setenv("MESHDISTILL_DATABASE_URL", mesh_loaded_url)
    with get_engine(mesh_loaded_url).begin() as conn:
        articles_before = conn.exec_driver_sql("SELECT count(*) FROM article").scalar_one()

    assert main(["calibrate", "--json", "--limit", "100", "--pqal", str(PQAL)]) == 0
    out = json.loads(capsys.readouterr().out)

    for kind in ("random", "hard"):
        r = out[kind]
        assert set(r) == KEYS
        assert (r["questions"], r["positives"]) == (100, 100)
        for key in ("hierarchy_auc", "retrieval_auc", "blend_auc", "judge_auc"):
            assert 0.0 <= r[key] <= 1.0
            assert 0.0 <= r["within_question"][key] <= 1.0
    assert out["random"]["negatives"] == 500
    assert 450 <= out["hard"]["negatives"] <= 500  # fewer when a question matches < 5 others
    # The MeSH hierarchy separates a question's own abstract from random ones well above
    # chance (0.5); on all 1,000 it is ~0.87.
    assert out["random"]["hierarchy_auc"] >= 0.75
    # Retrieval finds the own abstract against random ones almost always.
    assert out["random"]["retrieval_auc"] >= 0.9
    # Hard negatives are hard for retrieval by construction: lower than on random ones.
    assert out["hard"]["retrieval_auc"] < out["random"]["retrieval_auc"]
    assert set(out["split"]) == {"A", "B"}
    assert (out["split"]["A"]["random"]["questions"]
            + out["split"]["B"]["random"]["questions"]) == 100
    assert out["params"]["n_random"] == 5 and out["params"]["blend_weight"] == 0.5
    assert out["params"]["judge"].startswith("offline/")
    counts = out["counts"]
    assert counts["questions"] == 100
    assert counts["mesh_names_unmapped"] < 0.02 * counts["mesh_names"]
    assert counts["judge_failed"] == 0
    assert set(out["targets"]) == {"hierarchy_random_at_least", "hierarchy_random_met",
                                   "blend_beats_retrieval_hard_met"}

    # The TEMP tables are gone and the real article table is untouched.
    with get_engine(mesh_loaded_url).begin() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM article").scalar_one() == \
            articles_before


def test_calibrate_leaves_the_connection_clean(mesh_loaded_url: str) -> None:
    records = load_pqal(PQAL, limit=30)
    with get_engine(mesh_loaded_url).connect() as conn:
        with conn.begin():
            result = calibrate(conn, records, n_random=3, n_hard=3, judge=False)
            for table in SHADOWED_TABLES:
                assert conn.execute(
                    text("SELECT to_regclass(:t)"), {"t": f"pg_temp.{table}"}
                ).scalar_one() is None
        assert result["random"]["judge_auc"] is None
        assert result["random"]["negatives"] == 90
        assert result["params"]["judge"] is None


def test_calibrate_text_output_states_the_targets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, mesh_loaded_url: str
) -> None:
    monkeypatch.setenv("MESHDISTILL_DATABASE_URL", mesh_loaded_url)
    assert main(["calibrate", "--limit", "40", "--no-judge", "--pqal", str(PQAL)]) == 0
    out = capsys.readouterr().out
    assert "hierarchy" in out and "retrieval" in out and "blend" in out
    assert out.count("target 1 ") == 1 and out.count("target 2 ") == 1

    assert main(["calibrate", "--pqal", str(PQAL.parent / "missing.json")]) == 2
    assert "PubMedQA-L file not found" in capsys.readouterr().err


