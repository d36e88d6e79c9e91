"""An embedded PostgreSQL (``pgserver``) for machines without a configured server.

The server is started once under ``MESHDISTILL_HOME/pgdata`` and left running
(``cleanup_mode=None``) so that every CLI command, Airflow task and test that follows
reuses it instead of paying the start-up again; ``meshdistill db down`` stops it.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE_NAME = "meshdistill"


def pgdata_dir(home: Path) -> Path:
    return home / "pgdata"


def _runtime_dir(home: Path) -> None:
    """XDG_RUNTIME_DIR unset makes platformdirs warn whenever pgserver is imported;
    pgserver only needs a writable runtime directory for its lock files."""
    run_dir = home / "run"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_dir.chmod(0o700)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(run_dir))


def start(home: Path, database: str = DATABASE_NAME) -> str:
    """Start (or find running) the embedded server and return a SQLAlchemy URL for
    ``database`` on it, created when missing (``make up`` keeps Airflow's own metadata
    in a second database beside the pipeline's)."""
    if not database.isidentifier():
        raise ValueError(f"not a plain database name: {database!r}")
    _runtime_dir(home)
    # pgserver logs every command line and its full output at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    import pgserver  # imported lazily: it is only needed when no DSN is configured

    pgdata = pgdata_dir(home)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    if not (pgdata / "postmaster.pid").exists():
        # pgserver caches one handle per data directory per process; if the server was
        # stopped since (``db down``, a restart), start it again through that handle.
        with server._lock:
            server.ensure_postgres_running()
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {database};")
        log.info("created database %s in embedded PostgreSQL at %s", database, pgdata)
    uri: str = server.get_uri(database)
    return uri.replace("postgresql://", "postgresql+psycopg2://", 1)


def stop(home: Path) -> bool:
    """Stop the embedded server if it runs; True when one was stopped."""
    pgdata = pgdata_dir(home)
    if not (pgdata / "postmaster.pid").exists():
        return False
    _runtime_dir(home)
    import pgserver

    pg_ctl = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"
    cmd = [str(pg_ctl), "-D", str(pgdata), "-m", "fast", "-w", "stop"]
    if os.geteuid() == 0:
        # pgserver runs the server as its own unprivileged user when started by root.
        cmd = ["su", "pgserver", "-s", "/bin/sh", "-c", " ".join(cmd)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 and (pgdata / "postmaster.pid").exists():
        # pg_ctl also fails when the server stopped on its own meanwhile (pgserver stops
        # it when its last user exits): only a server still running is an error.
        raise RuntimeError(f"could not stop the embedded PostgreSQL in {pgdata}: "
                           f"{(done.stderr or done.stdout).strip()}")
    return True
