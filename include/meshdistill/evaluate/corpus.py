"""The calibration corpus: PubMedQA-L's abstracts in TEMP tables shadowing the real ones.

The real retrieval code then runs against the 1,000 benchmark abstracts instead of the
``article`` table: PostgreSQL resolves unqualified names in ``pg_temp`` first. The tables
shadowed are exactly those :data:`meshdistill.distill.retrieve.TABLES` declares.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Connection, text

from meshdistill.distill.grade import Headings
from meshdistill.distill.retrieve import TABLES, refresh_index
from meshdistill.evaluate.pubmedqa import PqalRecord

SHADOWED_TABLES = TABLES
"""Tables :mod:`meshdistill.distill.retrieve` reads or writes, shadowed by TEMP tables."""

SOURCE = "pubmedqa-l"
"""``article.source`` of the shadow rows."""


def map_mesh_names(conn: Connection, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``{name: UI}`` for heading names, case-insensitively, and the names left unmapped.

    Tried in order: descriptor names, tree-file names with a UI, entry terms (old names
    of renamed descriptors live there when the source has them).
    """
    wanted = sorted({n.lower() for n in names})
    rows = conn.execute(
        text(
            """
            SELECT DISTINCT ON (w.name) w.name, m.ui
            FROM unnest(CAST(:names AS text[])) AS w(name)
            JOIN (
                SELECT lower(name) AS name, ui, 1 AS pref FROM mesh_descriptor
                UNION ALL SELECT lower(name), ui, 2 FROM mesh_tree WHERE ui IS NOT NULL
                UNION ALL SELECT lower(term), ui, 3 FROM mesh_entry_term
            ) m ON m.name = w.name
            ORDER BY w.name, m.pref, m.ui
            """
        ),
        {"names": wanted},
    ).all()
    by_lower = {name: ui for name, ui in rows}
    mapped = {n: by_lower[n.lower()] for n in dict.fromkeys(names) if n.lower() in by_lower}
    unmapped = sorted({n for n in names if n.lower() not in by_lower})
    return mapped, unmapped


def _temp_schema_of(conn: Connection, table: str) -> str:
    return str(
        conn.execute(
            text(
                "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.oid = to_regclass(:t)"
            ),
            {"t": table},
        ).scalar_one()
    )


@contextmanager
def shadow_corpus(
    conn: Connection, records: Sequence[PqalRecord], headings: dict[int, Headings]
) -> Iterator[dict[str, int]]:
    """TEMP tables shadowing :data:`SHADOWED_TABLES`, holding ``records``, indexed.

    Yields the counts loaded. The tables are created ``ON COMMIT DROP`` and dropped
    explicitly on exit (always by their ``pg_temp`` name, never an unqualified one), so
    neither the caller's transaction nor a pooled session keeps them.
    """
    for table in SHADOWED_TABLES:
        conn.exec_driver_sql(
            f"CREATE TEMP TABLE {table} (LIKE public.{table} INCLUDING ALL) ON COMMIT DROP"
        )
        schema = _temp_schema_of(conn, table)
        if not schema.startswith("pg_temp"):
            raise RuntimeError(f"{table} resolves to {schema}.{table}, not the TEMP table")
    try:
        conn.execute(
            text(
                """
                INSERT INTO pg_temp.article (pmid, title, abstract, status, source, content_hash)
                SELECT p, '', a, 'active', :source, md5(a)
                FROM unnest(CAST(:pmids AS bigint[]), CAST(:abstracts AS text[])) AS t(p, a)
                """
            ),
            {
                "pmids": [r.pmid for r in records],
                "abstracts": [r.abstract for r in records],
                "source": SOURCE,
            },
        )
        links = [(pmid, ui, ui in h.major) for pmid, h in headings.items() for ui in h.uis]
        conn.execute(
            text(
                """
                INSERT INTO pg_temp.article_mesh (pmid, ui, major)
                SELECT * FROM unnest(CAST(:p AS bigint[]), CAST(:u AS text[]),
                                     CAST(:m AS boolean[]))
                """
            ),
            {"p": [x[0] for x in links], "u": [x[1] for x in links], "m": [x[2] for x in links]},
        )
        indexed = refresh_index(conn)
        conn.exec_driver_sql("ANALYZE " + ", ".join(f"pg_temp.{t}" for t in SHADOWED_TABLES))
        yield {"articles": len(records), "mesh_links": len(links), "indexed": indexed["added"]}
    finally:
        for table in SHADOWED_TABLES:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS pg_temp.{table}")
