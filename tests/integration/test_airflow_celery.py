"""Scale-out: ``make up EXECUTOR=celery``'s CeleryExecutor on Redis with two workers.

``distill`` over four subtrees runs its mapped tasks on both workers (the hostnames the
task instances record say which), sharing the ``llm`` pool and the run's budget, and its
counts reconcile as on one machine. A backfill of ``pubmed_ingest`` over the same four
subtrees, its tasks spread over both workers, keeps to NCBI's 10 requests per second as
one limit: the local E-utilities server answers 429 past it, and never has to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import date

import pytest
import redis
from meshdistill_airflow.local import CELERY_WORKERS

from tests.fakes.eutils_server import FakeEutils, baseline_corpus, explode_from_mtrees
from tests.live_airflow import LiveAirflow, ncbi_connection, running_airflow
from tests.support import load_test_corpus

pytestmark = pytest.mark.integration

SUBTREES = ["C04", "C14", "C10", "C06"]
NAMES = ["Neoplasms", "Cardiovascular Diseases", "Nervous System Diseases",
         "Digestive System Diseases"]
NCBI_LIMIT = 10  # requests per second with an API key
LLM_SLOTS = 2
# A database of its own on the machine's Redis, so a `make up EXECUTOR=celery` beside the
# tests never shares their queue.
BROKER = os.environ.get("MESHDISTILL_TEST_CELERY_BROKER_URL", "redis://127.0.0.1:6379/7")


@pytest.fixture(scope="module")
def airflow(make_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[LiveAirflow]:
    try:
        redis.Redis.from_url(BROKER, socket_connect_timeout=3).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"the Celery test needs a Redis broker at {BROKER} (set "
                    f"MESHDISTILL_TEST_CELERY_BROKER_URL): {exc}", pytrace=False)
    redis.Redis.from_url(BROKER).flushdb()
    pipeline_url = make_database()
    load_test_corpus(pipeline_url)
    home = tmp_path_factory.mktemp("airflow-celery")
    corpus = baseline_corpus(date(1977, 4, 1), date(1977, 7, 31))
    with (FakeEutils(corpus, explode=explode_from_mtrees(NAMES),
                     rate_limit=NCBI_LIMIT) as fake,
          running_airflow(home / "airflow", make_database(), pipeline_url, executor="celery",
                          extra_env={
                              "MESHDISTILL_HOME": str(home / "meshdistill"),
                              "MESHDISTILL_CELERY_BROKER_URL": BROKER,
                              "AIRFLOW_CONN_MESHDISTILL_NCBI": ncbi_connection(fake.base_url),
                          }) as af):
        af.eutils = fake  # type: ignore[attr-defined]
        yield af


def test_distill_runs_its_mapped_tasks_on_both_workers(airflow: LiveAirflow) -> None:
    with airflow.client() as api:
        api.patch("/api/v2/dags/distill", json={"is_paused": False}).raise_for_status()
        # Fewer llm slots than subtrees and than the workers' 4 task slots: the pool,
        # not the executor, is what must hold the distill tasks back.
        airflow.cli("pools", "set", "llm", str(LLM_SLOTS), "distill tasks at once")
        conf = {"subtrees": SUBTREES, "max_articles": 2, "questions_per_article": 2,
                "backend": "offline", "budget_usd": 1.0}
        r = api.post("/api/v2/dags/distill/dagRuns", json={"logical_date": None, "conf": conf})
        r.raise_for_status()
        run_id = r.json()["dag_run_id"]
        airflow.wait_for(api, "distill", lambda runs: any(
            x["dag_run_id"] == run_id and x["state"] == "success" for x in runs),
            what="the distill run")
        tis = airflow.task_instances(api, "distill", run_id)
        mapped = [t for t in tis if t["task_id"] == "subtree.distill"]
        assert sorted(t["rendered_map_index"] for t in mapped) == sorted(SUBTREES)
        assert all(t["pool"] == "llm" and t["state"] == "success" for t in mapped)
        hosts = {t["hostname"] for t in tis}
        assert {h.split("@")[0] for h in hosts} == set(CELERY_WORKERS), hosts
        # The run's budget, split before mapping, whichever worker runs each share; and
        # the llm pool's 4 slots held across both workers.
        for t in mapped:
            out = airflow.xcom(api, "distill", run_id, "subtree.distill", t["map_index"])
            assert out["budget"]["limit_usd"] == pytest.approx(0.25)
        spans = [(t["start_date"], t["end_date"]) for t in mapped]
        most = max(sum(s <= at < e for s, e in spans) for at, _ in spans)
        assert most <= LLM_SLOTS
        value = airflow.xcom(api, "distill", run_id, "summary")
        assert set(value["subtrees"]) == set(SUBTREES)
        for row in value["subtrees"].values():
            assert row["articles"] == 2
            assert row["candidates"] == sum(row[s] for s in ("accepted", "rejected",
                                                             "failed", "deferred"))


def test_ingest_tasks_on_both_workers_share_one_ncbi_limit(airflow: LiveAirflow) -> None:
    fake: FakeEutils = airflow.eutils  # type: ignore[attr-defined]
    fake.requests.clear()
    airflow.cli("backfill", "create", "--dag-id", "pubmed_ingest", "--from-date",
                "1977-05-02", "--to-date", "1977-05-06",
                "--dag-run-conf", json.dumps({"subtrees": SUBTREES}))
    with airflow.client() as api:
        api.patch("/api/v2/dags/pubmed_ingest", json={"is_paused": False}).raise_for_status()
        runs = airflow.wait_for(api, "pubmed_ingest", lambda rs: sum(
            r["run_type"] == "backfill" for r in rs) == 5 and all(
            r["state"] == "success" for r in rs if r["run_type"] == "backfill"),
            what="the backfill")
        tis = [t for r in runs if r["run_type"] == "backfill"
               for t in airflow.task_instances(api, "pubmed_ingest", r["dag_run_id"])
               if t["task_id"] == "ingest_subtree"]
    assert len(tis) == 5 * len(SUBTREES)
    assert {t["hostname"].split("@")[0] for t in tis} == set(CELERY_WORKERS)
    requests = list(fake.requests)
    # One esearch per task and window, an efetch per batch when there were hits.
    assert len([r for r in requests if r.endpoint == "esearch.fcgi"]) >= len(tis)
    assert [r.status for r in requests if r.status != 200] == []  # no 429: one limit held
    times = sorted(r.time for r in requests)
    busiest = max(sum(t <= u < t + 1.0 for u in times) for t in times)
    assert busiest <= NCBI_LIMIT
