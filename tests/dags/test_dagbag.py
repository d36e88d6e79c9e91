"""DagBag integrity: every DAG imports, is documented, tagged and retried."""

from __future__ import annotations

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.support import REPO

EXPECTED = {"mesh_refresh", "pubmed_ingest"}


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(str(REPO / "dags"))


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}


def test_expected_dags(dagbag: DagBag) -> None:
    assert set(dagbag.dag_ids) >= EXPECTED


def test_every_dag_is_documented_tagged_and_retried(dagbag: DagBag) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert "meshdistill" in dag.tags
        assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id} has no real doc_md"
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_pubmed_ingest_maps_one_task_per_subtree_in_the_ncbi_pool(dagbag: DagBag) -> None:
    dag = dagbag.dags["pubmed_ingest"]
    ingest = dag.get_task("ingest_subtree")
    assert ingest.pool == "ncbi"
    assert ingest.map_index_template == "{{ subtree }}"
    assert [o.uri.rstrip("/") for o in ingest.outlets] == ["meshdistill://articles"]
    from airflow.sdk import CronDataIntervalTimetable

    # Runs must carry a data interval: it is the E-utilities date window.
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.params["subtrees"] == ["C04"]
    assert dag.params["source"] == "eutils"


def test_subtree_param_rejects_invalid_tree_numbers(dagbag: DagBag) -> None:
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(dagbag.dags["pubmed_ingest"].params)
    params["subtrees"] = ["C04", "C14.280"]
    params.validate()
    with pytest.raises(Exception, match="does not match"):
        params["subtrees"] = ["neoplasms"]
