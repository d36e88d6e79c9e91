"""A real Airflow (api-server, scheduler, dag-processor, triggerer) for integration tests,
started by ``meshdistill_airflow.local`` exactly as ``make up`` starts it, and a client
of its REST API (the real one, over HTTP, with a JWT from ``/auth/token``)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from meshdistill.config import Settings
from meshdistill_airflow import local

from tests.support import REPO

TERMINAL_RUN_STATES = ("success", "failed")


def ncbi_connection(base_url: str) -> str:
    """``AIRFLOW_CONN_MESHDISTILL_NCBI`` for a local E-utilities server, with an API key
    (NCBI's 10 requests/s)."""
    return json.dumps({"conn_type": "http", "host": base_url, "login": "dev@example.org",
                       "password": "test-key"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveAirflow:
    instance: local.LocalAirflow
    env: dict[str, str] = field(repr=False)  # keys and the whole environment
    password: str = field(repr=False)
    pipeline_url: str = ""

    @property
    def url(self) -> str:
        return self.instance.url

    def client(self) -> httpx.Client:
        token = httpx.post(f"{self.url}/auth/token", timeout=30,
                           json={"username": local.USER, "password": self.password})
        token.raise_for_status()
        return httpx.Client(base_url=self.url, timeout=60, headers={
            "Authorization": f"Bearer {token.json()['access_token']}"})

    def cli(self, *args: str) -> str:
        """An ``airflow`` command against this instance (its environment)."""
        return local.airflow_cli(self.env, *args)

    def runs(self, api: httpx.Client, dag_id: str) -> list[dict[str, Any]]:
        r = api.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"order_by": "run_after",
                                                                 "limit": 100})
        r.raise_for_status()
        return list(r.json()["dag_runs"])

    def wait_for(self, api: httpx.Client, dag_id: str, done: Any, timeout: float = 600,
                 what: str = "") -> list[dict[str, Any]]:
        """Poll ``dag_id``'s runs until ``done(runs)`` holds; the runs then. A failed run
        ends the wait with its task states in the message."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs(api, dag_id)
            failed = [r for r in runs if r["state"] == "failed"]
            if failed:
                raise AssertionError(f"{dag_id} run failed: {failed[0]['dag_run_id']}: "
                                     f"{self.task_states(api, dag_id, failed[0]['dag_run_id'])}")
            if done(runs):
                return runs
            if time.monotonic() > deadline:
                seen = [(r["dag_run_id"], r["state"]) for r in runs]
                raise AssertionError(f"{dag_id}: {what or 'runs'} not done after "
                                     f"{timeout:.0f} s: {seen}")
            time.sleep(2)

    def task_states(self, api: httpx.Client, dag_id: str, run_id: str) -> list[tuple[Any, ...]]:
        return [(t["task_id"], t.get("map_index"), t["state"], t.get("hostname"))
                for t in self.task_instances(api, dag_id, run_id)]

    def task_instances(self, api: httpx.Client, dag_id: str, run_id: str
                       ) -> list[dict[str, Any]]:
        r = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                    params={"limit": 100})
        r.raise_for_status()
        return list(r.json()["task_instances"])

    def xcom(self, api: httpx.Client, dag_id: str, run_id: str, task_id: str,
             map_index: int = -1) -> Any:
        """What a task instance returned (its ``return_value`` XCom), deserialized."""
        r = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/"
                    "xcomEntries/return_value",
                    params={"map_index": map_index, "deserialize": True})
        r.raise_for_status()
        value = r.json()["value"]
        return json.loads(value) if isinstance(value, str) else value


@contextmanager
def running_airflow(home: Path, metadata_url: str, pipeline_url: str, *,
                    executor: str = "local", extra_env: Mapping[str, str] | None = None
                    ) -> Iterator[LiveAirflow]:
    """Start a local Airflow on free ports; stop every process of it afterwards."""
    la = local.LocalAirflow(home=home, repo=REPO, port=free_port(), executor=executor)
    settings = Settings.from_env()
    try:
        out = local.up(la, settings, metadata_url=metadata_url, pipeline_url=pipeline_url,
                       extra_env=extra_env)
        yield LiveAirflow(la, out["env"], la.password(), pipeline_url)
    except BaseException:
        for log in sorted((la.state / "logs").glob("*.log")):
            print(f"--- {log.name} (last lines) ---\n"
                  + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        raise
    finally:
        local.down(la, settings)
