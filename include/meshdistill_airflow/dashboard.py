"""The dashboard's FastAPI app, which ``plugins/meshdistill_dashboard.py`` mounts in the
api-server.

Routes (under ``/meshdistill``): ``/`` the per-subtree overview, ``/items`` sample
accepted items (``?subtree=&qtype=``), ``/plots/subtrees.png``, and the JSON behind them:
``/api/status`` (exactly ``meshdistill status --json``) and ``/api/items``. Every route
needs an Airflow login (the UI's session cookie or a bearer token), like the REST API.
The pipeline database is the ``meshdistill_db`` connection, as for the tasks.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse, Response
from meshdistill import dashboard, pipeline
from meshdistill.llm.schemas import QuestionType

QTYPES = [t.value for t in QuestionType]


def database_url() -> str | None:
    """The ``meshdistill_db`` connection's URI as the api-server sees it (environment
    variable, secrets backend or metadata database), or None (the pipeline's default)."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    try:
        return Connection.get_connection_from_secrets("meshdistill_db").get_uri()
    except AirflowNotFoundException:
        return None


def _authenticated() -> Any:
    from airflow.api_fastapi.core_api.security import requires_authenticated

    return Depends(requires_authenticated())


def create_app() -> FastAPI:
    # No /docs, /redoc or /openapi.json: FastAPI serves those outside the app's
    # dependencies, so they would be the only pages without a login.
    app = FastAPI(title="meshdistill dashboard", dependencies=[_authenticated()],
                  docs_url=None, redoc_url=None, openapi_url=None)

    # Plain ``def`` routes: FastAPI runs them in its thread pool, off the event loop.
    @app.get("/api/status")
    def status_json() -> dict[str, Any]:
        return pipeline.status_report(database_url=database_url())

    @app.get("/api/items")
    def items_json(subtree: str | None = None, qtype: str | None = None,
                   limit: int = Query(20, ge=1, le=200)) -> list[dict[str, Any]]:
        return pipeline.accepted_items(subtree=subtree or None, qtype=qtype or None,
                                       limit=limit, database_url=database_url())

    @app.get("/", response_class=HTMLResponse)
    def overview() -> str:
        return dashboard.overview_page(pipeline.status_report(database_url=database_url()))

    @app.get("/items", response_class=HTMLResponse)
    def items(subtree: str | None = None, qtype: str | None = None,
              limit: int = Query(20, ge=1, le=200)) -> str:
        url = database_url()
        known = pipeline.distilled_subtrees(database_url=url)
        found = pipeline.accepted_items(subtree=subtree or None, qtype=qtype or None,
                                        limit=limit, database_url=url)
        return dashboard.items_page(found, known, QTYPES, subtree or None, qtype or None)

    @app.get("/plots/subtrees.png")
    def plot() -> Response:
        report = pipeline.status_report(database_url=database_url())["subtrees"]
        return Response(dashboard.subtree_plot(report), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    return app
