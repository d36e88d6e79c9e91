"""Distil QA training data from the ingested abstracts, one mapped task group per subtree."""

from __future__ import annotations

import logging
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task, task_group
from meshdistill import pipeline
from meshdistill.distill.settings import DistillRequest, DistillSettings
from meshdistill_airflow import (
    ARTICLES,
    DEFAULT_ARGS,
    LLM_POOL,
    QA,
    database_url,
    fail_fast,
    llm_config,
    mapped_results,
    run_subtrees,
)
from meshdistill_airflow.params import model_params

log = logging.getLogger(__name__)

DOC = f"""
### distill
Turns each MeSH subtree's ingested abstracts into question–context–answer items (KAILIN):
generate → retrieve contexts → MeSH-hierarchy grade → LLM judge → grounded answer, plus
preference pairs between the two generator profiles. Every candidate ends `accepted`,
`rejected` (reason), `failed` (error) or `deferred` (budget); counts are reconciled with
the stored rows. Runs after `pubmed_ingest` (asset `meshdistill://articles`) on the
subtrees it ingested, or by hand with the form (whose subtrees win). `validate` checks the
subtrees and the LLM; `subtree` (mapped, one per tree number) runs in the **`{LLM_POOL}`**
pool, each task keeping at most `max_concurrency` requests in flight (32 by default);
`summary` logs the per-subtree table (with the tokens the server reported) and updates
`meshdistill://qa`. The Airflow run id is the pipeline's: a cleared task or run redoes its
articles from the `llm_call` cache (which keeps the model's unusable answers too), with no
new calls and no duplicate rows. LLM: connection `meshdistill_llm` (host = base URL,
password = key, extra = `model`, `max_concurrency`, `timeout`, `max_output_tokens`,
`narrow_schema`, ...; a small local server wants `{{"max_concurrency": 2, "timeout": 300,
"max_output_tokens": 1024, "narrow_schema": true}}`, `narrow_schema` holding its model to
evidence among the abstract's sentences); database: `meshdistill_db`. Steps and modules:
`docs/architecture.md`.
"""


def _validated(params: dict[str, Any]) -> tuple[DistillRequest, DistillSettings]:
    return pipeline.distill_request(params), pipeline.distill_settings(params)


@dag(
    dag_id="distill",
    schedule=[ARTICLES],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["meshdistill", "distill", "llm"],
    doc_md=DOC,
    params={**model_params(DistillRequest, ("subtrees",)),
            **model_params(DistillSettings, DistillSettings.FORM),
            **model_params(DistillRequest, ("backend", "model", "budget_usd", "budget_tokens"))},
)
def distill() -> None:
    @task
    def validate(params: dict[str, Any] | None = None) -> list[str]:
        assert params is not None
        with fail_fast():
            request, _ = _validated(params)
            subtrees = pipeline.validate_subtrees(
                run_subtrees(get_current_context(), request.subtrees, ARTICLES), database_url())
            llm = pipeline.llm_for(request, llm_config())
            log.info("LLM backend %s, model %s", llm.kind, llm.model or "(default)")
            pipeline.budget_shares(request.budget_usd, request.budget_tokens, len(subtrees))
            return subtrees

    @task(map_index_template="{{ subtree }}")
    def articles(subtree: str) -> dict[str, Any]:
        get_current_context()["subtree"] = subtree  # type: ignore[typeddict-unknown-key]
        with fail_fast():
            return pipeline.subtree_counts(subtree, database_url())

    @task(task_id="distill", pool=LLM_POOL, map_index_template="{{ subtree }}")
    def distill_one(subtree: str, subtrees: list[str],
                    params: dict[str, Any] | None = None) -> dict[str, Any]:
        assert params is not None
        context = get_current_context()
        context["subtree"] = subtree  # type: ignore[typeddict-unknown-key]
        with fail_fast():
            request, settings = _validated(params)
            usd, tokens = pipeline.budget_shares(request.budget_usd, request.budget_tokens,
                                                 len(subtrees))[subtrees.index(subtree)]
            return pipeline.distill_subtree(
                subtree, run_id=context["run_id"], settings=settings,
                llm=pipeline.llm_for(request, llm_config()), budget_usd=usd,
                budget_tokens=tokens, database_url=database_url())

    @task_group(group_id="subtree")
    def per_subtree(subtree: str, subtrees: list[str]) -> Any:
        """One subtree: its size, then distillation in the llm pool."""
        done = distill_one(subtree, subtrees)
        articles(subtree) >> done
        return done

    @task(outlets=[QA])
    def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
        context = get_current_context()
        out = pipeline.log_summary(pipeline.summarize_runs(mapped_results(results)))
        context["outlet_events"][QA].extra = {
            "run_id": context["run_id"], "subtrees": list(out["subtrees"]),
            **{s: out["totals"][s] for s in ("accepted", "rejected", "failed", "deferred")}}
        return {"run_id": context["run_id"], **out}

    subtrees = validate()
    # The distill outputs of all mapped groups, as one list for the summary.
    results: Any = per_subtree.partial(subtrees=subtrees).expand(subtree=subtrees)
    summary(results)


distill()
