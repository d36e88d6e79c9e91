"""The Airflow UI a team uses, in a real browser, against a real running Airflow.

``make up``'s Airflow (api-server, scheduler, dag-processor, triggerer, LocalExecutor,
metadata in PostgreSQL) runs the project's DAGs and the dashboard plugin. Headless
Chromium (Debian's package, driven by Playwright) logs in, fills ``distill``'s trigger
form, triggers it and waits for the run to succeed, then does the same for
``export_shards``, and opens the dashboard. Screenshots go to ``.artifacts/screenshots``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from meshdistill.pipeline import status_report
from meshdistill.store.db import get_engine
from sqlalchemy import text

from tests.live_airflow import LiveAirflow, running_airflow
from tests.support import REPO, load_test_corpus

pytestmark = pytest.mark.integration

ARTIFACTS = Path(os.environ.get("MESHDISTILL_TEST_ARTIFACTS") or REPO / ".artifacts")
SHOTS = ARTIFACTS / "screenshots"
DAGS = {"distill", "export_shards", "mesh_refresh", "pubmed_ingest"}


def chromium() -> str:
    """Debian's Chromium (``make test`` installs it when it can); Playwright's own browser
    download cannot work on a machine that reaches package registries only."""
    path = os.environ.get("MESHDISTILL_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if not path:
        pytest.fail("no Chromium: install Debian's `chromium` package (apt-get install "
                    "chromium) or set MESHDISTILL_CHROMIUM to a Chromium binary", pytrace=False)
    return path


@pytest.fixture(scope="module")
def airflow(make_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[LiveAirflow]:
    pipeline_url = make_database()
    load_test_corpus(pipeline_url)
    home = tmp_path_factory.mktemp("airflow-ui")
    with running_airflow(home / "airflow", make_database(), pipeline_url,
                         extra_env={"MESHDISTILL_HOME": str(home / "meshdistill")}) as af:
        yield af


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield b
        b.close()


def shot(page: Any, name: str, **kw: Any) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), **kw)
    return path


def test_dags_pools_and_dashboard_are_served(airflow: LiveAirflow) -> None:
    with airflow.client() as api:
        dags = api.get("/api/v2/dags").json()["dags"]
        assert {d["dag_id"] for d in dags} == DAGS
        assert api.get("/api/v2/importErrors").json()["total_entries"] == 0
        pools = {p["name"]: p["slots"] for p in api.get("/api/v2/pools").json()["pools"]}
        assert pools["ncbi"] == 2 and pools["llm"] == 4
        (plugin,) = [p for p in api.get("/api/v2/plugins").json()["plugins"]
                     if p["name"] == "meshdistill"]
        assert [v["href"] for v in plugin["external_views"]] == ["meshdistill/",
                                                                 "meshdistill/items"]
        assert api.get("/meshdistill/api/status").json() == status_report(
            database_url=airflow.pipeline_url)
    # Like the REST API, the dashboard needs a login.
    import httpx

    for path in ("api/status", "api/items", "", "items", "plots/subtrees.png"):
        assert httpx.get(f"{airflow.url}/meshdistill/{path}").status_code == 401, path
    for path in ("docs", "redoc", "openapi.json"):  # not served at all
        assert httpx.get(f"{airflow.url}/meshdistill/{path}").status_code == 404, path


def _login(page: Any, airflow: LiveAirflow) -> None:
    page.goto(f"{airflow.url}/")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(airflow.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{airflow.url}/")


def _open_trigger_form(page: Any, airflow: LiveAirflow, dag_id: str) -> Any:
    page.goto(f"{airflow.url}/dags/{dag_id}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Trigger Dag - {dag_id}").wait_for()
    return dialog


def _trigger(page: Any, dialog: Any) -> None:
    dialog.get_by_role("button", name="Trigger").last.click()
    dialog.wait_for(state="hidden")


def _newest_run(airflow: LiveAirflow, api: Any, dag_id: str, before: set[str],
                timeout: float = 600) -> dict[str, Any]:
    """The one manual run triggered since ``before``, once it succeeded."""
    def done(runs: list[dict[str, Any]]) -> bool:
        new = [r for r in runs if r["dag_run_id"] not in before and r["run_type"] == "manual"]
        return bool(new) and new[-1]["state"] == "success"

    runs = airflow.wait_for(api, dag_id, done, timeout, what="the triggered run")
    return [r for r in runs if r["dag_run_id"] not in before and r["run_type"] == "manual"][-1]


def test_a_browser_triggers_distill_then_export_and_reads_the_dashboard(
        airflow: LiveAirflow, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    _login(page, airflow)
    shot(page, "01-home")

    with airflow.client() as api:
        # distill: the Params form, section by section, as a biologist fills it.
        before = {r["dag_run_id"] for r in airflow.runs(api, "distill")}
        form = _open_trigger_form(page, airflow, "distill")
        form.get_by_role("button", name="What to distill").click()
        form.locator("textarea#element_subtrees").fill("C04\nC14.280")
        form.get_by_role("button", name="How much").click()
        form.get_by_label("Articles per subtree").fill("3")
        form.get_by_label("Questions per article").fill("2")
        form.get_by_role("button", name="LLM").click()
        form.locator("#element_backend").get_by_role("combobox").click()
        page.get_by_role("option", name="offline").click()
        shot(page, "02-distill-form", full_page=True)
        _trigger(page, form)
        run = _newest_run(airflow, api, "distill", before)
        assert run["conf"]["subtrees"] == ["C04", "C14.280"]
        assert run["conf"]["max_articles"] == 3 and run["conf"]["questions_per_article"] == 2
        assert run["conf"]["backend"] == "offline"
        tasks = airflow.task_instances(api, "distill", run["dag_run_id"])
        mapped = sorted(t["rendered_map_index"] for t in tasks if t["task_id"] == "subtree.distill")
        assert mapped == ["C04", "C14.280"]
        assert all(t["state"] == "success" for t in tasks)
        page.goto(f"{airflow.url}/dags/distill/runs/{run['dag_run_id']}")
        page.get_by_text("success").first.wait_for()
        shot(page, "03-distill-run")
        with get_engine(airflow.pipeline_url).connect() as conn:
            stored = dict(conn.execute(text(
                "SELECT subtree, count(DISTINCT source_pmid) FROM qa_item "
                "WHERE run_id = :r GROUP BY subtree"), {"r": run["dag_run_id"]}).all())
        assert stored == {"C04": 3, "C14.280": 3}

        # export_shards: the defaults, unpaused on trigger.
        before = {r["dag_run_id"] for r in airflow.runs(api, "export_shards")}
        form = _open_trigger_form(page, airflow, "export_shards")
        shot(page, "04-export-form", full_page=True)
        _trigger(page, form)
        export_run = _newest_run(airflow, api, "export_shards", before)
        # Nothing else may still write while the dashboard is compared with the database.
        airflow.wait_for(api, "export_shards", lambda runs: all(
            r["state"] in ("success", "failed") for r in runs), what="every export run")
        with get_engine(airflow.pipeline_url).connect() as conn:
            exports = conn.execute(text("SELECT id FROM export ORDER BY created_at")).scalars()
            export_ids = list(exports)
        assert export_ids, export_run

        # The dashboard, through the UI's session cookie: the same figures as the CLI's.
        status = status_report(database_url=airflow.pipeline_url)
        assert page.request.get(f"{airflow.url}/meshdistill/api/status").json() == status
        page.goto(f"{airflow.url}/meshdistill/")
        assert page.locator("img").evaluate("img => img.decode().then(() => img.naturalWidth)")
        for prefix in ("C04", "C14.280"):
            row = page.locator(f'tr[data-subtree="{prefix}"]')
            assert row.count() == 1
            cells = row.locator("td").all_inner_texts()
            s = status["subtrees"][prefix]
            assert cells[5:10] == [f"{s[k]:,}" for k in ("candidates", "accepted", "rejected",
                                                          "failed", "deferred")]
        assert export_ids[-1] in page.locator("#latest-export").inner_text()
        shot(page, "05-dashboard", full_page=True)
        page.goto(f"{airflow.url}/meshdistill/items?subtree=C04")
        accepted = status["subtrees"]["C04"]["accepted"]
        assert accepted > 0 and page.locator(".item").count() == min(20, accepted)
        shot(page, "06-dashboard-items", full_page=True)
        # The dashboard inside the Airflow UI (Browse → meshdistill).
        page.goto(f"{airflow.url}/plugin/meshdistill")
        frame = page.frame_locator("iframe")
        frame.locator("#subtrees").wait_for()
        frame.locator("img").evaluate("img => img.decode()")  # the plot drawn, then the shot
        shot(page, "07-dashboard-in-airflow")
    page.close()
