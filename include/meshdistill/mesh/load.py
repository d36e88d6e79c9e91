"""Write a combined MeSH release into Postgres in one transaction."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text

from meshdistill.mesh.combine import MeshRelease, combine
from meshdistill.mesh.sources import resolve
from meshdistill.store.bulk import copy_rows, create_staging

log = logging.getLogger(__name__)


def load_release(
    conn: Connection, release: MeshRelease, *, replace_trees: bool = False, source: str = "mesh"
) -> dict[str, Any]:
    """Upsert descriptors, entry terms and tree numbers; return counts.

    With ``replace_trees`` the tree numbers not in this release are removed: use it for a
    complete release, never for a sample, since tree numbers move between MeSH years.
    """
    create_staging(
        conn,
        "stage_descriptor",
        "ui text, name text, scope_note text, descriptor_class text",
    )
    copy_rows(
        conn,
        "stage_descriptor",
        ("ui", "name", "scope_note", "descriptor_class"),
        ((d.ui, d.name, d.scope_note, d.descriptor_class) for d in release.descriptors.values()),
    )
    conn.execute(
        text(
            """
            INSERT INTO mesh_descriptor AS m
                   (ui, name, scope_note, descriptor_class, mesh_year, source)
            SELECT ui, name, scope_note, descriptor_class, :year, :source FROM stage_descriptor
            ON CONFLICT (ui) DO UPDATE SET
                name = EXCLUDED.name,
                scope_note = COALESCE(EXCLUDED.scope_note, m.scope_note),
                descriptor_class = COALESCE(EXCLUDED.descriptor_class, m.descriptor_class),
                mesh_year = EXCLUDED.mesh_year,
                source = EXCLUDED.source,
                updated_at = now()
            """
        ),
        {"year": release.year, "source": source},
    )

    create_staging(conn, "stage_term", "ui text, term text")
    copy_rows(
        conn,
        "stage_term",
        ("ui", "term"),
        ((d.ui, t) for d in release.descriptors.values() for t in d.entry_terms),
    )
    conn.exec_driver_sql(
        "INSERT INTO mesh_entry_term (ui, term) SELECT DISTINCT ui, term FROM stage_term "
        "ON CONFLICT DO NOTHING"
    )

    create_staging(conn, "stage_tree", "tree_number text, name text, ui text")
    copy_rows(
        conn,
        "stage_tree",
        ("tree_number", "name", "ui"),
        ((t.tree_number, t.name, t.ui) for t in release.trees.values()),
    )
    removed = 0
    if replace_trees:
        removed = conn.exec_driver_sql(
            "DELETE FROM mesh_tree t WHERE NOT EXISTS "
            "(SELECT 1 FROM stage_tree s WHERE s.tree_number = t.tree_number)"
        ).rowcount
    conn.execute(
        text(
            """
            INSERT INTO mesh_tree AS t (tree_number, name, ui, mesh_year, source)
            SELECT tree_number, name, ui, :year, :source FROM stage_tree
            ON CONFLICT (tree_number) DO UPDATE SET
                name = EXCLUDED.name,
                ui = COALESCE(EXCLUDED.ui, t.ui),
                mesh_year = EXCLUDED.mesh_year,
                source = EXCLUDED.source
            """
        ),
        {"year": release.year, "source": source},
    )
    joined_from_db = resolve_tree_uis(conn)
    counts = mesh_counts(conn)
    report = dict(release.report)
    report["tree_numbers_removed"] = removed
    report["joined_from_database"] = joined_from_db
    report["still_unjoined"] = counts["tree_numbers_unjoined"]
    conn.execute(
        text(
            "INSERT INTO mesh_release (mesh_year, sources, counts, report) "
            "VALUES (:year, CAST(:sources AS jsonb), CAST(:counts AS jsonb), "
            "CAST(:report AS jsonb))"
        ),
        {
            "year": release.year,
            "sources": json.dumps(report["sources"]),
            "counts": json.dumps(counts),
            "report": json.dumps(report),
        },
    )
    return {"counts": counts, "report": report}


def resolve_tree_uis(conn: Connection) -> int:
    """Give UIs to tree numbers that have none, from descriptors known by name.

    Descriptors arrive from later MeSH loads and from article headings (UI + name), so
    this runs after both.
    """
    return conn.exec_driver_sql(
        """
        UPDATE mesh_tree t SET ui = d.ui
        FROM mesh_descriptor d
        WHERE t.ui IS NULL AND lower(d.name) = lower(t.name)
        """
    ).rowcount


def mesh_counts(conn: Connection) -> dict[str, int]:
    row = conn.exec_driver_sql(
        """
        SELECT (SELECT count(*) FROM mesh_descriptor),
               (SELECT count(*) FROM mesh_tree),
               (SELECT count(*) FROM mesh_tree WHERE ui IS NULL),
               (SELECT count(*) FROM mesh_entry_term)
        """
    ).one()
    return {
        "descriptors": row[0],
        "tree_numbers": row[1],
        "tree_numbers_unjoined": row[2],
        "entry_terms": row[3],
    }


def load_sources(
    conn: Connection,
    sources: Sequence[str],
    cache_dir: Path,
    *,
    year: int | None = None,
    replace_trees: bool = False,
) -> dict[str, Any]:
    """Resolve (download if needed), read, join and load the given sources."""
    paths = [resolve(s, cache_dir) for s in sources]
    release = combine(paths, year=year)
    log.info(
        "MeSH %s: %d descriptors, %d tree numbers (%d without UI) from %d source(s)",
        release.year, len(release.descriptors), len(release.trees),
        len(release.unjoined), len(paths),
    )
    return load_release(conn, release, replace_trees=replace_trees)
