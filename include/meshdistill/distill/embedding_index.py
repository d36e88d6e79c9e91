"""The embeddings index of vector retrieval: its pgvector schema and its refresh.

Retrievable articles (title and abstract) are embedded by an OpenAI-compatible endpoint
(:mod:`meshdistill.llm.embeddings`) into the side table ``article_embedding`` with an
HNSW (cosine) index. The schema is made at run time, not in a migration, because a server
without pgvector must still run the full-text default; a missing extension is a
ConfigError that says what to do. A refresh embeds what is new or changed (or embedded by
another model), drops what is no longer retrievable, and commits per batch so paid work
survives a failure. docs/retrieval.md, "The vector option", gives the reasons.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from meshdistill.distill.retrieve import RETRIEVABLE
from meshdistill.errors import ConfigError
from meshdistill.llm.embeddings import OpenAIEmbedder, truncate

log = logging.getLogger(__name__)

TABLE = "article_embedding"
INDEX = "article_embedding_hnsw"
HNSW_MAX_DIM = 2000
"""pgvector 0.6 indexes at most 2,000 dimensions; wider vectors are searched exactly."""
BULK_FILL_MIN = 1000
NO_PGVECTOR = (
    "pgvector is not available in this PostgreSQL server; use the embedded server "
    "(no MESHDISTILL_DATABASE_URL) or install pgvector, or use retrieval=fts"
)
_LOCK_KEY = "meshdistill.article_embedding"


def document_text(title: str | None, abstract: str | None, max_chars: int) -> str:
    """The text embedded for an article: title, blank line, abstract, cut sensibly."""
    doc = "\n\n".join(p.strip() for p in (title or "", abstract or "") if p and p.strip())
    return truncate(doc, max_chars)


# -- schema --------------------------------------------------------------------------------


def pgvector_versions(conn: Connection) -> tuple[str, str | None]:
    """(available version, installed version), or ConfigError when the server lacks it."""
    row = conn.execute(text(
        "SELECT default_version, installed_version FROM pg_available_extensions "
        "WHERE name = 'vector'")).first()
    if row is None:
        raise ConfigError(NO_PGVECTOR)
    return row[0], row[1]


def table_dimension(conn: Connection) -> int | None:
    """The ``vector(n)`` width of ``article_embedding``, or None when there is no table."""
    row = conn.execute(text(
        "SELECT a.atttypmod FROM pg_attribute a "
        "WHERE a.attrelid = to_regclass(:t) AND a.attname = 'embedding' "
        "AND NOT a.attisdropped"), {"t": TABLE}).first()
    return None if row is None else int(row[0])


def ensure_vector_schema(conn: Connection, dim: int, *, recreate: bool = False) -> None:
    """Create the pgvector extension, ``article_embedding`` and its HNSW index if missing.

    Raises :class:`ConfigError` when the server has no pgvector, when the extension
    cannot be created (it needs a superuser: create it once as one), and when the table
    exists with another width (another model) unless ``recreate`` drops it first (its
    embeddings are then paid for again). Idempotent and safe under concurrency.
    """
    if not 1 <= dim <= 16000:
        raise ConfigError(f"embedding dimension must be between 1 and 16000, got {dim}")
    _available, installed = pgvector_versions(conn)
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": _LOCK_KEY + ":ddl"})
    if installed is None:
        try:
            with conn.begin_nested():
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
        except DBAPIError as exc:
            raise ConfigError(
                "pgvector is installed in this PostgreSQL server but the extension could "
                "not be created in this database (CREATE EXTENSION vector needs a "
                "superuser: run it once as one), or use retrieval=fts") from exc
        log.info("created the pgvector extension")
    existing = table_dimension(conn)
    if existing is not None and existing != dim:
        if not recreate:
            raise ConfigError(
                f"{TABLE} holds {existing}-dimensional embeddings but the embedding model "
                f"gives {dim}: drop the table (or pass recreate=True) to re-embed with this "
                "model, or keep the model the table was built with")
        conn.execute(text(f"DROP TABLE {TABLE}"))
        log.warning("dropped %s (%d dimensions) to hold %d-dimensional embeddings",
                    TABLE, existing, dim)
    conn.execute(text(
        f"CREATE TABLE IF NOT EXISTS {TABLE} ("
        " pmid bigint PRIMARY KEY, model text NOT NULL, content_hash text,"
        f" embedding vector({int(dim)}) NOT NULL)"))
    if dim <= HNSW_MAX_DIM:
        _build_index(conn, dim)
    else:
        log.warning("%d dimensions exceed pgvector's HNSW limit (%d): vector retrieval "
                    "will scan every embedding; ask the server for fewer dimensions",
                    dim, HNSW_MAX_DIM)


# -- refresh -------------------------------------------------------------------------------


def _build_index(conn: Connection, dim: int) -> bool:
    """Create the HNSW index when it is missing; True when it was built now."""
    if dim > HNSW_MAX_DIM or conn.execute(text("SELECT to_regclass(:i)"),
                                          {"i": INDEX}).scalar() is not None:
        return False
    conn.execute(text(
        "SELECT set_config('maintenance_work_mem', greatest(pg_size_bytes("
        "current_setting('maintenance_work_mem')), pg_size_bytes('256MB')) / 1024 || 'kB',"
        " true)"))
    conn.execute(text(
        f"CREATE INDEX IF NOT EXISTS {INDEX} ON {TABLE} USING hnsw (embedding vector_cosine_ops)"))
    return True


def vector_literal(vector: Sequence[float]) -> str:
    return "[" + ",".join(map(repr, vector)) + "]"


def _chunks(values: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(values), size):
        yield values[i:i + size]


def refresh_embeddings(
    conn: Connection, embedder: OpenAIEmbedder, *, progress_every: int = 2000
) -> dict[str, int]:
    """Embed new or changed retrievable articles and drop the ones no longer retrievable.

    Returns ``added`` (embedded or re-embedded), ``removed``, ``requests`` and ``tokens``
    of this refresh. Creates the schema when missing (see :func:`ensure_vector_schema`);
    with nothing to embed it sends no request. Commits after every batch when ``conn``
    had no transaction begun (docs/retrieval.md, "Commits"). Logs progress (count, rate)
    every ``progress_every`` articles and at the end.
    """
    own_tx = not conn.in_transaction()
    dim = table_dimension(conn)
    if dim is None:
        pgvector_versions(conn)  # the clear error before any request to the endpoint
        dim = embedder.dimension()
        ensure_vector_schema(conn, dim)
    key = {"k": _LOCK_KEY}
    if own_tx:
        conn.execute(text("SELECT pg_advisory_lock(hashtext(:k))"), key)
        conn.commit()
    else:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), key)
    try:
        result = _refresh(conn, embedder, dim, own_tx, progress_every)
    except BaseException:
        if own_tx:
            conn.rollback()
            try:  # a failed bulk fill committed rows without the index: rebuild it
                _build_index(conn, dim)
                conn.commit()
            except DBAPIError:
                log.warning("could not rebuild %s after a failed refresh", INDEX, exc_info=True)
        raise
    finally:
        if own_tx:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), key)
                conn.commit()
            except DBAPIError:  # the connection is gone, and the lock with it
                log.debug("could not release the embedding refresh lock", exc_info=True)
    return result


def _refresh(
    conn: Connection, embedder: OpenAIEmbedder, dim: int, own_tx: bool, progress_every: int
) -> dict[str, int]:
    removed = conn.execute(text(
        f"DELETE FROM {TABLE} e WHERE NOT EXISTS "
        f"(SELECT 1 FROM article a WHERE a.pmid = e.pmid AND {RETRIEVABLE})")).rowcount
    todo = list(conn.execute(text(
        f"""
        SELECT a.pmid FROM article a LEFT JOIN {TABLE} e ON e.pmid = a.pmid
        WHERE {RETRIEVABLE}
          AND (e.pmid IS NULL OR e.content_hash IS DISTINCT FROM a.content_hash
               OR e.model <> :model)
        ORDER BY a.pmid
        """), {"model": embedder.model}).scalars())
    stats0 = (embedder.stats.requests, embedder.stats.tokens)
    if not todo:
        if own_tx:
            conn.commit()
        log.info("embeddings (%s): up to date, %d removed", embedder.model, removed)
        return {"added": 0, "removed": int(removed), "requests": 0, "tokens": 0}
    # Bulk fill (docs/retrieval.md): 729 rows took 2.3 s into the index, 0.18 s
    # for building it afterwards.
    held = conn.execute(text(f"SELECT count(*) FROM {TABLE}")).scalar_one()
    if dim <= HNSW_MAX_DIM and len(todo) >= BULK_FILL_MIN and len(todo) > held:
        conn.execute(text(f"DROP INDEX IF EXISTS {INDEX}"))
    if own_tx:
        conn.commit()
    log.info("embeddings (%s): %d articles to embed, %d removed", embedder.model,
             len(todo), removed)
    start = time.perf_counter()
    added = 0
    next_log = progress_every
    pending: deque[tuple[list[int], list[str | None], Future[list[list[float]]]]] = deque()
    batches = _chunks(todo, embedder.batch_size)
    window = embedder.max_concurrency * 2  # keep the endpoint busy while we write

    with ThreadPoolExecutor(embedder.max_concurrency, thread_name_prefix="embed") as pool:
        try:
            while True:
                while len(pending) < window:
                    ids = next(batches, None)
                    if ids is None:
                        break
                    rows = conn.execute(text(
                        "SELECT a.pmid, a.content_hash, a.title, a.abstract FROM article a "
                        f"WHERE a.pmid = ANY(CAST(:ids AS bigint[])) AND {RETRIEVABLE} "
                        "ORDER BY a.pmid"), {"ids": list(ids)}).all()
                    texts = [document_text(r[2], r[3], embedder.max_input_chars)
                             for r in rows]
                    pending.append(([r[0] for r in rows], [r[1] for r in rows],
                                    pool.submit(embedder.embed_batch, texts)))
                if not pending:
                    break
                pmids, hashes, future = pending.popleft()
                vectors = future.result()
                if vectors and len(vectors[0]) != dim:
                    raise ConfigError(
                        f"model {embedder.model!r} at {embedder.base_url} returns "
                        f"{len(vectors[0])}-dimensional embeddings but {TABLE} holds {dim}: "
                        "does the server honour `dimensions`? Drop the table (or call "
                        "ensure_vector_schema(..., recreate=True)) to switch models")
                added += conn.execute(text(
                    f"""
                    INSERT INTO {TABLE} (pmid, model, content_hash, embedding)
                    SELECT u.pmid, :model, u.hash, CAST(u.vec AS vector)
                    FROM unnest(CAST(:pmids AS bigint[]), CAST(:hashes AS text[]),
                                CAST(:vecs AS text[])) AS u(pmid, hash, vec)
                    ON CONFLICT (pmid) DO UPDATE SET model = EXCLUDED.model,
                        content_hash = EXCLUDED.content_hash, embedding = EXCLUDED.embedding
                    """), {"model": embedder.model, "pmids": pmids, "hashes": hashes,
                           "vecs": [vector_literal(v) for v in vectors]}).rowcount
                if own_tx:
                    conn.commit()
                if added >= next_log or not pending:
                    _log_progress(embedder, added, len(todo), start, stats0)
                    next_log = added + progress_every
        except BaseException:
            for *_, future in pending:
                future.cancel()
            raise
    started = time.perf_counter()
    if _build_index(conn, dim):
        log.info("embeddings (%s): built %s over %d rows in %.1fs", embedder.model, INDEX,
                 held + added, time.perf_counter() - started)
    if added >= BULK_FILL_MIN:
        conn.execute(text(f"ANALYZE {TABLE}"))
    if own_tx:
        conn.commit()
    return {"added": added, "removed": int(removed),
            "requests": embedder.stats.requests - stats0[0],
            "tokens": embedder.stats.tokens - stats0[1]}


def _log_progress(
    embedder: OpenAIEmbedder, done: int, total: int, start: float, stats0: tuple[int, int]
) -> None:
    elapsed = time.perf_counter() - start
    log.info("embeddings (%s): %d/%d articles in %.1fs (%.0f/s), %d requests, %d tokens",
             embedder.model, done, total, elapsed, done / elapsed if elapsed else 0.0,
             embedder.stats.requests - stats0[0], embedder.stats.tokens - stats0[1])
