"""Load a MeSH release into the pipeline database."""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task
from meshdistill import pipeline
from meshdistill.mesh.settings import MeshRefreshRequest
from meshdistill_airflow import DEFAULT_ARGS, database_url, fail_fast
from meshdistill_airflow.params import model_params

DOC = """
### mesh_refresh
Loads an NLM MeSH release (descriptors, tree numbers, scope notes, entry terms) into the
pipeline database, in one transaction.

**Params**
- `sources`: URLs or paths of NLM release files: descriptor XML (`descYYYY.xml`/`.gz`),
  trees (`mtreesYYYY.bin`) and/or `MeshTree.txt`. Sources combine: UIs from one, trees
  from another, joined on the descriptor name; the task log reports what did not join.
  Empty: NLM's descriptor file for `year`, downloaded once and cached under
  `MESHDISTILL_HOME/mesh/<year>/`.
- `year`: the MeSH year (default: from the file names, else the current year).
- `replace`: remove tree numbers that are not in this release (tree numbers move
  between MeSH years). Turn off when loading a partial file.

Run it once before `pubmed_ingest`, and again each January for the new MeSH year.
"""


@dag(
    dag_id="mesh_refresh",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["meshdistill", "mesh"],
    doc_md=DOC,
    params=model_params(MeshRefreshRequest, MeshRefreshRequest.FORM),
)
def mesh_refresh() -> None:
    @task
    def load_release(params: dict[str, Any] | None = None) -> dict[str, Any]:
        assert params is not None
        with fail_fast():
            request = pipeline.mesh_refresh_request(params)
            return pipeline.refresh_mesh(
                list(request.sources), year=request.year, replace=request.replace,
                database_url=database_url(),
            )

    load_release()


mesh_refresh()
