"""Reading what an export takes from PostgreSQL: streamed, in one consistent snapshot.

An export reads twice: a narrow pass (ids, PMIDs, question, scores) to decide what is
kept, then a full pass that formats the kept rows. Both run in one ``REPEATABLE READ``
read-only transaction, so items a distill run writes meanwhile are in neither pass, and
both go through server-side cursors in batches, so memory does not grow with the table.
Items are ``accepted`` ``qa_item`` rows matching the settings' subtrees, types and
minimum scores; pairs are ``preference_pair`` rows whose chosen item matches them.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg2.extensions
import psycopg2.extras
from sqlalchemy import Engine

from meshdistill.export.schemas import JUDGE_CRITERIA
from meshdistill.export.settings import ExportSettings
from meshdistill.mesh.tree import like_pattern

BATCH_ROWS = 2000


def _where(alias: str, s: ExportSettings) -> tuple[str, dict[str, Any]]:
    """The filter on ``qa_item`` rows under ``alias`` and its parameters."""
    clauses = [f"{alias}.state = 'accepted'", f"{alias}.qtype = ANY(%(types)s)",
               f"coalesce({alias}.hierarchy_score, 0) >= %(min_hierarchy)s"]
    params: dict[str, Any] = {"types": [t.value for t in s.question_types],
                              "min_hierarchy": s.min_hierarchy}
    if s.subtrees:
        clauses.append(f"({alias}.subtree = ANY(%(subtrees)s) "
                       f"OR {alias}.subtree LIKE ANY(%(subtree_patterns)s))")
        params["subtrees"] = list(s.subtrees)
        params["subtree_patterns"] = [like_pattern(p) for p in s.subtrees]
    for criterion, minimum in s.min_judge.active().items():
        clauses.append(f"({alias}.judgement->>'{criterion}')::int >= %(judge_{criterion})s")
        params[f"judge_{criterion}"] = minimum
    return " AND ".join(clauses), params


_JUDGE_SUM = " + ".join(f"coalesce((q.judgement->>'{c}')::int, 0)" for c in JUDGE_CRITERIA)

ITEM_PLAN_SQL = """
    SELECT q.id, q.source_pmid, q.subtree, q.qtype, q.label, q.question,
           coalesce(q.hierarchy_score, 0) AS hierarchy, {judge_sum} AS judge_sum,
           ARRAY(SELECT (c->>'pmid')::bigint FROM jsonb_array_elements(q.contexts) c)
    FROM qa_item q WHERE {where} ORDER BY q.id
"""
ITEM_COLUMNS = (
    "id", "subtree", "source_pmid", "profile", "ordinal", "qtype", "question", "answer_hint",
    "evidence", "contexts", "answer", "label", "cited_pmids", "answer_evidence",
    "question_mesh", "retrieval_score", "hierarchy_score", "blend_score", "judgement",
    "backend", "model", "prompt_versions", "run_id", "params")
"""The columns of :data:`ITEM_ROWS_SQL`, in order (``params`` as JSON text)."""
ITEM_ROWS_SQL = ("SELECT " + ", ".join(f"q.{c}::text" if c == "params" else f"q.{c}"
                                       for c in ITEM_COLUMNS)
                 + " FROM qa_item q WHERE {where} ORDER BY q.id")
ARTICLE_TEXTS_SQL = "SELECT pmid, coalesce(title, ''), abstract FROM article WHERE pmid = ANY(%s)"
"""Title and abstract of the context articles of one batch: fetched once per batch (the
items of one source share their contexts) instead of once per item and context."""

PAIR_PLAN_SQL = """
    SELECT p.id, p.source_pmid, p.subtree, c.qtype, c.question, r.question,
           p.chosen_score, p.margin
    FROM preference_pair p
    JOIN qa_item c ON c.id = p.chosen_id JOIN qa_item r ON r.id = p.rejected_id
    WHERE {where} ORDER BY p.id
"""
PAIR_ROWS_SQL = """
    SELECT p.id, p.subtree, p.source_pmid, p.chosen_id, p.rejected_id, p.chosen_score,
           p.rejected_score, p.margin, c.qtype, c.profile, c.question, r.qtype, r.profile,
           r.question, coalesce(a.title, ''), a.abstract, h.names, h.majors
    FROM preference_pair p
    JOIN qa_item c ON c.id = p.chosen_id JOIN qa_item r ON r.id = p.rejected_id
    JOIN article a ON a.pmid = p.source_pmid
    LEFT JOIN LATERAL (
        SELECT array_agg(coalesce(d.name, m.ui) ORDER BY m.major DESC, m.ui) AS names,
               array_agg(m.major ORDER BY m.major DESC, m.ui) AS majors
        FROM article_mesh m LEFT JOIN mesh_descriptor d ON d.ui = m.ui
        WHERE m.pmid = p.source_pmid
    ) h ON true
    WHERE {where} ORDER BY p.id
"""


class Snapshot:
    """One read-only, repeatable-read transaction on a raw psycopg2 connection."""

    def __init__(self, dbapi: Any, settings: ExportSettings) -> None:
        self._conn = dbapi
        self.settings = settings
        self._cursors = 0

    def _stream(self, sql: str, alias: str) -> Generator[list[tuple[Any, ...]], None, None]:
        where, params = _where(alias, self.settings)
        self._cursors += 1
        with self._conn.cursor(name=f"meshdistill_export_{self._cursors}") as cur:
            cur.itersize = BATCH_ROWS
            cur.execute(sql.format(where=where, judge_sum=_JUDGE_SUM), params)
            while batch := cur.fetchmany(BATCH_ROWS):
                yield batch

    def item_plan_rows(self) -> Generator[list[tuple[Any, ...]], None, None]:
        return self._stream(ITEM_PLAN_SQL, "q")

    def item_rows(self) -> Generator[list[tuple[Any, ...]], None, None]:
        return self._stream(ITEM_ROWS_SQL, "q")

    def pair_plan_rows(self) -> Generator[list[tuple[Any, ...]], None, None]:
        return self._stream(PAIR_PLAN_SQL, "c")

    def pair_rows(self) -> Generator[list[tuple[Any, ...]], None, None]:
        return self._stream(PAIR_ROWS_SQL, "c")

    def article_texts(self, pmids: set[int]) -> dict[int, tuple[str, str]]:
        """Title and abstract of each of ``pmids`` that is stored."""
        with self._conn.cursor() as cur:
            cur.execute(ARTICLE_TEXTS_SQL, (sorted(pmids),))
            return {int(p): (title, abstract) for p, title, abstract in cur}

    def fetch(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self._conn.cursor() as cur:
            cur.execute(sql, params or {})
            return list(cur.fetchall())


@contextmanager
def snapshot(engine: Engine, settings: ExportSettings) -> Iterator[Snapshot]:
    """A :class:`Snapshot` whose JSON columns decode with orjson; rolled back at the end
    (it only reads)."""
    raw = engine.raw_connection()
    try:
        dbapi: Any = raw.dbapi_connection
        psycopg2.extras.register_default_json(dbapi, loads=orjson.loads)
        psycopg2.extras.register_default_jsonb(dbapi, loads=orjson.loads)
        dbapi.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
                          readonly=True)
        try:
            yield Snapshot(dbapi, settings)
        finally:
            dbapi.rollback()
            dbapi.set_session(isolation_level="DEFAULT", readonly="DEFAULT")
            psycopg2.extras.register_default_json(dbapi)
            psycopg2.extras.register_default_jsonb(dbapi)
    finally:
        raw.close()
