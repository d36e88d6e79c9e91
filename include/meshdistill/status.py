"""Counts that describe the pipeline database: ``meshdistill status``, the demo, the DAG logs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from meshdistill.distill.candidates import TERMINAL, reason_keys
from meshdistill.distill.items import qa_counts
from meshdistill.errors import UnknownSubtreeError
from meshdistill.llm.cache import usage
from meshdistill.mesh.load import mesh_counts
from meshdistill.mesh.subtree import subtree_stats

TOP_REASONS = 5
"""How many rejection/failure reasons a subtree's report lists, most frequent first."""


def status(conn: Connection) -> dict[str, Any]:
    articles: dict[str, int] = dict(
        conn.exec_driver_sql("SELECT status, count(*) FROM article GROUP BY status").all()
    )
    row = conn.exec_driver_sql(
        """
        SELECT (SELECT count(*) FROM article_mesh),
               (SELECT count(*) FROM article WHERE status = 'active' AND abstract <> ''),
               (SELECT count(*) FROM ingest_batch),
               (SELECT count(*) FROM ingest_batch WHERE status <> 'succeeded'),
               (SELECT count(*) FROM ingest_skip)
        """
    ).one()
    watermarks = [
        {"subtree": r[0], "source": r[1], "watermark": r[2].isoformat(), "last_count": r[3]}
        for r in conn.exec_driver_sql(
            "SELECT subtree, source, watermark, last_count FROM ingest_watermark "
            "ORDER BY subtree, source"
        )
    ]
    release = conn.exec_driver_sql(
        "SELECT mesh_year, loaded_at FROM mesh_release ORDER BY id DESC LIMIT 1"
    ).first()
    mesh: dict[str, Any] = dict(mesh_counts(conn))
    mesh["release_year"] = release[0] if release else None
    llm = usage(conn)
    return {
        "exports": exports(conn),
        **qa_counts(conn),
        "llm": {"calls": llm["calls"], "tokens": llm["tokens"], "cost_usd": llm["cost_usd"]},
        "articles": {
            "active": articles.get("active", 0),
            "deleted": articles.get("deleted", 0),
            "retracted": articles.get("retracted", 0),
            "with_abstract": row[1],
        },
        "article_mesh": row[0],
        "mesh": mesh,
        "ingest": {
            "batches": row[2],
            "batches_not_succeeded": row[3],
            "skipped_records": row[4],
            "watermarks": watermarks,
        },
    }


def distilled_since(conn: Connection, since: datetime) -> dict[str, Any]:
    """Candidates, states and preference pairs per subtree written (or rewritten) since
    ``since``, why candidates were rejected or failed (``reasons``, counted as a run
    counts them), the LLM calls stored since and their tokens, and one accepted item as
    an example."""
    subtrees: dict[str, dict[str, int]] = {}
    for subtree, state, n in conn.exec_driver_sql(
        "SELECT subtree, state, count(*) FROM qa_item "
        "WHERE updated_at >= %(t)s GROUP BY subtree, state ORDER BY subtree", {"t": since}
    ):
        row = subtrees.setdefault(subtree, {"candidates": 0})
        row[state] = n
        row["candidates"] += n
    for subtree, articles, pairs in conn.exec_driver_sql(
        "SELECT q.subtree, count(DISTINCT q.source_pmid), "
        "       (SELECT count(*) FROM preference_pair p WHERE p.subtree = q.subtree "
        "        AND p.created_at >= %(t)s) "
        "FROM qa_item q WHERE q.updated_at >= %(t)s GROUP BY q.subtree", {"t": since}
    ):
        subtrees[subtree].update(articles=articles, preference_pairs=pairs)
    for row in subtrees.values():
        for state in TERMINAL:
            row.setdefault(state, 0)
    reasons: Counter[str] = Counter()
    for stage, reason, n in conn.exec_driver_sql(
        "SELECT stage, reason, count(*) FROM qa_item WHERE updated_at >= %(t)s "
        "AND state IN ('rejected', 'failed') GROUP BY stage, reason", {"t": since}
    ):
        for key in reason_keys(stage, reason):
            reasons[key] += n
    calls, tokens = conn.exec_driver_sql(
        "SELECT count(*), coalesce(sum(tokens_in + tokens_out), 0) FROM llm_call "
        "WHERE created_at >= %(t)s", {"t": since}
    ).one()
    example = conn.exec_driver_sql(
        "SELECT subtree, source_pmid, qtype, question, answer FROM qa_item "
        "WHERE updated_at >= %(t)s AND state = 'accepted' "
        "ORDER BY subtree, source_pmid DESC, profile, ordinal LIMIT 1", {"t": since}
    ).first()
    out: dict[str, Any] = {"subtrees": subtrees, "new_llm_calls": int(calls),
                           "new_llm_tokens": int(tokens), "reasons": dict(reasons.most_common())}
    if example:
        out["example"] = dict(zip(("subtree", "pmid", "qtype", "question", "answer"),
                                  example, strict=True))
    return out


def exports(conn: Connection) -> dict[str, Any]:
    """How many exports are recorded, and the latest: id, time, location, rows per format
    and split."""
    count = conn.exec_driver_sql("SELECT count(*) FROM export").scalar_one()
    row = conn.exec_driver_sql(
        "SELECT id, created_at, location, counts FROM export "
        "ORDER BY created_at DESC, id DESC LIMIT 1").first()
    latest = None if row is None else {
        "id": row[0], "created_at": row[1].isoformat(), "location": row[2],
        "formats": row[3].get("formats", {}), "items": row[3].get("items", 0),
        "pairs": row[3].get("pairs", 0)}
    return {"count": int(count), "latest": latest}


def subtree_report(conn: Connection, requested: Sequence[str] = ()) -> dict[str, Any]:
    """Per MeSH subtree: articles, ingestion watermark, candidates by state, acceptance
    rate, top rejection reasons, preference pairs and the LLM calls its runs paid for.

    Covers every subtree with a watermark or a distilled item, and ``requested``. The
    acceptance rate is accepted over settled candidates (deferred ones are not settled
    yet); None before any is settled. ``meshdistill status --json`` and the Airflow
    dashboard both read this, so they cannot disagree.
    """
    states: dict[str, dict[str, int]] = {}
    for prefix, state, n in conn.exec_driver_sql(
            "SELECT subtree, state, count(*) FROM qa_item GROUP BY subtree, state"):
        states.setdefault(prefix, {})[state] = int(n)
    reasons: dict[str, Counter[str]] = {}
    for prefix, stage, reason, n in conn.exec_driver_sql(
            "SELECT subtree, stage, reason, count(*) FROM qa_item "
            "WHERE state IN ('rejected', 'failed') GROUP BY subtree, stage, reason"):
        for key in reason_keys(stage, reason):
            reasons.setdefault(prefix, Counter())[key] += int(n)
    pairs: dict[str, int] = dict(conn.exec_driver_sql(
        "SELECT subtree, count(*) FROM preference_pair GROUP BY subtree").all())
    llm = {r[0]: r[1:] for r in conn.exec_driver_sql(
        "SELECT subtree, count(*), coalesce(sum(tokens_in + tokens_out), 0), "
        "coalesce(sum(cost_usd), 0) FROM llm_call WHERE subtree IS NOT NULL GROUP BY subtree")}
    watermarks: dict[str, list[dict[str, Any]]] = {}
    for prefix, source, mark, last in conn.exec_driver_sql(
            "SELECT subtree, source, watermark, last_count FROM ingest_watermark "
            "ORDER BY subtree, source"):
        watermarks.setdefault(prefix, []).append(
            {"source": source, "watermark": mark.isoformat(), "last_count": last})
    prefixes = dict.fromkeys([*requested, *sorted(watermarks.keys() | states.keys())])
    out: dict[str, Any] = {}
    for prefix in prefixes:
        try:
            row: dict[str, Any] = subtree_stats(conn, prefix)
        except UnknownSubtreeError:
            if prefix in requested:  # a typo: the error names the closest subtrees
                raise
            # a subtree of an older MeSH release, still in the distilled rows
            row = {"subtree": prefix, "name": None, "descriptors": 0, "active_articles": 0,
                   "with_abstract": 0, "as_major_topic": 0}
        counts = {state: states.get(prefix, {}).get(state, 0) for state in TERMINAL}
        settled = counts["accepted"] + counts["rejected"] + counts["failed"]
        calls, tokens, cost = llm.get(prefix, (0, 0, 0))
        marks = watermarks.get(prefix, [])
        row.update(
            watermarks=marks,
            watermark=max((m["watermark"] for m in marks), default=None),
            candidates=sum(counts.values()), **counts,
            acceptance_rate=round(counts["accepted"] / settled, 4) if settled else None,
            top_reasons=dict(reasons.get(prefix, Counter()).most_common(TOP_REASONS)),
            preference_pairs=int(pairs.get(prefix, 0)),
            llm={"calls": int(calls), "tokens": int(tokens), "cost_usd": float(cost)},
        )
        out[prefix] = row
    return out


def accepted_items(conn: Connection, *, subtree: str | None = None, qtype: str | None = None,
                   limit: int = 20) -> list[dict[str, Any]]:
    """A sample of accepted items, newest first: question, answer, evidence, scores and
    the context PMIDs, optionally of one subtree and one question type."""
    rows = conn.exec_driver_sql(
        "SELECT subtree, source_pmid, qtype, profile, question, answer, label, evidence, "
        "retrieval_score, hierarchy_score, blend_score, judgement, contexts, updated_at "
        "FROM qa_item WHERE state = 'accepted' "
        "AND (%(s)s::text IS NULL OR subtree = %(s)s) "
        "AND (%(t)s::text IS NULL OR qtype = %(t)s) "
        "ORDER BY updated_at DESC, id DESC LIMIT %(n)s",
        {"s": subtree, "t": qtype, "n": limit}).mappings().all()
    return [{
        **{k: r[k] for k in ("subtree", "qtype", "profile", "question", "answer", "label",
                             "evidence", "judgement")},
        "pmid": r["source_pmid"],
        "scores": {k: None if r[f"{k}_score"] is None else round(float(r[f"{k}_score"]), 4)
                   for k in ("retrieval", "hierarchy", "blend")},
        "context_pmids": [c.get("pmid") for c in (r["contexts"] or [])],
        "updated_at": r["updated_at"].isoformat(),
    } for r in rows]


def export_up_to_date(conn: Connection, params: dict[str, Any]) -> str | None:
    """Why a new export with ``params`` (:meth:`ExportSettings.stored`) would only repeat
    the latest one with the same settings, or None.

    That export already holds everything when no candidate was written and no preference
    pair made after it began (its ``created_at`` is the moment before it read the
    database). A changed item (a redo that rejects what was accepted) counts as new.
    """
    latest = conn.exec_driver_sql(
        "SELECT id, created_at FROM export WHERE params = %(p)s::jsonb "
        "ORDER BY created_at DESC LIMIT 1", {"p": json.dumps(params)}).first()
    if latest is None:
        return None
    newest = conn.exec_driver_sql(
        "SELECT greatest((SELECT max(updated_at) FROM qa_item), "
        "(SELECT max(created_at) FROM preference_pair))").scalar()
    if newest is not None and newest >= latest[1]:
        return None
    return (f"export {latest[0]} (same settings) already holds every item and preference "
            "pair: nothing was distilled since it began")
