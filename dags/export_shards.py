"""Write training shards from the accepted items and preference pairs (after distill)."""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import ObjectStoragePath, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException
from meshdistill import pipeline
from meshdistill.errors import NothingToExportError
from meshdistill.export.settings import ExportSettings
from meshdistill_airflow import (
    DEFAULT_ARGS,
    EXPORTS,
    QA,
    asset_triggered,
    database_url,
    fail_fast,
)
from meshdistill_airflow.params import model_params

DOC = """
### export_shards
Writes what `distill` accepted as versioned, leakage-safe training data: formats `sft`,
`prompt_completion`, `dpo` (preference pairs), `alpaca`, `sharegpt` and `qca`, as
Parquet and/or JSON lines, split train/validation/test by a seeded hash of the source
PMID. Exact and MinHash near-duplicate questions, and items overlapping PubMedQA-L or the
benchmark files given, are removed; caps and strict splits are optional. Each export is a
new folder (shards, `manifest.json`, a Hugging Face dataset card `README.md` with plots)
under **Output location** (`MESHDISTILL_HOME/exports` when empty, or any
`ObjectStoragePath` URL: `s3://…`, `gs://…`, `file://…`; `conn_id` from the URL's
connection settings), recorded in the `export` table and announced on
`meshdistill://exports` with its id. Runs after each `distill` run (`meshdistill://qa`)
with the defaults, or by hand with the form. A run triggered by `distill` is skipped when
the latest export with the same settings already holds everything (nothing was distilled
since it began), or when nothing matches yet; a manual run always exports, and fails
with the reason when nothing matches. Details: `docs/export.md`.
"""


@dag(
    dag_id="export_shards",
    schedule=[QA],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["meshdistill", "export"],
    doc_md=DOC,
    params=model_params(ExportSettings, ExportSettings.FORM),
)
def export_shards() -> None:
    @task(outlets=[EXPORTS])
    def export(params: dict[str, Any] | None = None) -> dict[str, Any]:
        assert params is not None
        context = get_current_context()
        with fail_fast():
            settings = pipeline.export_settings(params)
            scheduled = asset_triggered(context, QA)
            if scheduled:
                repeat = pipeline.export_up_to_date(settings, database_url())
                if repeat:
                    raise AirflowSkipException(repeat)
            where = ObjectStoragePath(settings.out or pipeline.default_export_location())
            try:
                out = pipeline.export_shards(settings, fs=where.fs, root=where.path,
                                             database_url=database_url())
            except NothingToExportError as exc:
                if scheduled:  # nothing accepted yet: normal for a new schedule
                    raise AirflowSkipException(str(exc)) from exc
                raise
        context["outlet_events"][EXPORTS].extra = {
            "export_id": out["export_id"], "path": out["path"], "counts": out["counts"]}
        return out

    export()


export_shards()
