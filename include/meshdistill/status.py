"""Counts that describe the pipeline database, for ``meshdistill status`` and the DAG logs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from meshdistill.distill.items import qa_counts
from meshdistill.llm.cache import usage
from meshdistill.mesh.load import mesh_counts


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
