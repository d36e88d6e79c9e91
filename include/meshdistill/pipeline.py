"""The steps the DAGs, the CLI and the demo run, as plain functions with explicit arguments.

Each takes what it needs (database URL, subtree, window, ...) and returns a small
JSON-serialisable summary that Airflow keeps as the task's XCom and logs; the DAG files
only wire them to Airflow (schedule, params, mapping, pools, retries), and the CLI only
parses options and prints. What a run is asked (settings, budget shares) and how its
outcome reads (the per-subtree table) are decided here once for all three.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from meshdistill.config import Settings
from meshdistill.distill.candidates import TERMINAL
from meshdistill.distill.settings import DistillRequest, DistillSettings
from meshdistill.errors import ConfigError, MeshDistillError, UnknownSubtreeError
from meshdistill.export.settings import ExportSettings
from meshdistill.llm.config import LLMConfig
from meshdistill.mesh.settings import MeshRefreshRequest
from meshdistill.mesh.subtree import get_subtree, subtree_stats
from meshdistill.pubmed.settings import IngestRequest
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
    started = time.perf_counter()
    with connect(database_url) as conn:
        out = load_sources(
            conn, list(sources), settings.mesh_cache_dir, year=year, replace_trees=replace
        )
    out["seconds"] = round(time.perf_counter() - started, 2)
    log.info("MeSH loaded in %.1fs: %s", out["seconds"], out["counts"])
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


def load_pubmed_files(paths: Sequence[str], database_url: str | None = None, *,
                      strict: bool = True) -> dict[str, Any]:
    """Load baseline/update files in order. A bad file keeps the complete records before
    its fault; ``strict`` then raises once all files are done (else its status says so)."""
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
    if bad and strict:
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
    settings: DistillSettings | Mapping[str, Any] | None = None,
    llm: LLMConfig | None = None,
    budget_usd: float | None = None,
    budget_tokens: int | None = None,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Distill one subtree (generate → retrieve → grade → judge → answer) and reconcile.

    ``settings`` are :class:`~meshdistill.distill.settings.DistillSettings`, or its fields
    (a bad value is a :class:`ConfigError`, which no retry can fix); ``llm`` picks the backend
    (offline unless configured otherwise). When the budget runs out, the rest of the
    subtree's candidates are stored as ``deferred`` and the next run continues them.
    With ``processes > 1`` that many worker processes share the articles, the LLM
    concurrency cap and the budget (each split evenly).
    """
    from meshdistill import aio
    from meshdistill.distill.run import distill_subtree_async
    from meshdistill.distill.workers import distill_subtree_processes
    from meshdistill.llm.config import cached_backend

    validated = (settings if isinstance(settings, DistillSettings)
                 else distill_settings(settings or {}))
    engine = get_engine(database_url)

    async def run() -> dict[str, Any]:
        backend = cached_backend(llm or LLMConfig(), engine, budget_usd=budget_usd,
                                 budget_tokens=budget_tokens, subtree=prefix)
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


# --- what a distill run is asked, and how its outcome reads -------------------------------

_Model = TypeVar("_Model", bound=BaseModel)


def _validated(model: type[_Model], values: Mapping[str, Any],
               what: str = "distill settings") -> _Model:
    fields = {k: v for k, v in values.items() if k in model.model_fields}
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        problems: dict[str, str] = {}
        for e in exc.errors():
            if not e["loc"]:  # a rule across fields: its own words say it all
                problems.setdefault("", str(e["msg"]).removeprefix("Value error, "))
                continue
            field, where = str(e["loc"][0]), ".".join(map(str, e["loc"]))
            # The first problem of each field (a bad item, not also the emptied list).
            problems.setdefault(field, f"{where} = {e['input']!r}: {e['msg']}")
        raise ConfigError(f"invalid {what}: {'; '.join(problems.values())}") from exc


def distill_settings(values: Mapping[str, Any]) -> DistillSettings:
    """The :class:`DistillSettings` among ``values`` (a Params form, CLI options), validated;
    keys that are not settings (subtrees, backend, budget) are left to
    :func:`distill_request`. A bad value is a :class:`ConfigError` naming the field."""
    return _validated(DistillSettings, values)


def distill_request(values: Mapping[str, Any]) -> DistillRequest:
    """The :class:`DistillRequest` among ``values``, validated like :func:`distill_settings`."""
    return _validated(DistillRequest, values)


def llm_for(request: DistillRequest, connection: LLMConfig | None = None,
            **given: Any) -> LLMConfig:
    """The request's backend and model, then ``given`` (CLI options), over ``connection``
    (the ``meshdistill_llm`` connection) and the environment."""
    return LLMConfig(backend=request.backend, model=request.model, **given).merged(connection)


def budget_shares(budget_usd: float | None, budget_tokens: int | None,
                  parts: int) -> list[tuple[float | None, int | None]]:
    """A run's budget split evenly over its ``parts`` subtree tasks.

    USD splits exactly; tokens split into whole shares that differ by at most one and add
    up to the total, so the tasks together never exceed it. A token budget smaller than
    the number of subtrees would leave a task nothing: that is a :class:`ConfigError`.
    """
    from meshdistill.distill.workers import split_evenly

    if parts < 1:
        raise ConfigError("a budget needs at least one subtree to split over")
    if budget_tokens is not None and budget_tokens < parts:
        raise ConfigError(f"budget_tokens {budget_tokens} is less than one token for each "
                          f"of the {parts} subtrees")
    usd = [None if budget_usd is None else budget_usd / parts] * parts
    tokens: list[int | None] = (list(split_evenly(budget_tokens, parts))
                                if budget_tokens is not None else [None] * parts)
    return list(zip(usd, tokens, strict=True))


STORED_COUNTS = ("articles", "candidates", *TERMINAL, "preference_pairs")
"""The per-subtree counts a distill run leaves in the database."""
SUMMARY_COUNTS = (*STORED_COUNTS, "llm_new_calls", "llm_cached", "llm_tokens")
"""The per-subtree counts of a distill run, in the order the summary table shows them."""
_HEADINGS = {"preference_pairs": "pairs", "llm_new_calls": "new calls", "llm_cached": "cached",
             "llm_tokens": "tokens"}


def summarize_runs(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-subtree counts and totals of :func:`distill_subtree` summaries.

    ``llm_new_calls`` are the answers the run asked the LLM for (cache misses);
    ``llm_cached`` those it took from the ``llm_call`` cache; ``llm_tokens`` the input and
    output tokens the new calls used, as the server reported them (failed calls included).
    """
    per: dict[str, dict[str, Any]] = {}
    for r in results:
        llm = r.get("llm") or {}
        per[r["subtree"]] = {
            **{k: r[k] for k in ("articles", "candidates", *TERMINAL, "preference_pairs")},
            "llm_new_calls": llm.get("misses", 0), "llm_cached": llm.get("hits", 0),
            "llm_tokens": llm.get("tokens_in", 0) + llm.get("tokens_out", 0),
            "backend": r.get("backend"), "model": r.get("model"),
        }
    totals = {k: sum(row.get(k) or 0 for row in per.values()) for k in SUMMARY_COUNTS}
    return {"subtrees": per, "totals": totals}


def summary_table(rows: Mapping[str, Mapping[str, Any]],
                  counts: Sequence[str] = SUMMARY_COUNTS) -> list[str]:
    """The per-subtree table of a distill run, one line each (a count a row lacks
    prints as "-"), with a totals line when there is more than one subtree."""
    heads = ("subtree", *(_HEADINGS.get(k, k) for k in counts))
    widths = [max(8, len(h)) for h in heads]
    widths[0] = max([10, *(len(p) for p in rows)])

    def line(cells: Sequence[Any]) -> str:
        first, *rest = cells
        return f"{first:<{widths[0]}}" + "".join(
            f"{'-' if c is None else c:>{w + 1}}" for c, w in zip(rest, widths[1:], strict=True))

    out = [line(heads)]
    for prefix, row in rows.items():
        out.append(line([prefix, *(row.get(k) for k in counts)]))
    if len(rows) > 1:
        out.append(line(["total", *(
            None if all(r.get(k) is None for r in rows.values())
            else sum(r.get(k) or 0 for r in rows.values()) for k in counts)]))
    return out


def log_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Log :func:`summarize_runs`'s table, and a warning when candidates were deferred;
    returns ``summary``."""
    for line in summary_table(summary["subtrees"]):
        log.info("%s", line)
    if summary["totals"]["deferred"]:
        log.warning("%d candidates deferred (budget reached): the next run continues them "
                    "first", summary["totals"]["deferred"])
    return summary


# --- export ---------------------------------------------------------------------------------


def ingest_request(values: Mapping[str, Any]) -> IngestRequest:
    """``pubmed_ingest``'s :class:`IngestRequest` among ``values``, validated like
    :func:`distill_settings`."""
    return _validated(IngestRequest, values, "ingest request")


def mesh_refresh_request(values: Mapping[str, Any]) -> MeshRefreshRequest:
    """``mesh_refresh``'s :class:`MeshRefreshRequest` among ``values``, validated."""
    return _validated(MeshRefreshRequest, values, "MeSH refresh request")


def export_settings(values: Mapping[str, Any]) -> ExportSettings:
    """The :class:`ExportSettings` among ``values`` (a Params form, CLI options), validated;
    a bad value is a :class:`ConfigError` naming the field."""
    return _validated(ExportSettings, values, "export settings")


def export_up_to_date(settings: ExportSettings, database_url: str | None = None
                      ) -> str | None:
    """Why exporting with ``settings`` now would repeat the latest such export, or None
    (:func:`meshdistill.status.export_up_to_date`)."""
    from meshdistill.status import export_up_to_date as query

    with connect(database_url) as conn:
        return query(conn, settings.stored())


def default_export_location() -> str:
    """Where exports go unless told: ``MESHDISTILL_HOME/exports``."""
    return str(Settings.from_env().home / "exports")


def export_shards(settings: ExportSettings, *, fs: Any = None, root: str | None = None,
                  database_url: str | None = None,
                  progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Write one export (docs/export.md) and record it; returns ``meshdistill export
    --json``'s summary. ``fs`` and ``root`` (an fsspec file system and a path on it, as an
    Airflow ``ObjectStoragePath`` gives them) default to ``settings.out`` resolved with
    fsspec, else :func:`default_export_location`."""
    import fsspec

    from meshdistill.export.benchmarks import default_benchmarks, read_benchmark
    from meshdistill.export.run import run_export

    if settings.subtrees:
        validate_subtrees(settings.subtrees, database_url)
    location = settings.out or default_export_location()
    if fs is None:
        fs, root = fsspec.core.url_to_fs(location)
    assert root is not None
    benchmarks = [read_benchmark(p) for p in settings.benchmarks]
    if settings.default_benchmarks:
        benchmarks = default_benchmarks() + benchmarks
    started = time.perf_counter()
    result = run_export(get_engine(database_url), settings, fs=fs, root=root,
                        location=location, benchmarks=benchmarks, progress=progress)
    out = result.summary()
    out["seconds"] = round(time.perf_counter() - started, 2)
    log.info("export %s: %s", result.export_id, out["counts"])
    return out


# --- what the database holds ---------------------------------------------------------------


def status_report(subtrees: Sequence[str] = (), database_url: str | None = None
                  ) -> dict[str, Any]:
    """``meshdistill status --json``: the database's counts, and per subtree (each one
    ingested or distilled, and ``subtrees``) :func:`meshdistill.status.subtree_report`."""
    from meshdistill.status import status, subtree_report

    with connect(database_url) as conn:
        data = status(conn)
        data["subtrees"] = subtree_report(conn, subtrees)
    return data


def accepted_items(*, subtree: str | None = None, qtype: str | None = None, limit: int = 20,
                   database_url: str | None = None) -> list[dict[str, Any]]:
    """The most recent accepted items (:func:`meshdistill.status.accepted_items`)."""
    from meshdistill.status import accepted_items as query

    with connect(database_url) as conn:
        return query(conn, subtree=subtree, qtype=qtype, limit=limit)


def distilled_subtrees(database_url: str | None = None) -> list[str]:
    """The subtrees with at least one distilled candidate, sorted."""
    with connect(database_url) as conn:
        return [str(r[0]) for r in conn.exec_driver_sql(
            "SELECT DISTINCT subtree FROM qa_item ORDER BY 1")]


def database_now(database_url: str | None = None) -> datetime:
    """The database server's clock (what row timestamps are compared with)."""
    with connect(database_url) as conn:
        now: datetime = conn.exec_driver_sql("SELECT now()").scalar_one()
    return now


def distilled_since(since: datetime, database_url: str | None = None) -> dict[str, Any]:
    """What distill runs wrote since ``since``: per-subtree :data:`STORED_COUNTS`, the
    new LLM calls, and one accepted example item."""
    from meshdistill.status import distilled_since as query

    with connect(database_url) as conn:
        return query(conn, since)
