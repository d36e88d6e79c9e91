"""Airflow glue shared by the meshdistill DAG files.

Kept out of ``meshdistill`` so that package stays importable and testable without
Airflow; kept out of ``dags/`` so it is importable whatever the DAG folder is.

Secrets stay in Airflow connections: the pipeline database is the ``meshdistill_db``
connection and NCBI credentials the ``meshdistill_ncbi`` connection (login = e-mail,
password = API key, host = an E-utilities base URL if not NCBI's), and the LLM the
``meshdistill_llm`` connection (host = base URL, password = API key, extra = model and
client settings). Without them the package falls back to environment variables and,
for the database, an embedded PostgreSQL; for the LLM, the offline backend.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Asset, Connection
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

# Re-exported for the DAG files and tests (the pools are plain data in meshdistill.config).
from meshdistill.config import LLM_POOL as LLM_POOL
from meshdistill.config import NCBI_POOL as NCBI_POOL
from meshdistill.config import POOLS as POOLS
from meshdistill.errors import (
    ConfigError,
    MeshSourceError,
    NothingToExportError,
    PubmedParseError,
    UnknownSubtreeError,
    WindowTooLargeError,
)
from meshdistill.llm.config import LLMConfig

log = logging.getLogger(__name__)

ARTICLES = Asset("meshdistill://articles")
QA = Asset("meshdistill://qa")
EXPORTS = Asset("meshdistill://exports")


DEFAULT_ARGS: dict[str, Any] = {
    "owner": "meshdistill",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=15),
}


# Errors no retry can fix (a bad Param, a malformed file): fail the task at once.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    MeshSourceError,
    NothingToExportError,
    PubmedParseError,
    UnknownSubtreeError,
    WindowTooLargeError,
)


@contextmanager
def fail_fast() -> Iterator[None]:
    """Turn permanent pipeline errors into AirflowFailException (no retries, clear message)."""
    try:
        yield
    except PERMANENT_ERRORS as exc:
        raise AirflowFailException(str(exc)) from exc


def _connection(conn_id: str) -> Connection | None:
    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def window(context: Any) -> tuple[Any, Any]:
    """The run's data interval as inclusive dates, or (None, today) when it has none.

    A manual run's interval is empty (start == end): the pipeline then continues each
    subtree from its watermark instead.
    """
    start = context.get("data_interval_start")
    end = context.get("data_interval_end")
    if start is None or end is None or start >= end:
        return None, (end or pendulum.now("UTC")).date()
    return start.date(), (end - timedelta(microseconds=1)).date()


def database_url() -> str | None:
    conn = _connection("meshdistill_db")
    return conn.get_uri() if conn else None


def ncbi_credentials() -> dict[str, str | None]:
    """E-mail, API key and base URL for E-utilities, from the ``meshdistill_ncbi`` connection."""
    conn = _connection("meshdistill_ncbi")
    if conn is None:
        return {"ncbi_email": None, "ncbi_api_key": None, "eutils_url": None}
    base = None
    if conn.host:
        base = conn.host if "://" in conn.host else f"https://{conn.host}"
    return {"ncbi_email": conn.login, "ncbi_api_key": conn.password, "eutils_url": base}


def llm_config() -> LLMConfig | None:
    """The ``meshdistill_llm`` connection as an :class:`LLMConfig`, or None without one.

    host = the OpenAI-compatible base URL (``https://api.openai.com/v1``; a bare host
    gets the connection's schema, default https, and port), password = API key, extra
    JSON = ``model``, ``organization``, ``max_concurrency``, ``timeout``,
    ``max_attempts``, ``max_output_tokens``, ``narrow_schema``, ``client_process``,
    ``backend``. Unknown
    extra keys are a ConfigError. The key is kept out of logs: Airflow masks connection
    passwords and ``LLMConfig`` hides it.
    """
    conn = _connection("meshdistill_llm")
    if conn is None:
        return None
    host = conn.host or None
    if host and "://" not in host:
        scheme = conn.schema if conn.schema in ("http", "https") else "https"
        host = f"{scheme}://{host}{f':{conn.port}' if conn.port else ''}"
    return LLMConfig.from_extra(host, conn.password, dict(conn.extra_dejson or {}))


def mapped_results(value: Any) -> list[dict[str, Any]]:
    """The return values of a mapped task group's instances, as a list.

    Airflow 3 hands the consumer of a mapped task group's output the bare return value,
    not a one-item list, when the mapping made a single instance (a ``distill`` run over
    one subtree; apache/airflow#49714 is the family of bugs); iterating that dict would
    give its keys.
    """
    if isinstance(value, dict):
        return [value]
    return list(value)


def _asset_events(context: Any, asset: Asset) -> list[Any]:
    """The events of ``asset`` that triggered this run (none for a manual run)."""
    events = context.get("triggering_asset_events") or {}
    try:
        return list(events[asset])
    except (KeyError, TypeError):
        return []


def asset_triggered(context: Any, asset: Asset) -> bool:
    """This run was made by the scheduler from events of ``asset`` (not by hand)."""
    return bool(_asset_events(context, asset))


def asset_subtrees(context: Any, asset: Asset) -> list[str]:
    """Subtrees named in the ``extra`` of the asset events that triggered this run.

    ``pubmed_ingest`` puts ``{"subtrees": [...]}`` in each event it emits; a run the
    scheduler creates from those events distills what was ingested. Empty for manual
    runs (and events without that key).
    """
    subtrees: list[str] = []
    for event in _asset_events(context, asset):
        extra = getattr(event, "extra", None) or {}
        for prefix in extra.get("subtrees") or []:
            if isinstance(prefix, str) and prefix not in subtrees:
                subtrees.append(prefix)
    return subtrees


def run_subtrees(context: Any, requested: Sequence[str], asset: Asset) -> list[str]:
    """The subtrees a run works on: those named in the triggering asset events (a run the
    scheduler made after ``pubmed_ingest``), unless the run's conf names its own, else
    ``requested`` (the form's)."""
    conf = getattr(context.get("dag_run"), "conf", None) or {}
    from_assets = [] if "subtrees" in conf else asset_subtrees(context, asset)
    if from_assets:
        log.info("subtrees from the triggering asset events: %s", from_assets)
        return from_assets
    return list(requested)
