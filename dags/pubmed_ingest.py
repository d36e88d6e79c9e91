"""Daily PubMed ingestion, one mapped task per MeSH subtree."""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task
from meshdistill import pipeline
from meshdistill.pubmed.settings import IngestRequest
from meshdistill_airflow import (
    ARTICLES,
    DEFAULT_ARGS,
    NCBI_POOL,
    database_url,
    fail_fast,
    ncbi_credentials,
    window,
)
from meshdistill_airflow.params import model_params

DOC = """
### pubmed_ingest
Pulls what PubMed added or revised, per MeSH subtree, into the pipeline database.

- **source = `eutils`** (default): for each subtree, `esearch "<descriptor>"[MeSH Terms]`
  over the run's data interval (Entrez date `edat`, or `mdat` for revisions) on NCBI's
  history server, then `efetch` in batches. Windows holding more than 9,999 records are
  split until each part fits. The subtree's watermark advances only when every id esearch
  counted was fetched. All mapped tasks share one NCBI rate limit (3 requests/s, 10 with
  an API key), kept in Postgres; the `ncbi` pool caps how many run at once.
- **source = `files`**: loads the given MEDLINE baseline/update files (in order; update
  files carry deletions), then reports per-subtree counts.

Backfills just work: `airflow backfill create --dag-id pubmed_ingest --from-date ... --to-date ...`
gives each run its own window, and loads are idempotent. A manual run without a data
interval continues from each subtree's watermark.

Credentials: connection `meshdistill_ncbi` (login = e-mail, password = API key), or the
`NCBI_EMAIL`/`NCBI_API_KEY` environment variables. Database: connection `meshdistill_db`.
Each mapped task is named by its tree number and updates the asset `meshdistill://articles`
with `extra = {"subtrees": [<its tree number>]}`, which the `distill` DAG it triggers
reads to know what to distill.
"""


@dag(
    dag_id="pubmed_ingest",
    # A data-interval timetable: each run covers [start, end) of its day, which becomes
    # the E-utilities date window (a plain "@daily" gives runs without an interval).
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    # MEDLINE's earliest records: backfills may cover any past window. catchup=False keeps
    # the scheduler from creating those runs by itself.
    start_date=pendulum.datetime(1946, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["meshdistill", "pubmed", "ingest"],
    doc_md=DOC,
    params=model_params(IngestRequest, IngestRequest.FORM),
)
def pubmed_ingest() -> None:
    @task
    def validate_subtrees(params: dict[str, Any] | None = None) -> list[str]:
        assert params is not None
        with fail_fast():
            request = pipeline.ingest_request(params)
            return pipeline.validate_subtrees(request.subtrees, database_url())

    @task
    def load_files(params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        assert params is not None
        with fail_fast():
            request = pipeline.ingest_request(params)
            if request.source != "files":
                return None
            return pipeline.load_pubmed_files(list(request.files), database_url())

    @task(pool=NCBI_POOL, map_index_template="{{ subtree }}", outlets=[ARTICLES])
    def ingest_subtree(subtree: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        assert params is not None
        context = get_current_context()
        context["subtree"] = subtree  # type: ignore[typeddict-unknown-key]
        # The asset event names its subtree: a `distill` run it triggers distills it.
        context["outlet_events"][ARTICLES].extra = {"subtrees": [subtree]}
        with fail_fast():
            request = pipeline.ingest_request(params)
            if request.source == "files":
                return pipeline.subtree_counts(subtree, database_url())
            start, end = window(context)
            return pipeline.ingest_subtree_window(
                subtree,
                start,
                end,
                database_url=database_url(),
                datetype=request.datetype,
                **ncbi_credentials(),
            )

    subtrees = validate_subtrees()
    load_files() >> subtrees
    ingest_subtree.expand(subtree=subtrees)


pubmed_ingest()
