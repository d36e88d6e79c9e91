"""A local Airflow for meshdistill: ``make up`` and ``make down``.

``python -m meshdistill_airflow.local up|down|status``. ``up`` starts Airflow's
api-server (UI and REST API), scheduler, dag-processor and triggerer as background
processes, with the LocalExecutor (``--executor celery``: the CeleryExecutor on Redis and
two Celery workers with distinct hostnames). Airflow's metadata lives in its own
database, ``airflow``, on the embedded PostgreSQL (or ``MESHDISTILL_AIRFLOW_DATABASE_URL``);
the pipeline keeps its own (``MESHDISTILL_DATABASE_URL`` or the embedded ``meshdistill``),
given to the tasks as the ``meshdistill_db`` connection. The pools ``ncbi`` and ``llm``
are created, the login is the simple auth manager's ``admin`` with a generated password,
and the URL and the login are printed. Everything ``up`` starts is recorded under
``$AIRFLOW_HOME/local/`` (process ids, logs, generated keys), so ``down`` stops exactly
that, the embedded PostgreSQL included when ``up`` started it. Settings:
``docs/operations.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshdistill.config import POOLS, Settings
from meshdistill.store import embedded
from meshdistill.store.db import normalize_url

METADATA_DATABASE = "airflow"
USER = "admin"
DEFAULT_PORT = 8080
CELERY_WORKERS = ("worker1", "worker2")
CELERY_CONCURRENCY = 2  # task slots per worker: one per core of a small machine
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
AIRFLOW = str(Path(sys.executable).parent / "airflow")  # this environment's CLI
SIMPLE_AUTH = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


@dataclass(frozen=True)
class LocalAirflow:
    """Where one local Airflow keeps its state, and how it is reached."""

    home: Path  # AIRFLOW_HOME
    repo: Path  # dags/ and plugins/ are read from here
    port: int = DEFAULT_PORT
    executor: str = "local"

    @property
    def state(self) -> Path:
        return self.home / "local"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _secret(self, name: str, make: Any = lambda: secrets.token_urlsafe(32)) -> str:
        """A generated key kept in the state folder (mode 600), the same on every start."""
        path = self.state / "secrets" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(make())
        return path.read_text().strip()

    def password(self) -> str:
        return str(json.loads(self.passwords_file.read_text())[USER])

    @property
    def passwords_file(self) -> Path:
        return self.state / "secrets" / "passwords.json"

    def environment(self, metadata_url: str, pipeline_url: str,
                    extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment every Airflow process of this instance runs with (``extra``
        last: more connections, say, as ``AIRFLOW_CONN_*`` variables)."""
        self._secret("passwords.json", lambda: json.dumps({USER: secrets.token_urlsafe(12)}))
        from cryptography.fernet import Fernet

        env = dict(os.environ)
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.repo / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.repo / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": ("CeleryExecutor" if self.executor == "celery"
                                        else "LocalExecutor"),
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__CORE__FERNET_KEY": self._secret(
                "fernet_key", lambda: Fernet.generate_key().decode()),
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt_secret"),
            "AIRFLOW__API__SECRET_KEY": self._secret("api_secret_key"),
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",  # a laptop's UI; each worker holds the whole app
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW_CONN_MESHDISTILL_DB": pipeline_url,
        })
        if self.executor == "celery":
            broker = celery_broker(extra)
            env.update({
                "AIRFLOW__CELERY__BROKER_URL": broker,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata_url.replace(
                    "postgresql+psycopg2://", "postgresql://", 1),
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(CELERY_CONCURRENCY),
            })
        env.update(extra or {})
        return env


def celery_broker(extra: Mapping[str, str] | None = None) -> str:
    """``MESHDISTILL_CELERY_BROKER_URL`` (from ``extra``, else the environment), else
    the Redis on this machine."""
    return ((extra or {}).get("MESHDISTILL_CELERY_BROKER_URL")
            or os.environ.get("MESHDISTILL_CELERY_BROKER_URL") or DEFAULT_BROKER)


def _databases(settings: Settings, metadata: str | None, pipeline: str | None
               ) -> tuple[str, str, bool]:
    """(metadata URL, pipeline URL, whether the embedded server holds either): the given
    ones, else ``MESHDISTILL_AIRFLOW_DATABASE_URL`` and ``MESHDISTILL_DATABASE_URL``, else
    databases on the embedded PostgreSQL."""
    metadata = metadata or os.environ.get("MESHDISTILL_AIRFLOW_DATABASE_URL")
    pipeline = pipeline or settings.database_url
    metadata_url = (normalize_url(metadata) if metadata
                    else embedded.start(settings.home, METADATA_DATABASE))
    pipeline_url = normalize_url(pipeline) if pipeline else embedded.start(settings.home)
    return metadata_url, pipeline_url, not (metadata and pipeline)


def airflow_cli(env: Mapping[str, str], *args: str) -> str:
    """Run one ``airflow`` CLI command to completion; its output, or a clear error."""
    done = subprocess.run([AIRFLOW, *args], env=dict(env), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed ({done.returncode}):\n"
                           f"{(done.stderr or done.stdout)[-3000:]}")
    return done.stdout


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field
    22), or None when no such process runs (a zombie counts as gone). With the pid it
    names one process: a pid reused after a reboot or a crash has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] in ("Z", "X") else fields[19]


def _records(la: LocalAirflow) -> dict[str, dict[str, Any]]:
    path = la.state / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _running(record: Mapping[str, Any]) -> bool:
    """The recorded process still runs: same pid, same start time."""
    return _start_time(int(record["pid"])) == record["start"]


def _commands(la: LocalAirflow) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each process to start: its command line and what its environment adds."""
    commands: dict[str, tuple[list[str], dict[str, str]]] = {
        name: ([AIRFLOW, name], {}) for name in COMPONENTS}
    if la.executor == "celery":
        host = socket.gethostname()
        for worker in CELERY_WORKERS:
            # Two workers on one machine: each records its own name on the task instances
            # it runs (as two machines would), and neither serves logs on the shared port
            # (the api-server reads them from the common log folder).
            commands[f"celery-{worker}"] = (
                [AIRFLOW, "celery", "worker", "--celery-hostname", f"{worker}@{host}",
                 "--concurrency", str(CELERY_CONCURRENCY), "--skip-serve-logs"],
                {"MESHDISTILL_WORKER_HOSTNAME": f"{worker}@{host}",
                 "AIRFLOW__CORE__HOSTNAME_CALLABLE":
                     "meshdistill_airflow.local.worker_hostname"})
    return commands


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the local Celery workers: the worker's own name."""
    return os.environ.get("MESHDISTILL_WORKER_HOSTNAME") or socket.getfqdn()


def health(la: LocalAirflow) -> dict[str, Any] | None:
    """The api-server's ``/api/v2/monitor/health``, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"{la.url}/api/v2/monitor/health", timeout=5) as r:
            data: dict[str, Any] = json.load(r)
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _workers_ready(la: LocalAirflow, offsets: dict[str, int]) -> bool:
    """Every Celery worker has logged, past ``offsets`` (its log's size when it was
    started), that it is ready: connected to the broker."""
    if la.executor != "celery":
        return True
    for worker in CELERY_WORKERS:
        log = la.state / "logs" / f"celery-{worker}.log"
        with log.open("rb") as fh:
            fh.seek(offsets.get(f"celery-{worker}", 0))
            if b" ready." not in fh.read():
                return False
    return True


def _healthy(data: dict[str, Any] | None) -> bool:
    if not data:
        return False
    parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
    return all((data.get(p) or {}).get("status") == "healthy" for p in parts)


def _port_free(port: int) -> bool:
    """Nothing listens on ``port``: a bind as the api-server makes it (SO_REUSEADDR, so
    the connections a stopped server left in TIME_WAIT do not count) succeeds."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _reachable(url: str) -> bool:
    """A TCP connection to the host and port of ``url`` (a broker) succeeds."""
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379),
                                      timeout=3):
            return True
    except OSError:
        return False


def up(la: LocalAirflow, settings: Settings, *, metadata_url: str | None = None,
       pipeline_url: str | None = None, extra_env: Mapping[str, str] | None = None,
       timeout: float = 240.0) -> dict[str, Any]:
    """Start the instance (what already runs is kept) and wait until every component
    reports healthy; returns the URL, the user, the process ids and the environment the
    processes run with (for ``airflow`` commands against this instance).

    Refuses, before starting anything, an instance already running with another executor
    or port, a port another program holds, and a Celery broker that does not answer. On a
    failure the processes started stay recorded, so :func:`down` stops them.
    """
    la.state.mkdir(parents=True, exist_ok=True)
    (la.state / "logs").mkdir(exist_ok=True)
    info_path = la.state / "instance.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    running = {k: r for k, r in _records(la).items() if _running(r)}
    if running and (info.get("url"), info.get("executor")) != (la.url, la.executor):
        raise RuntimeError(f"an instance already runs at {info.get('url')} with the "
                           f"{info.get('executor')} executor: `make down` first")
    if "api-server" not in running and not _port_free(la.port):
        raise RuntimeError(f"port {la.port} is taken (another Airflow?): stop it, or set "
                           "MESHDISTILL_AIRFLOW_PORT")
    broker = celery_broker(extra_env)
    if la.executor == "celery" and not _reachable(broker):
        raise RuntimeError(f"no Celery broker answers at {broker} (start Redis, or set "
                           "MESHDISTILL_CELERY_BROKER_URL)")
    # Stop the embedded server in `down` only if this instance started it.
    pg_was_up = (embedded.pgdata_dir(settings.home) / "postmaster.pid").exists()
    metadata_url, pipeline_url, uses_embedded = _databases(settings, metadata_url,
                                                           pipeline_url)
    info = {"url": la.url, "executor": la.executor, "meshdistill_home": str(settings.home),
            "started_embedded_postgres": bool(info.get("started_embedded_postgres"))
            or (uses_embedded and not pg_was_up)}
    info_path.write_text(json.dumps(info, indent=1))
    env = la.environment(metadata_url, pipeline_url, extra_env)
    airflow_cli(env, "db", "migrate")
    for name, (slots, description) in POOLS.items():
        airflow_cli(env, "pools", "set", name, str(slots), description)
    records = dict(running)
    started: dict[str, subprocess.Popen[bytes]] = {}
    offsets: dict[str, int] = {}
    for name, (command, own) in _commands(la).items():
        if name in records:
            continue
        with (la.state / "logs" / f"{name}.log").open("ab") as log:
            offsets[name] = log.tell()
            proc = subprocess.Popen(command, env={**env, **own}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=la.repo)
        started[name] = proc
        records[name] = {"pid": proc.pid, "start": _start_time(proc.pid)}
        (la.state / "pids.json").write_text(json.dumps(records, indent=1))
    deadline = time.monotonic() + timeout
    data = health(la)
    while not (_healthy(data) and _workers_ready(la, offsets)):
        dead = [n for n, p in started.items() if p.poll() is not None]
        dead += [n for n, r in records.items() if n not in started and not _running(r)]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited; see {la.state / 'logs'} "
                               "(`make down` stops the rest)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Airflow not healthy after {timeout:.0f} s: {data}; see "
                               f"{la.state / 'logs'} (`make down` stops what started)")
        time.sleep(2)
        data = health(la)
    pids = {k: int(r["pid"]) for k, r in records.items()}
    return {"url": la.url, "user": USER, "pids": pids, "executor": la.executor, "env": env}


def down(la: LocalAirflow, settings: Settings, timeout: float = 30.0) -> list[str]:
    """Stop every process ``up`` started that still runs (each with its children: its
    process group), then the embedded PostgreSQL if ``up`` started it; returns what was
    stopped. A recorded pid that now names another process is left alone."""
    records = {k: r for k, r in _records(la).items() if _running(r)}

    def signal_all(sig: int) -> None:
        for record in records.values():
            if _running(record):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(record["pid"]), sig)

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_running(r) for r in records.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    signal_all(signal.SIGKILL)
    stopped = list(records)
    (la.state / "pids.json").unlink(missing_ok=True)
    info_path = la.state / "instance.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if info.get("started_embedded_postgres") and embedded.stop(settings.home):
        stopped.append("embedded PostgreSQL")
    info_path.unlink(missing_ok=True)
    return stopped


def from_env(executor: str | None = None) -> LocalAirflow:
    home = Path(os.environ.get("AIRFLOW_HOME") or "~/airflow").expanduser().resolve()
    return LocalAirflow(
        home=home, repo=Path(__file__).resolve().parents[2],
        port=int(os.environ.get("MESHDISTILL_AIRFLOW_PORT") or DEFAULT_PORT),
        executor=executor or os.environ.get("MESHDISTILL_AIRFLOW_EXECUTOR") or "local")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshdistill_airflow.local",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("up", "down", "status"))
    ap.add_argument("--executor", choices=("local", "celery"), default=None)
    args = ap.parse_args(argv)
    la, settings = from_env(args.executor), Settings.from_env()
    if args.action == "down":
        stopped = down(la, settings)
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0
    if args.action == "status":
        data = health(la)
        print(json.dumps(data, indent=1) if data else f"no Airflow answers at {la.url}")
        return 0 if _healthy(data) else 1
    print(f"starting Airflow ({la.executor} executor) under {la.home} ...", flush=True)
    try:
        out = up(la, settings)
    except RuntimeError as exc:  # a refusal or a component that did not start: no trace
        print(f"make up: {exc}", file=sys.stderr)
        return 1
    print(f"Airflow is up: {out['url']}\n"
          f"  login: {out['user']} / {la.password()}  (kept in {la.passwords_file})\n"
          f"  components: {', '.join(out['pids'])}; logs in {la.state / 'logs'}\n"
          f"  DAGs start paused: unpause them in the UI. Stop everything with `make down`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
