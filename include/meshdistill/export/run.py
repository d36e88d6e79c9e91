"""One export, start to finish: plan, write shards, card, manifest, then the ``export`` row.

Atomic: everything is written under ``<root>/.<id>.partial`` and moved to ``<root>/<id>``
when complete. On a local file system the manifest is written before the move, which is
one rename; on object storage (where a move copies) the manifest is written last, and
readers (:func:`list_exports`) take a folder without ``manifest.json`` as absent. Only
then is the ``export`` row inserted; if that fails the folder is removed again. A failure
anywhere before removes the partial folder, so nothing is left a reader would take for
an export. The same data and settings give byte-identical shards, card and plots; the
manifest differs only in ``export_id`` and ``created_at``.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Engine, text

from meshdistill import __version__
from meshdistill.config import REPO
from meshdistill.errors import MeshDistillError, NothingToExportError
from meshdistill.export.benchmarks import Benchmark, ContaminationIndex
from meshdistill.export.card import CardStats, render_card, render_plots
from meshdistill.export.memory import release_freed
from meshdistill.export.plan import Decision, Population, Rows
from meshdistill.export.records import ItemBatch, MeshTrees, pair_table, template_versions
from meshdistill.export.schemas import JUDGE_CRITERIA
from meshdistill.export.settings import SPLITS, ExportSettings
from meshdistill.export.shards import ShardInfo, ShardSet
from meshdistill.export.source import Snapshot, prefetch, snapshot
from meshdistill.export.splits import splitmix64
from meshdistill.export.text import Tokens
from meshdistill.mesh.subtree import get_subtree

log = logging.getLogger(__name__)

ITEM_FORMATS = ("sft", "prompt_completion", "alpaca", "sharegpt", "qca")
MANIFEST = "manifest.json"
Progress = Callable[[str, int], None]
"""Called after each written batch with the phase and the rows written so far."""


@dataclass(frozen=True)
class ExportResult:
    export_id: str
    location: str
    manifest: dict[str, Any]
    timings: dict[str, float]

    def summary(self) -> dict[str, Any]:
        """What ``meshdistill export --json`` prints."""
        removed: dict[str, int] = {}
        for kind in ("items", "pairs"):
            for reason, n in self.manifest["cleaning"].get(kind, {}).get("removed", {}).items():
                removed[reason] = removed.get(reason, 0) + n
        return {"path": self.location, "export_id": self.export_id,
                "counts": self.manifest["formats"], "removed": removed,
                "manifest": f"{self.location.rstrip('/')}/{MANIFEST}",
                "card": f"{self.location.rstrip('/')}/README.md", "timings_s": self.timings}


def new_export_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def git_commit() -> str | None:
    """``MESHDISTILL_GIT_COMMIT``, else the checkout's HEAD when the package runs from one."""
    if os.environ.get("MESHDISTILL_GIT_COMMIT"):
        return os.environ["MESHDISTILL_GIT_COMMIT"]
    if not (REPO / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class _Rate:
    def __init__(self, phase: str) -> None:
        self.phase, self.started = phase, time.perf_counter()

    def done(self, rows: int) -> float:
        seconds = time.perf_counter() - self.started
        log.info("export %s: %s rows in %.1f s (%s rows/s)", self.phase, f"{rows:,}", seconds,
                 f"{rows / seconds:,.0f}" if seconds > 0 else "-")
        return round(seconds, 3)


def _numbers(batch: pa.RecordBatch, name: str, dtype: Any) -> Any:
    return pc.fill_null(batch.column(name), 0).to_numpy(zero_copy_only=False).astype(dtype)


def _list_offsets(lists: pa.Array) -> Any:
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _plan_items(snap: Snapshot, s: ExportSettings, index: ContaminationIndex | None,
                workdir: str | None) -> Decision:
    pop = Population("items", s, index, workdir)
    for b in snap.item_plan_rows():
        tokens = Tokens.of(b.column("question"))
        contexts = b.column("contexts")
        pop.add(Rows(_numbers(b, "id", np.int64), _numbers(b, "source_pmid", np.int64),
                     b.column("subtree"), b.column("qtype"), b.column("label"),
                     _numbers(b, "hierarchy", np.float64), _numbers(b, "judge_sum", np.float64),
                     tokens, tokens.runs().whole(),
                     pc.fill_null(contexts.flatten(), 0).to_numpy(zero_copy_only=False),
                     _list_offsets(contexts)))
        release_freed()
    return pop.decide()


def _plan_pairs(snap: Snapshot, s: ExportSettings, index: ContaminationIndex | None,
                workdir: str | None) -> Decision:
    pop = Population("pairs", s, index, workdir)
    for b in snap.pair_plan_rows():
        chosen, rejected = Tokens.of(b.column("question")), Tokens.of(b.column("rejected"))
        with np.errstate(over="ignore"):  # a pair is the same when both questions are
            exact = splitmix64(chosen.runs().whole() * np.uint64(0x9E3779B97F4A7C15)
                               ^ rejected.runs().whole())
        n = b.num_rows
        pop.add(Rows(_numbers(b, "id", np.int64), _numbers(b, "source_pmid", np.int64),
                     b.column("subtree"), b.column("qtype"), pa.nulls(n, pa.string()),
                     _numbers(b, "margin", np.float64), _numbers(b, "chosen_score", np.float64),
                     chosen, exact, np.zeros(0, np.int64), np.zeros(n + 1, np.int64),
                     also_checked=rejected))
        release_freed()
    return pop.decide()


def _kept_batches(batches: Iterator[pa.RecordBatch], decision: Decision,
                  progress: Progress | None) -> Iterator[tuple[pa.RecordBatch, Any]]:
    """The planned rows of each streamed batch with their split indexes, in split order
    (id order within a split), so that formatted tables are cut by slicing; checks at the
    end that exactly the planned rows came (the snapshot cannot change, so a difference
    is a bug, not data). The stream is closed however this ends, while its transaction
    is still open (a traceback would otherwise keep it alive past it). What the last
    batch freed is released before the next is read."""
    written = 0
    try:
        for batch in batches:
            split = decision.split_of(_numbers(batch, "id", np.int64))
            keep = split >= 0
            if not keep.any():
                continue
            kept, split = (batch if keep.all() else batch.filter(pa.array(keep))), split[keep]
            if (np.diff(split) < 0).any():  # grouped by split: each split's rows a slice
                order = np.argsort(split, kind="stable")
                kept, split = kept.take(pa.array(order)), split[order]
            yield kept, split
            release_freed()
            written += int(keep.sum())
            if progress:
                progress(decision.kind, written)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if written != len(decision.ids):
        raise RuntimeError(f"planned {len(decision.ids)} {decision.kind}, read {written}")


@dataclass
class _Written:
    shards: list[ShardInfo]
    samples: dict[str, dict[str, Any]]
    hierarchy: list[np.ndarray]
    judge: dict[str, list[np.ndarray]]
    margins: list[np.ndarray]
    backends: set[str]
    models: set[str]
    prompt_versions: set[str]


def _distinct(arr: pa.Array) -> set[str]:
    return {v for v in pc.unique(arr).to_pylist() if v is not None}


def _write_items(snap: Snapshot, fs: Any, root: str, s: ExportSettings, formats: list[str],
                 decision: Decision, mesh_trees: MeshTrees, out: _Written,
                 progress: Progress | None) -> None:
    with ShardSet(fs, root, formats, s.file_formats(), decision.rows_per_split(),
                  s.shard_rows) as writers:
        for kept, split in _kept_batches(prefetch(snap.item_rows()), decision, progress):
            batch = ItemBatch(kept, closed_book=s.closed_book, mesh_trees=mesh_trees,
                              articles=snap.article_texts)
            for fmt in formats:
                table = batch.table(fmt)
                writers.write(fmt, split, table)
                if fmt not in out.samples:
                    out.samples[fmt] = table.slice(0, 1).to_pylist()[0]
            out.hierarchy.append(_numbers(kept, "hierarchy_score", np.float64))
            for c in JUDGE_CRITERIA:
                out.judge[c].append(_numbers(kept, f"judge_{c}", np.int8))
            out.backends |= _distinct(kept.column("backend"))
            out.models |= _distinct(kept.column("model"))
            for k in ("generate", "judge", "answer"):
                out.prompt_versions |= _distinct(kept.column(f"prompt_{k}"))
        out.shards += writers.close()


def _write_pairs(snap: Snapshot, engine: Engine, fs: Any, root: str, s: ExportSettings,
                 decision: Decision, out: _Written, progress: Progress | None) -> None:
    info: dict[str, tuple[list[str], str | None]] = {}
    with engine.connect() as conn:
        for name in decision.subtree_names:
            try:
                sub = get_subtree(conn, name)
            except MeshDistillError:
                info[name] = ([name], None)
                continue
            info[name] = ([*sub.ancestry, sub.name or name], sub.scope_note)
    with ShardSet(fs, root, ["dpo"], s.file_formats(), decision.rows_per_split(),
                  s.shard_rows) as writers:
        for kept, split in _kept_batches(prefetch(snap.pair_rows()), decision, progress):
            table = pair_table(kept, info)
            writers.write("dpo", split, table)
            out.samples.setdefault("dpo", table.slice(0, 1).to_pylist()[0])
            out.margins.append(np.asarray(pc.struct_field(table["metadata"], "margin")))
        out.shards += writers.close()


def _formats_table(shards: list[ShardInfo], primary: str) -> tuple[dict[str, Any], ...]:
    rows: dict[str, dict[str, int]] = {}
    files: dict[str, dict[str, list[str]]] = {}
    for sh in shards:
        if sh.file_format != primary:
            continue
        rows.setdefault(sh.format, {}).setdefault(sh.split, 0)
        rows[sh.format][sh.split] += sh.rows
        files.setdefault(sh.format, {}).setdefault(sh.split, []).append(sh.path)
    def ordered(d: dict[str, Any]) -> dict[str, Any]:
        return {s: d[s] for s in SPLITS if s in d}
    return ({f: ordered(v) for f, v in rows.items()},
            {f: {s: sorted(p) for s, p in ordered(v).items()} for f, v in files.items()})


def run_export(engine: Engine, settings: ExportSettings, *, fs: Any, root: str,
               location: str, benchmarks: Sequence[Benchmark] = (),
               progress: Progress | None = None, now: datetime | None = None,
               workdir: str | None = None) -> ExportResult:
    """Export what ``settings`` select into a new folder under ``root`` on ``fs``
    (``location`` is how a user names that folder's parent: a path or URL)."""
    now = now or datetime.now(UTC)
    export_id = new_export_id(now)
    root = root.rstrip("/")
    partial, final = f"{root}/.{export_id}.partial", f"{root}/{export_id}"
    index = ContaminationIndex(list(benchmarks)) if benchmarks else None
    item_formats: list[str] = [f for f in settings.formats if f in ITEM_FORMATS]
    timings: dict[str, float] = {}
    out = _Written([], {}, [], {c: [] for c in JUDGE_CRITERIA}, [], set(), set(), set())
    fs.makedirs(partial, exist_ok=True)
    try:
        with snapshot(engine, settings) as snap:
            items = pairs = None
            if item_formats:
                rate = _Rate("plan items")
                items = _plan_items(snap, settings, index, workdir)
                timings["plan_items"] = rate.done(items.seen)
                timings.update({f"plan_items.{k}": v for k, v in items.seconds.items()})
            if "dpo" in settings.formats:
                rate = _Rate("plan pairs")
                pairs = _plan_pairs(snap, settings, index, workdir)
                timings["plan_pairs"] = rate.done(pairs.seen)
                timings.update({f"plan_pairs.{k}": v for k, v in pairs.seconds.items()})
            if not (items and len(items.ids)) and not (pairs and len(pairs.ids)):
                raise NothingToExportError(
                    "nothing to export: no accepted item or preference pair matches "
                    f"subtrees {list(settings.subtrees) or 'all'}, types "
                    f"{[t.value for t in settings.question_types]} and the minimum scores "
                    f"(seen {items.seen if items else 0} items, "
                    f"{pairs.seen if pairs else 0} pairs before cleaning)")
            mesh_trees = MeshTrees.of({ui: list(t) for ui, t in snap.fetch(
                "SELECT ui, array_agg(tree_number ORDER BY tree_number) FROM mesh_tree "
                "WHERE ui IS NOT NULL GROUP BY ui")} if "qca" in item_formats else {})
            mesh_year = snap.fetch("SELECT mesh_year FROM mesh_release ORDER BY id DESC "
                                   "LIMIT 1")
            if items is not None and item_formats:
                rate = _Rate("write items")
                _write_items(snap, fs, partial, settings, item_formats, items, mesh_trees, out,
                             progress)
                timings["write_items"] = rate.done(len(items.ids))
            if pairs is not None:
                rate = _Rate("write pairs")
                _write_pairs(snap, engine, fs, partial, settings, pairs, out, progress)
                timings["write_pairs"] = rate.done(len(pairs.ids))
        primary = settings.file_formats()[0]
        rows, files = _formats_table(out.shards, primary)
        item_counts = items.counts() if items is not None else None
        manifest = _manifest(export_id, now, settings, item_counts, pairs, out, rows, files,
                             primary, index, mesh_year[0][0] if mesh_year else None, items)
        stats = _card_stats(item_counts, out)
        plots = render_plots(stats)
        for name, data in plots.items():
            fs.makedirs(f"{partial}/{name.rsplit('/', 1)[0]}", exist_ok=True)
            _put(fs, f"{partial}/{name}", data)
        card = render_card(manifest, stats, out.samples, sorted(plots))
        _put(fs, f"{partial}/README.md", card.encode("utf-8"))
        body = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        local = _is_local(fs)
        if local:
            _put(fs, f"{partial}/{MANIFEST}", body)
        fs.mv(partial, final, recursive=True)
    except BaseException:
        _remove(fs, partial)
        raise
    try:
        if not local:
            _put(fs, f"{final}/{MANIFEST}", body)
        target = f"{location.rstrip('/')}/{export_id}"
        _record(engine, export_id, now, settings, manifest, target)
    except BaseException:
        _remove(fs, final)
        raise
    log.info("export %s written to %s", export_id, target)
    return ExportResult(export_id, target, manifest, timings)


def _manifest(export_id: str, now: datetime, s: ExportSettings,
              item_counts: dict[str, Any] | None, pairs: Decision | None, out: _Written,
              rows: dict[str, Any], files: dict[str, Any], primary: str,
              index: ContaminationIndex | None, mesh_year: int | None,
              items: Decision | None) -> dict[str, Any]:
    counts: dict[str, Any] = {"items": item_counts["rows"] if item_counts else 0,
                              "pairs": len(pairs.ids) if pairs else 0}
    if item_counts is not None:
        counts.update({k: item_counts[k] for k in ("by_split", "by_subtree", "by_type",
                                                    "by_label", "by_subtree_split")})
    if pairs is not None:
        counts["pairs_by_split"] = pairs.rows_per_split()
    cleaning = {kind: d.report() | {"seen": d.seen}
                for kind, d in (("items", items), ("pairs", pairs)) if d is not None}
    decontamination: dict[str, dict[str, int]] = {}
    for d in (items, pairs):
        for key, n in (d.by_benchmark if d else {}).items():
            bench, reason = key.rsplit(":", 1)
            slot = decontamination.setdefault(bench, {"pmid": 0, "ngram": 0})
            slot[reason] += n
    removed: dict[str, int] = {}
    for d in (items, pairs):
        for reason, n in (d.removed if d else {}).items():
            removed[reason] = removed.get(reason, 0) + n
    return {
        "export_id": export_id, "created_at": now.isoformat(),
        "package_version": __version__, "git_commit": git_commit(),
        "params": s.stored(), "seed": s.seed, "splits": list(SPLITS),
        "file_formats": list(s.file_formats()), "primary_file_format": primary,
        "formats": rows, "data_files": files, "counts": counts, "removed": removed,
        "cleaning": cleaning, "decontamination": decontamination,
        "benchmarks": index.summary() if index else [],
        "shards": [sh.as_json() for sh in sorted(out.shards, key=lambda x: x.path)],
        "mesh_year": mesh_year, "backends": sorted(out.backends), "models": sorted(out.models),
        "prompt_versions": sorted(out.prompt_versions),
        "export_templates": template_versions(),
    }


def _card_stats(item_counts: dict[str, Any] | None, out: _Written) -> CardStats:
    def cat(parts: list[Any], dtype: Any) -> Any:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    c = item_counts or {"by_subtree": {}, "by_type": {}, "by_label": {}}
    return CardStats(items_per_subtree=c["by_subtree"],
                     hierarchy_scores=cat(out.hierarchy, np.float64),
                     judge_scores={k: cat(v, np.int8) for k, v in out.judge.items()},
                     question_types=c["by_type"], labels=c["by_label"],
                     pair_margins=cat(out.margins, np.float64))


def _put(fs: Any, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"file", "local"} & set(protocol))


def _remove(fs: Any, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception:  # the original error is what the caller needs to see
        log.exception("could not remove %s", path)


def _record(engine: Engine, export_id: str, now: datetime, s: ExportSettings,
            manifest: dict[str, Any], location: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO export (id, created_at, params, counts, manifest, location) "
            "VALUES (:id, :t, CAST(:p AS jsonb), CAST(:c AS jsonb), CAST(:m AS jsonb), :loc)"),
            {"id": export_id, "t": now, "p": orjson.dumps(s.stored()).decode(),
             "c": orjson.dumps({"formats": manifest["formats"], **manifest["counts"]}).decode(),
             "m": orjson.dumps(manifest).decode(), "loc": location})


def list_exports(fs: Any, root: str) -> list[str]:
    """The complete exports under ``root``: folders holding a manifest (partial folders
    and folders without one are not exports)."""
    if not fs.exists(root):
        return []
    found = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(".") and fs.exists(f"{entry.rstrip('/')}/{MANIFEST}"):
            found.append(name)
    return sorted(found)
