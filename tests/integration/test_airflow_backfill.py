"""Backfill over MeSH branches with a running scheduler: ``airflow backfill create`` on
``pubmed_ingest`` against the local E-utilities server, and ``distill`` and
``export_shards`` following through assets.

N past days for two subtrees give N runs, each fetching its own day; no article is
stored twice, watermarks never move back, the downstream runs follow, and running the
backfill again (reprocessing the completed runs) changes nothing and pays no LLM call
twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from typing import Any

import pytest
from meshdistill.store.db import get_engine
from sqlalchemy import text

from tests.fakes.eutils_server import FakeEutils, baseline_corpus, explode_from_mtrees
from tests.live_airflow import LiveAirflow, ncbi_connection, running_airflow
from tests.support import load_test_mesh

pytestmark = pytest.mark.integration

FIRST, LAST = date(1977, 5, 2), date(1977, 5, 6)
DAYS = [FIRST + timedelta(days=i) for i in range((LAST - FIRST).days + 1)]
SUBTREES = {"C04": "Neoplasms", "C14": "Cardiovascular Diseases"}


@pytest.fixture(scope="module")
def corpus() -> tuple[Any, ...]:
    return baseline_corpus(date(1977, 4, 1), date(1977, 7, 31))


@pytest.fixture(scope="module")
def explode() -> dict[str, set[str]]:
    return explode_from_mtrees(SUBTREES.values())


@pytest.fixture(scope="module")
def airflow(make_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory,
            corpus: tuple[Any, ...], explode: dict[str, set[str]]) -> Iterator[LiveAirflow]:
    pipeline_url = make_database()
    load_test_mesh(pipeline_url)
    home = tmp_path_factory.mktemp("airflow-backfill")
    with (FakeEutils(corpus, explode=explode) as eutils,
          running_airflow(home / "airflow", make_database(), pipeline_url, extra_env={
              "MESHDISTILL_HOME": str(home / "meshdistill"),
              "AIRFLOW_CONN_MESHDISTILL_NCBI": ncbi_connection(eutils.base_url)}) as af):
        yield af


def _expected(corpus: tuple[Any, ...], explode: dict[str, set[str]]) -> dict[str, set[int]]:
    return {prefix: {int(a.pmid) for a in corpus if a.entrez in DAYS
                     and a.mesh & explode[name.lower()]}
            for prefix, name in SUBTREES.items()}


def _snapshot(url: str) -> dict[str, Any]:
    with get_engine(url).connect() as conn:
        one = lambda sql: conn.execute(text(sql)).scalar_one()  # noqa: E731
        return {
            "articles": one("SELECT count(*) FROM article"),
            "article_mesh": one("SELECT count(*) FROM article_mesh"),
            "watermarks": dict(conn.execute(text(
                "SELECT subtree, watermark FROM ingest_watermark WHERE source = 'eutils'")).all()),
            "qa_items": one("SELECT count(*) FROM qa_item"),
            "qa_fingerprint": one("SELECT md5(string_agg(subtree || source_pmid || profile "
                                  "|| ordinal || state, ',' ORDER BY id)) FROM qa_item"),
            "llm_calls": one("SELECT count(*) FROM llm_call"),
            "exports": one("SELECT count(*) FROM export"),
        }


def _settled(airflow: LiveAirflow, api: Any) -> None:
    """Wait until every ingest run ended and the asset chain went quiet: no ARTICLES or QA
    event waits for a run, and every distill and export run ended."""
    def quiet(dag_id: str) -> Callable[[list[dict[str, Any]]], bool]:
        def done(runs: list[dict[str, Any]]) -> bool:
            queued = api.get(f"/api/v2/dags/{dag_id}/assets/queuedEvents")
            waiting = queued.status_code == 200 and queued.json()["total_entries"] > 0
            return bool(runs) and not waiting and all(
                r["state"] in ("success", "failed") for r in runs)
        return done

    airflow.wait_for(api, "pubmed_ingest", lambda runs: sum(
        r["run_type"] == "backfill" for r in runs) >= len(DAYS) and all(
        r["state"] in ("success", "failed") for r in runs), what="the backfill runs")
    airflow.wait_for(api, "distill", quiet("distill"), what="the asset-triggered runs")
    airflow.wait_for(api, "export_shards", quiet("export_shards"), what="the export runs")
    # A last look: the export may have been the one to finish last, after distill's check.
    airflow.wait_for(api, "distill", quiet("distill"), what="the asset-triggered runs")


def test_backfill_fetches_each_window_once_and_the_asset_chain_follows(
        airflow: LiveAirflow, corpus: tuple[Any, ...], explode: dict[str, set[str]]) -> None:
    want = _expected(corpus, explode)
    assert all(want.values()), want  # both subtrees have articles in the window
    with airflow.client() as api:
        for dag_id in ("pubmed_ingest", "distill", "export_shards"):
            api.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        # Unpaused, the daily schedule runs at once for the last complete day (catchup is
        # off): C04, the form's default, fetched up to yesterday.
        (daily,) = airflow.wait_for(api, "pubmed_ingest", lambda runs: any(
            r["state"] == "success" for r in runs), what="the scheduled run")
        assert daily["run_type"] == "scheduled"
        yesterday = date.fromisoformat(daily["data_interval_start"][:10])
        out = airflow.xcom(api, "pubmed_ingest", daily["dag_run_id"], "ingest_subtree", 0)
        assert out["window"] == [yesterday.isoformat()] * 2 and out["subtree"] == "C04"
        assert out["watermark"] == yesterday.isoformat()

        backfill = ["backfill", "create", "--dag-id", "pubmed_ingest",
                    "--from-date", FIRST.isoformat(), "--to-date", LAST.isoformat(),
                    "--dag-run-conf", json.dumps({"subtrees": list(SUBTREES)})]
        airflow.cli(*backfill)
        _settled(airflow, api)

        runs = [r for r in airflow.runs(api, "pubmed_ingest") if r["run_type"] == "backfill"]
        assert len(runs) == len(DAYS) and all(r["state"] == "success" for r in runs)
        windows: dict[str, list[tuple[str, str]]] = {p: [] for p in SUBTREES}
        marks: dict[str, list[str]] = {p: [] for p in SUBTREES}
        for run in sorted(runs, key=lambda r: r["end_date"]):
            for i, prefix in enumerate(SUBTREES):
                out = airflow.xcom(api, "pubmed_ingest", run["dag_run_id"], "ingest_subtree", i)
                assert out["subtree"] == prefix and out["reconciled"] is True
                windows[prefix].append(tuple(out["window"]))
                marks[prefix].append(out["watermark"])
        # Each run fetched exactly its own day, and every day was fetched once.
        for prefix in SUBTREES:
            assert sorted(windows[prefix]) == [(d.isoformat(), d.isoformat()) for d in DAYS]
            assert marks[prefix] == sorted(marks[prefix])  # never moved back
        first = _snapshot(airflow.pipeline_url)
        assert first["articles"] == len(set().union(*want.values()))
        # The past windows did not pull C04's watermark back from yesterday.
        assert first["watermarks"] == {"C04": yesterday, "C14": LAST}
        assert marks["C04"] == [yesterday.isoformat()] * len(DAYS)

        distills = airflow.runs(api, "distill")
        distilled = {s for r in distills for s in r["conf"].get("subtrees", [])} | {
            e["extra"]["subtrees"][0] for r in distills
            for e in api.get(f"/api/v2/dags/distill/dagRuns/{r['dag_run_id']}/"
                             "upstreamAssetEvents").json()["asset_events"]}
        assert distilled == set(SUBTREES)
        assert distills and all(r["run_type"] == "asset_triggered" for r in distills)
        assert all(r["state"] == "success" for r in distills)
        assert first["qa_items"] > 0 and first["llm_calls"] > 0
        exports = airflow.runs(api, "export_shards")
        assert exports and all(r["state"] == "success" for r in exports)
        # One export per distill run that accepted something; the others were skipped.
        written = [r for r in exports if airflow.task_states(
            api, "export_shards", r["dag_run_id"])[0][2] == "success"]
        assert first["exports"] == len(written) >= 1

        # The same backfill again, completed runs reprocessed: nothing new is stored and no
        # LLM call is paid twice.
        ingest_tries = len(runs)
        airflow.cli(*backfill, "--reprocess-behavior", "completed")
        airflow.wait_for(api, "pubmed_ingest", lambda rs: sum(
            r["run_type"] == "backfill" for r in rs) >= ingest_tries and all(
            r["state"] in ("success", "failed") for r in rs) and any(
            r["end_date"] and r["end_date"] > max(x["end_date"] for x in runs) for r in rs),
            what="the reprocessed backfill")
        _settled(airflow, api)
        assert _snapshot(airflow.pipeline_url) == first
        # The reruns' distill runs accepted nothing new, so their exports were skipped.
        reruns = [r for r in airflow.runs(api, "export_shards") if r["dag_run_id"] not in
                  {x["dag_run_id"] for x in exports}]
        assert reruns  # the reprocessed ingest runs triggered distill, and it export_shards
        for run in reruns:
            assert [t[2] for t in airflow.task_states(api, "export_shards",
                                                      run["dag_run_id"])] == ["skipped"]
