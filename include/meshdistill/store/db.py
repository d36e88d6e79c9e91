"""Engines and connections for the pipeline database.

One database holds all pipeline data (separate from Airflow's metadata database). The
URL comes, in order, from an explicit argument (the DAGs pass the ``meshdistill_db``
Airflow connection), ``MESHDISTILL_DATABASE_URL``, ``AIRFLOW_CONN_MESHDISTILL_DB``, or
else the embedded server under ``MESHDISTILL_HOME``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url

from meshdistill.config import Settings
from meshdistill.errors import ConfigError

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def normalize_url(url: str) -> str:
    """Accept Airflow-style (``postgres://``) and plain libpq URLs; use psycopg2."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg2://" + url[len(prefix):]
            break
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with the URL in it
        raise ConfigError("the database URL is not a valid SQLAlchemy/libpq URL") from exc
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError(
            f"meshdistill needs PostgreSQL, got a {parsed.get_backend_name()!r} URL"
        )
    return url


def resolve_database_url(explicit: str | None = None, settings: Settings | None = None) -> str:
    settings = settings or Settings.from_env()
    url = explicit or settings.database_url
    if url:
        return normalize_url(url)
    from meshdistill.store import embedded

    return embedded.start(settings.home)


def get_engine(url: str | None = None, *, migrate: bool = True) -> Engine:
    """A process-wide engine per URL, migrated to the latest schema on first use."""
    resolved = resolve_database_url(url)
    with _lock:
        engine = _engines.get(resolved)
        if engine is None:
            engine = create_engine(resolved, pool_pre_ping=True, future=True)
            if migrate:
                from meshdistill.store.migrate import upgrade

                upgrade(engine)
            _engines[resolved] = engine
    return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def connect(url: str | None = None) -> Iterator[Connection]:
    """One transaction: committed when the block ends, rolled back on error."""
    with get_engine(url).begin() as conn:
        yield conn


def safe_url(url: str) -> str:
    """The URL with its password hidden, for logs."""
    return make_url(url).render_as_string(hide_password=True)


def libpq_uri(url: str) -> str:
    """The SQLAlchemy ``url`` as a libpq connection URI (driver name dropped), for
    clients that speak libpq directly."""
    u = make_url(url)
    return u.set(drivername=u.get_backend_name()).render_as_string(hide_password=False)
