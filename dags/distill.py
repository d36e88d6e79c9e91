"""Distil QA training data from the ingested abstracts, one mapped task group per subtree."""

from __future__ import annotations

import logging
from typing import Any

import pendulum
from airflow.sdk import Param, dag, get_current_context, task, task_group
from meshdistill import pipeline
from meshdistill.distill.candidates import TERMINAL
from meshdistill.distill.settings import JUDGE_CRITERIA, DistillSettings, JudgeThresholds
from meshdistill.llm.config import BACKENDS, LLMConfig
from meshdistill.llm.schemas import QuestionType
from meshdistill_airflow import (
    ARTICLES,
    DEFAULT_ARGS,
    LLM_POOL,
    QA,
    SUBTREE_PATTERN,
    asset_subtrees,
    database_url,
    fail_fast,
    llm_config,
)

log = logging.getLogger(__name__)

DEFAULTS = DistillSettings()
THRESHOLDS = JudgeThresholds()
STATES = TERMINAL  # accepted, rejected, failed, deferred

DOC = f"""
### distill
Turns the ingested abstracts of each MeSH subtree into question–context–answer items
(KAILIN): generate questions (two generator profiles) → retrieve contexts from the local
corpus → grade each question–context pair against the MeSH hierarchy → LLM judge →
grounded answer, plus preference pairs between the two profiles' candidates. Every
candidate ends in exactly one state, `accepted`, `rejected` (with a reason), `failed`
(with an error) or `deferred` (budget reached), and the counts are reconciled with the
rows stored before a task succeeds.

**When it runs**
- After `pubmed_ingest` (schedule = asset `meshdistill://articles`): the run distills the
  subtrees named in the triggering asset events' `extra` (`{{"subtrees": [...]}}`), with
  the default Params for everything else; without such events, the `subtrees` default.
- By hand, with the Params form below. Subtrees given in the form always win.

**Params**
- `subtrees`: MeSH tree-number prefixes (`C04`, `C14.280`); checked against the loaded
  MeSH first, so an unknown one fails the run before any work, naming the closest valid
  ones.
- `max_articles` (default {DEFAULTS.max_articles}; empty = all pending): source articles
  per subtree per run. A run takes, in order: articles this same run already started (a
  cleared or retried task redoes exactly those), articles with failed or deferred
  candidates, then articles never distilled for this subtree and model, newest first.
- `questions_per_article` (default {DEFAULTS.questions_per_article}, per generator
  profile) and `question_types` (`yesno`, `factoid`, `list`, `summary`).
- `backend` (`offline` or `openai`; empty = from the `meshdistill_llm` connection, else
  the environment, else `offline`) and `model` (empty = the connection's or the
  backend's default).
- `thresholds`: the judge's minimum 1–5 score per criterion ({", ".join(JUDGE_CRITERIA)});
  `min_hierarchy`: the minimum MeSH-hierarchy score (0–1).
- `processes` (default {DEFAULTS.processes}): processes > 1 uses that many worker
  processes per task; the in-flight cap is shared (split evenly, as is the budget).
- `budget_usd`, `budget_tokens`: a cap for the whole run, **split evenly over the
  subtrees** (each mapped task gets budget / number of subtrees). When a task reaches its
  share, its remaining candidates are stored as `deferred` and the next run finishes
  them first. Empty = no cap. Cached answers cost nothing.

**Tasks**
- `validate`: checks the subtrees and the LLM settings (a bad backend or connection fails
  here, without retries).
- `subtree` (mapped task group, one per subtree, each instance named by its tree number):
  `articles` logs how many articles the subtree holds; `distill` runs the pipeline in the
  **`{LLM_POOL}` pool**. A pool slot is one running `distill` task (the default pool made
  by `make demo`, the tests and docker-compose has 4 slots); inside a task the backend
  keeps at most `max_concurrency` requests in flight (default 32), so the requests in
  flight across workers are at most slots × max_concurrency.
- `summary`: logs articles, candidates, accepted/rejected/failed/deferred, preference
  pairs and LLM calls (new, and answered from the cache) per subtree, and updates the
  asset `meshdistill://qa` (extra: run id, subtrees, counts per state).

**Re-runs** use the Airflow run id as the pipeline's run id: clearing a task or the run
re-selects the same articles, every LLM answer comes from the `llm_call` cache (zero new
calls) and rows are upserted by natural key (no duplicates). Permanent errors (bad
settings, unknown subtree, bad connection) fail at once; others are retried.

**LLM connection** `meshdistill_llm`: host = OpenAI-compatible base URL (e.g.
`https://api.openai.com/v1`, a vLLM or Ollama server), password = API key, extra JSON =
`model`, `organization`, `max_concurrency`, `timeout`, `max_attempts`,
`client_process` (default true: the HTTP client runs in a child process of the task),
`backend`. The
form's `backend`/`model` override it. The key is never logged. Database: connection
`meshdistill_db`.
"""


def _llm(params: dict[str, Any]) -> LLMConfig:
    """The form's backend/model over the ``meshdistill_llm`` connection."""
    return LLMConfig(backend=params["backend"], model=params["model"]).merged(llm_config())


def _settings(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "max_articles": params["max_articles"],
        "questions_per_article": params["questions_per_article"],
        "question_types": params["question_types"],
        "thresholds": params["thresholds"],
        "min_hierarchy": params["min_hierarchy"],
        "processes": params["processes"],
    }


def _share(total: float | None, parts: int, *, whole: bool = False) -> Any:
    if total is None:
        return None
    return max(1, int(total) // parts) if whole else total / parts


@dag(
    dag_id="distill",
    schedule=[ARTICLES],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["meshdistill", "distill", "llm"],
    doc_md=DOC,
    params={
        "subtrees": Param(["C04"], type="array", minItems=1,
                          items={"type": "string", "pattern": SUBTREE_PATTERN},
                          description="MeSH tree-number prefixes, e.g. C04 (Neoplasms); "
                                      "a run triggered by pubmed_ingest takes its subtrees"),
        "max_articles": Param(DEFAULTS.max_articles, type=["null", "integer"], minimum=1,
                              description="source articles per subtree (empty = all pending)"),
        "questions_per_article": Param(DEFAULTS.questions_per_article, type="integer",
                                       minimum=1, maximum=20,
                                       description="questions per article and generator profile"),
        "question_types": Param([t.value for t in DEFAULTS.question_types], type="array",
                                minItems=1, uniqueItems=True,
                                items={"type": "string", "enum": [t.value for t in QuestionType]},
                                description="BioASQ/PubMedQA question types"),
        "backend": Param(None, type=["null", "string"], enum=[None, *BACKENDS],
                         description="empty = from the meshdistill_llm connection (else offline)"),
        "model": Param(None, type=["null", "string"],
                       description="empty = the connection's or the backend's default"),
        "thresholds": Param(
            THRESHOLDS.model_dump(), type="object", additionalProperties=False,
            required=list(JUDGE_CRITERIA),
            properties={c: {"type": "integer", "minimum": 1, "maximum": 5}
                        for c in JUDGE_CRITERIA},
            description="judge: minimum 1-5 score per criterion to accept"),
        "min_hierarchy": Param(DEFAULTS.min_hierarchy, type="number", minimum=0, maximum=1,
                               description="minimum MeSH-hierarchy score to keep a candidate"),
        "processes": Param(DEFAULTS.processes, type="integer", minimum=1, maximum=16,
                           description="worker processes per distill task; the in-flight "
                                       "cap is shared"),
        "budget_usd": Param(None, type=["null", "number"], minimum=0,
                            description="cap for the whole run, split evenly over subtrees"),
        "budget_tokens": Param(None, type=["null", "integer"], minimum=1,
                               description="token cap for the whole run, split evenly"),
    },
)
def distill() -> None:
    @task
    def validate(params: dict[str, Any] | None = None) -> list[str]:
        assert params is not None
        context = get_current_context()
        requested = params["subtrees"]
        conf = getattr(context.get("dag_run"), "conf", None) or {}
        from_assets = [] if "subtrees" in conf else asset_subtrees(context, ARTICLES)
        if from_assets:
            log.info("subtrees from the triggering asset events: %s", from_assets)
            requested = from_assets
        with fail_fast():
            llm = _llm(params)
            log.info("LLM backend %s, model %s", llm.kind, llm.model or "(default)")
            return pipeline.validate_subtrees(requested, database_url())

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
        n = len(subtrees)
        with fail_fast():
            return pipeline.distill_subtree(
                subtree,
                run_id=context["run_id"],
                settings=_settings(params),
                llm=_llm(params),
                budget_usd=_share(params["budget_usd"], n),
                budget_tokens=_share(params["budget_tokens"], n, whole=True),
                database_url=database_url(),
            )

    @task_group(group_id="subtree")
    def per_subtree(subtree: str, subtrees: list[str]) -> Any:
        """One subtree: its size, then distillation in the llm pool."""
        done = distill_one(subtree, subtrees)
        articles(subtree) >> done
        return done

    @task(outlets=[QA])
    def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
        context = get_current_context()
        per = {r["subtree"]: {
            **{k: r[k] for k in ("articles", "candidates", *STATES, "preference_pairs",
                                 "backend", "model")},
            # LLM answers this run asked for (cache misses) and took from the llm_call cache
            "llm_new_calls": (r.get("llm") or {}).get("misses", 0),
            "llm_cached": (r.get("llm") or {}).get("hits", 0),
        } for r in results}
        log.info("%-12s %8s %10s %9s %9s %7s %9s %6s %9s %7s", "subtree", "articles",
                 "candidates", *STATES, "pairs", "new calls", "cached")
        for prefix, r in per.items():
            log.info("%-12s %8d %10d %9d %9d %7d %9d %6d %9d %7d", prefix, r["articles"],
                     r["candidates"], *(r[s] for s in STATES), r["preference_pairs"],
                     r["llm_new_calls"], r["llm_cached"])
        totals = {k: sum(r[k] for r in per.values())
                  for k in ("articles", "candidates", *STATES, "preference_pairs",
                            "llm_new_calls", "llm_cached")}
        if totals["deferred"]:
            log.warning("%d candidates deferred (budget reached): the next run continues "
                        "them first", totals["deferred"])
        context["outlet_events"][QA].extra = {
            "run_id": context["run_id"], "subtrees": list(per),
            **{s: totals[s] for s in STATES},
        }
        return {"run_id": context["run_id"], "subtrees": per, "totals": totals}

    subtrees = validate()
    # The distill outputs of all mapped groups, as one list for the summary.
    results: Any = per_subtree.partial(subtrees=subtrees).expand(subtree=subtrees)
    summary(results)


distill()
