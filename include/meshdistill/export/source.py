"""Reading what an export takes from PostgreSQL: streamed, in one consistent snapshot.

An export reads twice: a narrow pass (ids, PMIDs, question, scores) to decide what is
kept, then a full pass that formats the kept rows. Both stream as Arrow record batches
through ADBC's PostgreSQL driver (binary ``COPY`` decoded straight into Arrow columns, as
fast as PostgreSQL sends them; a row-at-a-time DB-API cursor costs several times more in
Python objects), so memory does not grow with the table. The streams run on a second
connection that imports the snapshot of a ``REPEATABLE READ`` read-only transaction on
the first (``pg_export_snapshot``); a third imports it too and looks up the context
articles of each batch: items a distill run writes during an export are in no pass and
no lookup.
Items are ``accepted`` ``qa_item`` rows matching the settings' subtrees, types and
minimum scores; pairs are ``preference_pair`` rows whose chosen item matches them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

import adbc_driver_manager
import adbc_driver_postgresql
import numpy as np
import psycopg2.extensions
import pyarrow as pa
from sqlalchemy import Engine

from meshdistill.export.schemas import JUDGE_CRITERIA
from meshdistill.export.settings import ExportSettings
from meshdistill.mesh.tree import like_pattern
from meshdistill.store.db import libpq_uri

PLAN_BATCH_BYTES = 2 << 20
"""Arrow bytes per batch of a narrow pass (about 6,000 rows): tokens, shingles and
signatures of a batch take about twenty times its bytes while it is planned."""
ROWS_BATCH_BYTES = 4 << 20
"""Arrow bytes per batch of the full pass (about 2,500 items): formatted, a batch's texts
are several times larger, once per format (8 MB batches wrote about 20% faster and took
about 100 MB more at a million items)."""


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
           coalesce(q.hierarchy_score, 0)::float8 AS hierarchy,
           ({judge_sum})::float8 AS judge_sum,
           ARRAY(SELECT (c->>'pmid')::bigint FROM jsonb_array_elements(q.contexts) c)
               AS contexts
    FROM qa_item q WHERE {where} ORDER BY q.id
"""
_FLOAT = "{0}::text::float8 AS {1}"
"""float4 scores read as the decimal PostgreSQL prints (0.2, not 0.20000000298...)."""
ITEM_COLUMNS: dict[str, str] = {
    "id": "q.id", "subtree": "q.subtree", "source_pmid": "q.source_pmid",
    "profile": "q.profile", "ordinal": "q.ordinal", "qtype": "q.qtype",
    "question": "q.question", "answer_hint": "q.answer_hint", "evidence": "q.evidence",
    "contexts": "q.contexts::text", "answer": "q.answer", "label": "q.label",
    "cited_pmids": "q.cited_pmids", "answer_evidence": "q.answer_evidence::text",
    "question_mesh": "q.question_mesh",
    **{c: _FLOAT.format(f"q.{c}", c) for c in ("retrieval_score", "hierarchy_score",
                                               "blend_score")},
    **{f"judge_{c}": f"(q.judgement->>'{c}')::int2" for c in JUDGE_CRITERIA},
    "judge_rationale": "q.judgement->>'rationale'",
    "backend": "q.backend", "model": "q.model",
    **{f"prompt_{k}": f"q.prompt_versions->>'{k}'" for k in ("generate", "judge", "answer")},
    "run_id": "q.run_id", "params": "q.params::text",
}
"""The columns of :data:`ITEM_ROWS_SQL` by name, each with its expression (JSON columns
as text, parsed in Arrow where a format needs their parts)."""
ITEM_ROWS_SQL = ("SELECT " + ", ".join(
    expr if " AS " in expr else f"{expr} AS {name}" for name, expr in ITEM_COLUMNS.items())
    + " FROM qa_item q WHERE {where} ORDER BY q.id")
ARTICLE_TEXTS_SQL = ("SELECT pmid, coalesce(title, '') AS title, "
                     "coalesce(abstract, '') AS abstract "
                     "FROM article WHERE pmid = ANY('{{{pmids}}}'::int8[])")
"""Title and abstract of the context articles of one batch: fetched once per batch (the
items of one source share their contexts) instead of once per item and context."""

PAIR_PLAN_SQL = """
    SELECT p.id, p.source_pmid, p.subtree, c.qtype, c.question, r.question AS rejected,
           p.chosen_score::float8, p.margin::float8
    FROM preference_pair p
    JOIN qa_item c ON c.id = p.chosen_id JOIN qa_item r ON r.id = p.rejected_id
    WHERE {where} ORDER BY p.id
"""
PAIR_ROWS_SQL = """
    SELECT p.id, p.subtree, p.source_pmid, p.chosen_id, p.rejected_id,
           p.chosen_score::text::float8 AS chosen_score,
           p.rejected_score::text::float8 AS rejected_score, p.margin::text::float8 AS margin,
           c.qtype AS chosen_type, c.profile AS chosen_profile, c.question AS chosen,
           r.qtype AS rejected_type, r.profile AS rejected_profile, r.question AS rejected,
           coalesce(a.title, '') AS title, coalesce(a.abstract, '') AS abstract, h.names, h.majors
    FROM preference_pair p
    JOIN qa_item c ON c.id = p.chosen_id JOIN qa_item r ON r.id = p.rejected_id
    JOIN article a ON a.pmid = p.source_pmid
    LEFT JOIN (
        SELECT m.pmid, array_agg(coalesce(d.name, m.ui) ORDER BY m.major DESC, m.ui) AS names,
               array_agg(m.major ORDER BY m.major DESC, m.ui) AS majors
        FROM article_mesh m LEFT JOIN mesh_descriptor d ON d.ui = m.ui
        WHERE m.pmid IN (SELECT source_pmid FROM preference_pair)
        GROUP BY m.pmid
    ) h ON h.pmid = p.source_pmid
    WHERE {where} ORDER BY p.id
"""
"""Each pair with its source article and MeSH headings (major first). The headings of all
pair sources are aggregated in one hashed pass: a lookup per pair and heading took twice
as long (measured at 33,000 pairs)."""


class Snapshot:
    """One read-only, repeatable-read snapshot: ``anchor`` (psycopg2) holds it and runs
    small queries; ``stream`` and ``lookup`` (ADBC, Arrow without Python objects) imported
    it: one streams the passes, the other fetches context texts while a stream is open."""

    def __init__(self, anchor: Any, stream: Any, lookup: Any, settings: ExportSettings) -> None:
        self._anchor = anchor
        self._stream = stream
        self._lookup = lookup
        self.settings = settings

    def _batches(self, sql: str, alias: str, batch_bytes: int) -> Iterator[pa.RecordBatch]:
        where, params = _where(alias, self.settings)
        with self._anchor.cursor() as cur:
            query = cur.mogrify(sql.format(where=where, judge_sum=_JUDGE_SUM), params).decode()
        yield from self._stream.batches(query, batch_bytes)

    def item_plan_rows(self) -> Iterator[pa.RecordBatch]:
        return self._batches(ITEM_PLAN_SQL, "q", PLAN_BATCH_BYTES)

    def item_rows(self) -> Iterator[pa.RecordBatch]:
        return self._batches(ITEM_ROWS_SQL, "q", ROWS_BATCH_BYTES)

    def pair_plan_rows(self) -> Iterator[pa.RecordBatch]:
        return self._batches(PAIR_PLAN_SQL, "c", PLAN_BATCH_BYTES)

    def pair_rows(self) -> Iterator[pa.RecordBatch]:
        return self._batches(PAIR_ROWS_SQL, "c", ROWS_BATCH_BYTES)

    def article_texts(self, pmids: np.ndarray) -> pa.Table:
        """``pmid``, ``title`` and ``abstract`` of each of ``pmids`` that is stored."""
        listed = ",".join(map(str, np.unique(pmids.astype(np.int64)).tolist()))
        table = pa.Table.from_batches(
            self._lookup.batches(ARTICLE_TEXTS_SQL.format(pmids=listed), ROWS_BATCH_BYTES))
        return table.cast(pa.schema([("pmid", pa.int64()), ("title", pa.string()),
                                     ("abstract", pa.string())]))

    def fetch(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self._anchor.cursor() as cur:
            cur.execute(sql, params or {})
            return list(cur.fetchall())


NO_JIT = "SET LOCAL jit = off"
"""The export's queries read every matching row once: compiling them costs more than it
saves (measured: 1.5 of the pair query's 2.2 s at 33,000 pairs went to JIT)."""


class _Adbc:
    """One ADBC PostgreSQL connection in a transaction, through ``adbc_driver_manager``'s
    own API: its DB-API module imports ``pyarrow.dataset`` and pandas, 55 MB of resident
    memory an export of a million items cannot spare."""

    def __init__(self, uri: str) -> None:
        self._db = adbc_driver_postgresql.connect(uri)
        self._conn = adbc_driver_manager.AdbcConnection(self._db)
        self._conn.set_autocommit(False)
        self._open: dict[int, tuple[Any, pa.RecordBatchReader | None]] = {}

    def run(self, sql: str) -> None:
        with adbc_driver_manager.AdbcStatement(self._conn) as stmt:
            stmt.set_sql_query(sql)
            stmt.execute_update()

    def batches(self, sql: str, batch_bytes: int) -> Iterator[pa.RecordBatch]:
        """The rows of ``sql`` as record batches of about ``batch_bytes``."""
        stmt = adbc_driver_manager.AdbcStatement(self._conn)
        self._open[id(stmt)] = (stmt, None)
        try:
            stmt.set_options(**{"adbc.postgresql.batch_size_hint_bytes": str(batch_bytes)})
            stmt.set_sql_query(sql)
            handle, _ = stmt.execute_query()
            reader = pa.RecordBatchReader._import_from_c(handle.address)
            self._open[id(stmt)] = (stmt, reader)
            yield from reader
        finally:
            self._release(id(stmt))

    def _release(self, key: int) -> None:
        found = self._open.pop(key, None)
        if found is None:  # released by close() already
            return
        stmt, reader = found
        if reader is not None:
            reader.close()
        stmt.close()

    def close(self) -> None:
        """Roll back and close, with any stream a failed caller left unfinished."""
        try:
            for key in list(self._open):
                self._release(key)
            self._conn.rollback()
        finally:
            self._conn.close()
            self._db.close()


@contextmanager
def _importing(uri: str, exported: str) -> Iterator[_Adbc]:
    """An ADBC connection whose transaction reads the exported snapshot ``exported``."""
    conn = _Adbc(uri)
    try:
        conn.run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.run(f"SET TRANSACTION SNAPSHOT '{exported}'")
        conn.run(NO_JIT)
        yield conn
    finally:
        conn.close()


@contextmanager
def snapshot(engine: Engine, settings: ExportSettings) -> Iterator[Snapshot]:
    """A :class:`Snapshot`; every transaction is rolled back at the end (they only
    read)."""
    raw = engine.raw_connection()
    try:
        anchor: Any = raw.dbapi_connection
        anchor.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
                           readonly=True)
        try:
            with anchor.cursor() as cur:
                cur.execute("SELECT pg_export_snapshot()")
                exported = cur.fetchone()[0]
            uri = libpq_uri(str(engine.url.render_as_string(False)))
            with _importing(uri, exported) as stream, _importing(uri, exported) as lookup:
                yield Snapshot(anchor, stream, lookup, settings)
        finally:
            anchor.rollback()
            anchor.set_session(isolation_level="DEFAULT", readonly="DEFAULT")
    finally:
        raw.close()


def prefetch(batches: Iterator[pa.RecordBatch]) -> Generator[pa.RecordBatch, None, None]:
    """``batches`` read one ahead on a thread, so PostgreSQL sends the next batch while
    this one is formatted; closing the generator stops the reader and closes ``batches``."""
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put(("batch", batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            slots.put(("error", e))

    reader = threading.Thread(target=read, name="meshdistill-export-read", daemon=True)
    reader.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while reader.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.05)
        close = getattr(batches, "close", None)
        if close is not None:
            close()
