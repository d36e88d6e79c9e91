"""The steps the DAGs run, as plain functions with explicit arguments.

Each takes what it needs (database URL, subtree, window, ...) and returns a small
JSON-serialisable summary that Airflow keeps as the task's XCom and logs; the DAG files
only wire them to Airflow (schedule, params, mapping, pools, retries).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from meshdistill.config import Settings
from meshdistill.errors import ConfigError, MeshDistillError, UnknownSubtreeError
from meshdistill.llm.config import LLMConfig
from meshdistill.mesh.subtree import get_subtree, subtree_stats
from meshdistill.store.db import connect, get_engine

log = logging.getLogger(__name__)


def refresh_mesh(
    sources: Sequence[str],
    *,
    year: int | None = None,
    replace: bool = True,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Load a MeSH release; with no sources, NLM's release for ``year`` (downloaded once)."""
    from meshdistill.mesh.load import load_sources
    from meshdistill.mesh.sources import nlm_release_urls

    settings = Settings.from_env()
    if not sources:
        sources = nlm_release_urls(year or date.today().year)
    with connect(database_url) as conn:
        out = load_sources(
            conn, list(sources), settings.mesh_cache_dir, year=year, replace_trees=replace
        )
    log.info("MeSH loaded: %s", out["counts"])
    return out


def validate_subtrees(prefixes: Sequence[str], database_url: str | None = None) -> list[str]:
    """The prefixes, de-duplicated, after checking each names a MeSH subtree.

    All unknown prefixes are reported together, each with its closest valid ones, before
    any work is mapped over them.
    """
    unique = list(dict.fromkeys(p.strip() for p in prefixes if p.strip()))
    if not unique:
        raise MeshDistillError("no MeSH subtrees given (e.g. ['C04'])")
    errors: list[UnknownSubtreeError] = []
    with connect(database_url) as conn:
        for prefix in unique:
            try:
                get_subtree(conn, prefix)
            except UnknownSubtreeError as exc:
                errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise MeshDistillError("; ".join(str(e) for e in errors))
    return unique


def load_pubmed_files(paths: Sequence[str], database_url: str | None = None) -> dict[str, Any]:
    """Load baseline/update files in order; fails (after keeping what loaded) on bad files."""
    from meshdistill.pubmed.files import load_files

    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise MeshDistillError(f"PubMed files not found: {', '.join(missing)}")
    results = load_files(paths, database_url)
    summary = {
        "files": [r.as_dict() for r in results],
        "parsed": sum(r.parsed for r in results),
        "loaded": sum(r.loaded for r in results),
        "deleted": sum(r.deleted for r in results),
    }
    bad = [r for r in results if r.status != "succeeded"]
    if bad:
        raise MeshDistillError(
            "; ".join(f"{r.item}: {r.status}: {r.error}" for r in bad)
            + " (complete records before each fault were loaded)"
        )
    return summary


def subtree_counts(prefix: str, database_url: str | None = None) -> dict[str, Any]:
    with connect(database_url) as conn:
        stats = subtree_stats(conn, prefix)
    log.info(
        "%s (%s): %d active articles, %d with abstract",
        prefix, stats["name"], stats["active_articles"], stats["with_abstract"],
    )
    return stats


def ingest_subtree_window(
    prefix: str,
    start: date | None,
    end: date,
    *,
    database_url: str | None = None,
    eutils_url: str | None = None,
    datetype: str = "edat",
    ncbi_email: str | None = None,
    ncbi_api_key: str | None = None,
) -> dict[str, Any]:
    """Fetch one subtree's new/revised articles for a date window from E-utilities.

    ``start=None`` continues from the subtree's watermark (the end of its last reconciled
    window), so a manually triggered run picks up where the schedule left off.
    """
    from meshdistill.pubmed.eutils import EutilsClient
    from meshdistill.pubmed.ingest import ingest_subtree, next_window

    settings = Settings.from_env()
    engine = get_engine(database_url)
    client = EutilsClient.from_settings(
        settings, base_url=eutils_url, email=ncbi_email, api_key=ncbi_api_key,
        database_url=database_url,
    )
    if start is None:
        with engine.connect() as conn:
            start = next_window(conn, prefix, end, end)
    return ingest_subtree(engine, prefix, start, end, client=client, datetype=datetype)


def distill_subtree(
    prefix: str,
    *,
    run_id: str,
    settings: Mapping[str, Any] | None = None,
    llm: LLMConfig | None = None,
    budget_usd: float | None = None,
    budget_tokens: int | None = None,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Distill one subtree (generate → retrieve → grade → judge → answer) and reconcile.

    ``settings`` are :class:`~meshdistill.distill.settings.DistillSettings` fields (a bad
    value is a :class:`ConfigError`, which no retry can fix); ``llm`` picks the backend
    (offline unless configured otherwise). When the budget runs out, the rest of the
    subtree's candidates are stored as ``deferred`` and the next run continues them.
    With ``processes > 1`` that many worker processes share the articles, the LLM
    concurrency cap and the budget (each split evenly).
    """
    from pydantic import ValidationError

    from meshdistill import aio
    from meshdistill.distill.run import distill_subtree_async
    from meshdistill.distill.settings import DistillSettings
    from meshdistill.distill.workers import distill_subtree_processes
    from meshdistill.llm.config import cached_backend

    try:
        validated = DistillSettings.model_validate(dict(settings or {}))
    except ValidationError as exc:
        raise ConfigError(f"invalid distill settings: {exc}") from exc
    engine = get_engine(database_url)

    async def run() -> dict[str, Any]:
        backend = cached_backend(llm or LLMConfig(), engine, budget_usd=budget_usd,
                                 budget_tokens=budget_tokens)
        async with backend:
            return await distill_subtree_async(engine, prefix, backend, validated, run_id)

    if validated.processes > 1:  # the cap and the budget are split between the workers
        summary = distill_subtree_processes(engine, prefix, llm or LLMConfig(), validated,
                                            run_id, budget_usd=budget_usd,
                                            budget_tokens=budget_tokens)
    else:
        summary = aio.run(run())
    if summary["deferred"]:
        log.warning("%s: budget reached; %d candidates deferred to the next run",
                    prefix, summary["deferred"])
    return summary
