"""Load parsed PubMed records into Postgres.

Per file (or per E-utilities batch) one transaction: records stream through COPY into
temporary staging tables in chunks (memory stays flat), then set-based SQL merges them:
the last version of a PMID in the file wins, unchanged records (same content hash) are
not rewritten, a ``DeleteCitation`` turns the article into a tombstone, retraction
notices mark their targets retracted whichever arrives first, and every batch ends in an
``ingest_batch`` row whose counts reconcile with what was parsed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from meshdistill.errors import PubmedParseError
from meshdistill.mesh.load import resolve_tree_uis
from meshdistill.pubmed.records import Article, Deletion, Record, Skip
from meshdistill.store.bulk import (
    copy_json,
    copy_lines,
    copy_rows,
    copy_text,
    create_staging,
)

log = logging.getLogger(__name__)

ARTICLE_COLUMNS = (
    "seq", "pmid", "title", "journal", "pub_year", "doi", "pmc", "revised",
    "entrez_date", "status", "doc", "content_hash",
)
# Lists (sections, languages, types, keywords, MeSH headings) travel as one JSON document
# per article and are unpacked in SQL: one encode per article in Python instead of one
# staging row per heading (≈11 per article), and unchanged articles never unpack theirs.
# COPY is the loader's bottleneck, so nothing travels twice: the abstract is rebuilt from
# the sections in SQL, and each heading name goes once per batch (stage_heading_name).
_STAGING = {
    "stage_article": """seq integer, pmid bigint, title text, journal text,
        pub_year integer, doi text, pmc text, revised date, entrez_date date, status text,
        doc jsonb, content_hash text""",
    "stage_heading_name": "ui text, name text",
    "stage_deleted": "seq integer, pmid bigint",
    "stage_retraction": "pmid bigint, notice_pmid bigint",
    "stage_changed": "pmid bigint PRIMARY KEY, existed boolean NOT NULL",
}


@dataclass
class LoadResult:
    """What one batch did; ``parsed = loaded + unchanged + deleted + skipped``."""

    item: str
    parsed: int = 0
    loaded: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: int = 0
    without_abstract: int = 0
    without_mesh: int = 0
    retractions: int = 0
    status: str = "succeeded"
    error: str | None = None
    seconds: float = 0.0
    batch_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _article_row(seq: int, a: Article) -> str:
    """One staging line in COPY text format, ending with the content hash.

    The hash covers all that is stored for the article: its abstract is its sections'
    texts, and heading names belong to the descriptors.
    """
    doc = {
        "sections": [
            {"label": x.label, "category": x.category, "text": x.text} for x in a.sections
        ],
        "languages": a.languages,
        "publication_types": a.publication_types,
        "keywords": a.keywords,
        "mesh": [[m.ui, m.major, m.qualifiers] for m in a.mesh],
    }
    line = "\t".join(
        (
            str(seq), a.pmid, copy_text(a.title), copy_text(a.journal),
            "\\N" if a.pub_year is None else str(a.pub_year), copy_text(a.doi),
            copy_text(a.pmc), copy_text(a.revised), copy_text(a.entrez_date), a.status,
            copy_json(doc),
        )
    )
    # The hash skips the sequence number so the same record hashes the same in any file.
    digest = hashlib.blake2b(line[line.index("\t") + 1 :].encode(), digest_size=16)
    return f"{line}\t{digest.hexdigest()}\n"


class _Stager:
    """Buffers staging lines and COPYs them in chunks on a background thread.

    psycopg2 releases the GIL while COPY data travels and the server parses it, so
    building the next chunk's lines overlaps with sending this one (at most one chunk
    in flight; the connection is used by one thread at a time).
    """

    def __init__(self, conn: Connection, chunk_size: int) -> None:
        self.conn = conn
        self.chunk_size = chunk_size
        self.articles: list[str] = []
        self.deleted: list[tuple[int, str]] = []
        self.retractions: list[tuple[str, str]] = []
        self.names: dict[str, str] = {}  # heading names not yet sent in this batch
        self._named: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy")
        self._pending: Future[None] | None = None

    def add_names(self, article: Article) -> None:
        for m in article.mesh:
            if m.ui not in self._named:
                self._named.add(m.ui)
                self.names[m.ui] = m.name

    def _send(self, articles: list[str], deleted: list[tuple[int, str]],
              retractions: list[tuple[str, str]], names: dict[str, str]) -> None:
        copy_rows(self.conn, "stage_heading_name", ("ui", "name"), names.items())
        if articles:
            copy_lines(self.conn, "stage_article", ARTICLE_COLUMNS, articles)
        copy_rows(self.conn, "stage_deleted", ("seq", "pmid"), deleted)
        copy_rows(self.conn, "stage_retraction", ("pmid", "notice_pmid"), retractions)

    def flush(self, wait: bool = False) -> None:
        if self._pending is not None:
            self._pending.result()  # one chunk in flight; re-raises a failed COPY
        self._pending = self._pool.submit(
            self._send, self.articles, self.deleted, self.retractions, self.names
        )
        self.articles, self.deleted, self.retractions, self.names = [], [], [], {}
        if wait:
            self.close()

    def close(self) -> None:
        try:
            if self._pending is not None:
                self._pending.result()
        finally:
            self._pending = None
            self._pool.shutdown(wait=True)

    def full(self) -> bool:
        return len(self.articles) + len(self.deleted) >= self.chunk_size


def load_records(
    conn: Connection,
    records: Iterable[Record],
    *,
    source: str,
    item: str,
    subtree: str | None = None,
    window: tuple[date, date] | None = None,
    expected: int | None = None,
    chunk_size: int = 5000,
    progress_every: int = 10_000,
) -> LoadResult:
    """Stage, merge and record one batch inside the caller's transaction.

    A :class:`PubmedParseError` from ``records`` does not abort the batch: the complete
    records before the fault are merged, the batch is recorded as ``partial`` with the
    error, and the result says so (nothing already loaded is lost).
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    result = LoadResult(item=item)
    use_lz4(conn)
    for name, cols in _STAGING.items():
        create_staging(conn, name, cols)
    stager = _Stager(conn, chunk_size)
    skips: list[Skip] = []
    seq = 0
    # The last record of a PMID in the batch wins; earlier ones are superseded. Tracked
    # here (one int per PMID) so the merge needs no DISTINCT ON over wide staging rows.
    latest: dict[str, int] = {}
    try:
        for record in _counted(records, result, item, t0, progress_every):
            seq += 1
            if isinstance(record, Article):
                latest[record.pmid] = seq
                stager.articles.append(_article_row(seq, record))
                stager.add_names(record)
                if not record.abstract:
                    result.without_abstract += 1
                if not record.mesh:
                    result.without_mesh += 1
                for target in record.retraction_of:
                    stager.retractions.append((target, record.pmid))
            elif isinstance(record, Deletion):
                latest[record.pmid] = seq
                stager.deleted.append((seq, record.pmid))
            else:
                skips.append(record)
            if stager.full():
                stager.flush()
    except PubmedParseError as exc:
        # Nothing read at all (missing or unreadable file) is a failure, not a partial load:
        # decided here so that the ingest_batch row and the returned result agree.
        result.status = "partial" if result.parsed else "failed"
        result.error = str(exc)
        log.error("%s", exc)
    except BaseException:
        stager.close()
        raise
    stager.flush(wait=True)
    _drop_superseded(conn, latest, seq)
    _merge(conn, result, source)
    result.skipped = len(skips)
    result.unchanged = result.parsed - result.loaded - result.deleted - result.skipped
    result.seconds = time.perf_counter() - t0
    result.batch_id = _record_batch(
        conn, result, source=source, subtree=subtree, window=window, expected=expected,
        started=started, skips=skips,
    )
    return result


def use_lz4(conn: Connection) -> bool:
    """Compress what this transaction writes out of line (abstracts, section and heading
    documents, staged or stored) with lz4 rather than pglz; False where the server lacks
    it (PostgreSQL before 14, or built without lz4), which keeps pglz.

    Why: every staged article's JSON document and most abstracts are over the 2 kB at which
    PostgreSQL compresses, and the merge reads them back several times. With lz4 a batch
    of 50,000 articles loads in 4.1 s instead of 5.1 to 5.5 s at 500,000 articles
    (``bench/bench_scale.py``, docs/scaling.md).
    """
    try:
        with conn.begin_nested():
            conn.exec_driver_sql("SET LOCAL default_toast_compression = lz4")
        return True
    except DBAPIError:
        return False


def _counted(
    records: Iterable[Record], result: LoadResult, item: str, t0: float, every: int
) -> Iterator[Record]:
    for record in records:
        result.parsed += 1
        if result.parsed % every == 0:
            elapsed = time.perf_counter() - t0
            log.info(
                "%s: %d records read (%.0f/s)", item, result.parsed, result.parsed / elapsed
            )
        yield record


def _drop_superseded(conn: Connection, latest: dict[str, int], count: int) -> None:
    """Remove staged versions that a later record of the same PMID replaced."""
    if len(latest) == count:
        return
    keep = set(latest.values())
    conn.execute(
        text("DELETE FROM stage_article WHERE NOT (seq = ANY(:keep))"), {"keep": list(keep)}
    )
    conn.execute(
        text("DELETE FROM stage_deleted WHERE NOT (seq = ANY(:keep))"), {"keep": list(keep)}
    )


def _merge(conn: Connection, result: LoadResult, source: str) -> None:
    result.loaded = conn.execute(
        text(
            """
            WITH up AS (
                INSERT INTO article AS a (pmid, title, abstract, sections, journal, pub_year,
                    languages, publication_types, keywords, doi, pmc, revised, entrez_date,
                    status, source, content_hash)
                SELECT pmid, title,
                       (SELECT coalesce(string_agg(x.s->>'text', E'\\n' ORDER BY x.i), '')
                        FROM jsonb_array_elements(doc->'sections') WITH ORDINALITY x(s, i)
                        WHERE x.s->>'text' <> ''),
                       doc->'sections', journal, pub_year,
                       doc->'languages', doc->'publication_types', doc->'keywords', doi, pmc,
                       revised, entrez_date, status, :source, content_hash
                FROM stage_article
                ON CONFLICT (pmid) DO UPDATE SET
                    title = EXCLUDED.title, abstract = EXCLUDED.abstract,
                    sections = EXCLUDED.sections, journal = EXCLUDED.journal,
                    pub_year = EXCLUDED.pub_year, languages = EXCLUDED.languages,
                    publication_types = EXCLUDED.publication_types,
                    keywords = EXCLUDED.keywords, doi = EXCLUDED.doi, pmc = EXCLUDED.pmc,
                    revised = EXCLUDED.revised, entrez_date = EXCLUDED.entrez_date,
                    status = EXCLUDED.status, source = EXCLUDED.source,
                    content_hash = EXCLUDED.content_hash, ingested_at = now()
                WHERE a.content_hash IS DISTINCT FROM EXCLUDED.content_hash
                  AND a.status <> 'deleted'
                RETURNING pmid, xmax <> 0 AS existed  -- xmax 0: a new row, not an update
            )
            INSERT INTO stage_changed SELECT pmid, existed FROM up
            """
        ),
        {"source": source},
    ).rowcount
    conn.exec_driver_sql(
        """
        -- Only updated articles have links to replace. An array, not IN (subquery): a
        -- semi-join plans as a scan of all of article_mesh, whose cost grows with the
        -- corpus on every batch (0.5 s per batch at 350,000 articles).
        DELETE FROM article_mesh
        WHERE pmid = ANY(ARRAY(SELECT pmid FROM stage_changed WHERE existed));
        WITH heading AS (
            SELECT l.pmid, m->>0 AS ui, (m->>1)::boolean AS major, m->2 AS qualifiers
            FROM stage_article l
            JOIN stage_changed c ON c.pmid = l.pmid
            CROSS JOIN LATERAL jsonb_array_elements(l.doc->'mesh') m
        ), linked AS (
            INSERT INTO article_mesh (pmid, ui, major, qualifiers)
            SELECT pmid, ui, major, qualifiers FROM heading
        )
        -- Headings carry UI + name: descriptors the MeSH files did not name (newer ones,
        -- or a trees-only release) become known, so tree numbers can join to UIs later.
        INSERT INTO mesh_descriptor (ui, name, source)
        SELECT ui, name, 'pubmed-headings' FROM stage_heading_name n
        WHERE NOT EXISTS (SELECT 1 FROM mesh_descriptor d WHERE d.ui = n.ui)
        ON CONFLICT (ui) DO NOTHING;
        """
    )
    result.deleted = conn.execute(
        text(
            """
            WITH gone AS (
                INSERT INTO article AS a (pmid, status, source)
                SELECT DISTINCT d.pmid, 'deleted', :source FROM stage_deleted d
                WHERE NOT EXISTS (SELECT 1 FROM stage_article l WHERE l.pmid = d.pmid)
                ON CONFLICT (pmid) DO UPDATE SET status = 'deleted', source = EXCLUDED.source,
                    ingested_at = now()
                WHERE a.status <> 'deleted'
                RETURNING pmid
            ), unlinked AS (
                DELETE FROM article_mesh WHERE pmid = ANY(ARRAY(SELECT pmid FROM gone))
            )
            SELECT count(*) FROM gone
            """
        ),
        {"source": source},
    ).scalar_one()
    result.retractions = conn.exec_driver_sql(
        """
        INSERT INTO retraction (pmid, notice_pmid)
        SELECT DISTINCT ON (pmid) pmid, notice_pmid FROM stage_retraction
        ON CONFLICT (pmid) DO NOTHING
        """
    ).rowcount
    retracted = [
        row[0]
        for row in conn.exec_driver_sql(
            """
            SELECT r.pmid FROM retraction r JOIN stage_changed c ON c.pmid = r.pmid
            UNION SELECT pmid FROM stage_retraction
            """
        )
    ]
    conn.execute(
        text("UPDATE article SET status = 'retracted' WHERE pmid = ANY(:p) AND status = 'active'"),
        {"p": retracted},
    )
    resolve_tree_uis(conn)


def _record_batch(
    conn: Connection,
    result: LoadResult,
    *,
    source: str,
    subtree: str | None,
    window: tuple[date, date] | None,
    expected: int | None,
    started: datetime,
    skips: list[Skip],
) -> int:
    batch_id: int = conn.execute(
        text(
            """
            INSERT INTO ingest_batch (source, subtree, item, window_from, window_to, expected,
                parsed, loaded, unchanged, deleted, skipped, status, error, started_at)
            VALUES (:source, :subtree, :item, :wf, :wt, :expected, :parsed, :loaded,
                :unchanged, :deleted, :skipped, :status, :error, :started)
            RETURNING id
            """
        ),
        {
            "source": source, "subtree": subtree, "item": result.item,
            "wf": window[0] if window else None, "wt": window[1] if window else None,
            "expected": expected, "parsed": result.parsed, "loaded": result.loaded,
            "unchanged": result.unchanged, "deleted": result.deleted,
            "skipped": result.skipped, "status": result.status, "error": result.error,
            "started": started,
        },
    ).scalar_one()
    if skips:
        copy_rows(
            conn, "ingest_skip", ("batch_id", "pmid", "reason"),
            ((batch_id, s.pmid, s.reason) for s in skips),
        )
    return batch_id
