"""Airflow plugin: the meshdistill dashboard in the api-server and in the UI's navigation."""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin
from meshdistill_airflow.dashboard import create_app


class MeshdistillDashboard(AirflowPlugin):
    name = "meshdistill"
    fastapi_apps: list[Any] = [  # noqa: RUF012 (AirflowPlugin declares them so)
        {"app": create_app(), "url_prefix": "/meshdistill", "name": "meshdistill dashboard"}]
    external_views: list[Any] = [  # noqa: RUF012 (AirflowPlugin declares them so)
        {"name": "meshdistill", "href": "meshdistill/", "destination": "nav",
         "category": "browse", "url_route": "meshdistill"},
        {"name": "meshdistill items", "href": "meshdistill/items", "destination": "nav",
         "category": "browse", "url_route": "meshdistill-items"},
    ]
