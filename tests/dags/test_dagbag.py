"""DagBag integrity: every DAG imports, is documented, tagged and retried."""

from __future__ import annotations

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.support import REPO

EXPECTED = {"mesh_refresh", "pubmed_ingest", "distill", "export_shards"}


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


def _uris(assets: object) -> list[str]:
    return [a.uri.rstrip("/") for a in assets]  # type: ignore[attr-defined]


def test_distill_follows_new_articles_and_updates_the_qa_asset(dagbag: DagBag) -> None:
    from airflow.sdk.definitions.timetables.assets import AssetTriggeredTimetable

    dag = dagbag.dags["distill"]
    assert isinstance(dag.timetable, AssetTriggeredTimetable)
    assert "meshdistill://articles" in str(dag.timetable.asset_condition)
    assert _uris(dag.get_task("summary").outlets) == ["meshdistill://qa"]
    # the pool slots the docs promise are the ones the demo, tests and docker create
    from meshdistill_airflow import POOLS

    assert POOLS["llm"][0] == 4
    assert "airflow pools set llm 4" in (REPO / "docker-compose.yaml").read_text()


def test_distill_maps_a_task_group_per_subtree_with_llm_work_in_the_llm_pool(
    dagbag: DagBag,
) -> None:
    from airflow.sdk.definitions.taskgroup import MappedTaskGroup

    dag = dagbag.dags["distill"]
    group = dag.task_group_dict["subtree"]
    assert isinstance(group, MappedTaskGroup)
    llm_task = dag.get_task("subtree.distill")
    assert llm_task.pool == "llm"
    assert llm_task.map_index_template == "{{ subtree }}"
    assert dag.get_task("subtree.articles").pool != "llm"
    assert {t.task_id for t in dag.tasks} == {
        "validate", "subtree.articles", "subtree.distill", "summary"}
    assert dag.get_task("validate").downstream_task_ids == {
        "subtree.articles", "subtree.distill"}
    assert dag.get_task("summary").upstream_task_ids == {"subtree.distill"}


def test_distill_params_match_the_pipeline_defaults_and_validate(dagbag: DagBag) -> None:
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError
    from meshdistill.distill.settings import DistillSettings

    dag = dagbag.dags["distill"]
    defaults = DistillSettings()
    assert list(dag.params) == [
        "subtrees", *DistillSettings.FORM, "backend", "model", "budget_usd", "budget_tokens"]
    assert dag.params["subtrees"] == ["C04"]
    assert dag.params["processes"] == defaults.processes
    assert dag.params["max_articles"] == defaults.max_articles
    assert dag.params["questions_per_article"] == defaults.questions_per_article
    assert dag.params["thresholds"] == defaults.thresholds.model_dump()
    assert dag.params["min_hierarchy"] == defaults.min_hierarchy
    assert dag.params["backend"] is None and dag.params["budget_usd"] is None
    # The form's defaults are themselves valid pipeline settings.
    DistillSettings.model_validate({k: dag.params[k] for k in (
        "max_articles", "questions_per_article", "question_types", "thresholds",
        "min_hierarchy")})

    params = ParamsDict(dag.params)
    params["subtrees"] = ["C04", "C14.280"]
    params["question_types"] = ["yesno", "list"]
    params["backend"] = "openai"
    params["thresholds"] = {"groundedness": 5, "relevance": 4, "clarity": 3,
                            "informativeness": 2, "safety": 5}
    params["budget_usd"] = 2.5
    params.validate()
    bad: list[tuple[str, object]] = [
        ("subtrees", ["neoplasms"]),
        ("subtrees", []),
        ("question_types", ["essay"]),
        ("backend", "anthropic"),
        ("thresholds", {"groundedness": 6, "relevance": 3, "clarity": 3,
                        "informativeness": 2, "safety": 4}),
        ("thresholds", {"groundedness": 3, "tone": 2}),
        ("min_hierarchy", 1.5),
        ("questions_per_article", 0),
        ("budget_usd", -1),
    ]
    for key, value in bad:
        with pytest.raises(ParamValidationError):
            params[key] = value


def test_llm_connection_becomes_an_llm_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from meshdistill.errors import ConfigError
    from meshdistill_airflow import llm_config

    monkeypatch.delenv("AIRFLOW_CONN_MESHDISTILL_LLM", raising=False)
    assert llm_config() is None
    monkeypatch.setenv("AIRFLOW_CONN_MESHDISTILL_LLM", json.dumps({
        "conn_type": "http", "host": "http://127.0.0.1:8000/v1", "password": "sk-secret-1",
        "extra": {"model": "m", "max_concurrency": 4, "narrow_schema": True}}))
    config = llm_config()
    assert config is not None
    assert (config.kind, config.model, config.base_url, config.max_concurrency,
            config.narrow_schema) == ("openai", "m", "http://127.0.0.1:8000/v1", 4, True)
    assert config.api_key == "sk-secret-1" and "sk-secret-1" not in repr(config)
    monkeypatch.setenv("AIRFLOW_CONN_MESHDISTILL_LLM", json.dumps({
        "conn_type": "http", "host": "llm.internal", "port": 8080, "schema": "http"}))
    config = llm_config()
    assert config is not None and config.base_url == "http://llm.internal:8080"
    monkeypatch.setenv("AIRFLOW_CONN_MESHDISTILL_LLM", json.dumps({
        "conn_type": "http", "host": "x", "extra": {"temperature": 0}}))
    with pytest.raises(ConfigError, match="temperature"):
        llm_config()
    monkeypatch.setenv("AIRFLOW_CONN_MESHDISTILL_LLM", json.dumps({
        "conn_type": "http", "host": "x", "extra": {"narrow_schema": "false"}}))
    with pytest.raises(ConfigError, match=r"narrow_schema.*true or false"):
        llm_config()


def test_asset_subtrees_reads_the_triggering_events() -> None:
    from types import SimpleNamespace

    from meshdistill_airflow import ARTICLES, QA, asset_subtrees

    events = [SimpleNamespace(extra={"subtrees": ["C14"]}),
              SimpleNamespace(extra={"subtrees": ["C04", "C14"]}),
              SimpleNamespace(extra={})]
    context = {"triggering_asset_events": {ARTICLES: events}}
    assert asset_subtrees(context, ARTICLES) == ["C14", "C04"]
    assert asset_subtrees(context, QA) == []
    assert asset_subtrees({}, ARTICLES) == []


def test_asset_triggered_tells_a_scheduled_run_from_a_manual_one() -> None:
    from types import SimpleNamespace

    from meshdistill_airflow import ARTICLES, QA, asset_triggered

    context = {"triggering_asset_events": {QA: [SimpleNamespace(extra={"accepted": 3})]}}
    assert asset_triggered(context, QA)
    assert not asset_triggered(context, ARTICLES)
    assert not asset_triggered({}, QA)  # a manual run


def test_export_shards_follows_distill_and_updates_the_exports_asset(dagbag: DagBag) -> None:
    dag = dagbag.dags["export_shards"]
    assert "meshdistill://qa" in str(dag.timetable.asset_condition)
    assert _uris(dag.get_task("export").outlets) == ["meshdistill://exports"]
    assert dag.params["split_ratios"] == [0.9, 0.05, 0.05]
    assert dag.params["formats"] == ["sft", "prompt_completion", "dpo", "alpaca", "sharegpt",
                                     "qca"]


def test_mapped_results_are_a_list_for_one_instance_or_many() -> None:
    """Airflow gives the consumer of a one-instance mapped task group its bare value."""
    from meshdistill_airflow import mapped_results

    one = {"subtree": "C04", "accepted": 1}
    assert mapped_results(one) == [one]
    assert mapped_results([one, {"subtree": "C14"}]) == [one, {"subtree": "C14"}]
    assert mapped_results(iter([one])) == [one]


def test_an_export_with_nothing_to_write_fails_without_retries() -> None:
    from meshdistill.errors import NothingToExportError
    from meshdistill_airflow import PERMANENT_ERRORS

    assert NothingToExportError in PERMANENT_ERRORS
