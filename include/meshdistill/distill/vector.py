"""Retrieval by embeddings: the pgvector alternative to full-text search.

Abstracts are embedded by any OpenAI-compatible endpoint (:mod:`meshdistill.llm.embeddings`),
stored in a side table ``article_embedding`` with an HNSW (cosine) index, and searched
with the same contract as :func:`~meshdistill.distill.retrieve.retrieve_many`
(:class:`~meshdistill.distill.retrieve.ContextHit`: scores in [0, 1), the source always a
candidate with its true rank), so the rest of the pipeline does not care which retrieval
ran. The schema is made at run time, not in a migration, because a server without
pgvector must still run the full-text default; a missing extension is a ConfigError that
says what to do. Vectors of different models are never compared. Why each choice, and
what it costs, is in ``docs/retrieval.md``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from meshdistill.distill.retrieve import RETRIEVABLE, ContextHit
from meshdistill.errors import ConfigError
from meshdistill.llm.embeddings import OpenAIEmbedder, truncate

log = logging.getLogger(__name__)

TABLE = "article_embedding"
INDEX = "article_embedding_hnsw"
HNSW_MAX_DIM = 2000
"""pgvector 0.6 indexes at most 2,000 dimensions; wider vectors are searched exactly."""
SCORE_CAP = 1.0 - 1e-9
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


def _pgvector(conn: Connection) -> tuple[str, str | None]:
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
    _available, installed = _pgvector(conn)
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


def _vector_literal(vector: Sequence[float]) -> str:
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
        _pgvector(conn)  # the clear error before any request to the endpoint
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
                           "vecs": [_vector_literal(v) for v in vectors]}).rowcount
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


# -- retrieval -----------------------------------------------------------------------------


def _score(distance: str) -> str:
    """SQL for the score of a cosine distance: (1 + cos) / 2 in [0, 1).

    NULL stays NULL (no vector: greatest/least would otherwise skip it and give the cap);
    NaN (a zero vector) scores 0.
    """
    return (f"CASE WHEN ({distance}) IS NULL THEN NULL::float8 "
            f"WHEN ({distance}) = 'NaN'::float8 THEN 0::float8 "
            f"ELSE greatest(0::float8, least(1 - ({distance}) / 2, {SCORE_CAP!r})) END")


def _restriction(subtree: bool, alias: str) -> str:
    return (f"AND EXISTS (SELECT 1 FROM article_mesh m WHERE m.pmid = {alias}.pmid"
            " AND m.ui = ANY(CAST(:uis AS text[])))" if subtree else "")


# The question vectors arrive as one vector[] parameter, so each is parsed once.
_QUESTIONS = "unnest(CAST(:vecs AS vector[])) WITH ORDINALITY AS i(q, ord)"


def _top_sql(subtree: bool) -> str:
    """Top-k candidates per question by the HNSW index (no source handling).

    The inner query is the shape the index serves (one table, ORDER BY the distance
    operator, LIMIT): it yields the ``:pool`` nearest vectors of the model (at most
    ``hnsw.ef_search`` of them), then the article filters apply and k are kept.
    """
    return f"""
        SELECT i.ord, n.pmid, n.score
        FROM {_QUESTIONS}
        CROSS JOIN LATERAL (
            SELECT c.pmid, {_score("c.d")} AS score
            FROM (
                SELECT e.pmid, e.embedding <=> i.q AS d
                FROM {TABLE} e
                WHERE e.model = :model
                ORDER BY e.embedding <=> i.q
                LIMIT :pool
            ) c
            JOIN article a ON a.pmid = c.pmid
            WHERE {RETRIEVABLE} {_restriction(subtree, "c")}
            ORDER BY c.d, c.pmid
            LIMIT :k
        ) n
        WHERE i.q IS NOT NULL
    """


def _candidates(subtree: bool) -> str:
    """Every candidate's distance to ``i.q``, computed once per row (``OFFSET 0`` keeps
    PostgreSQL from inlining the subquery, which would compute it again in each use)."""
    return f"""(
        SELECT e.pmid, e.embedding <=> i.q AS d
        FROM {TABLE} e JOIN article a ON a.pmid = e.pmid
        WHERE e.model = :model AND {RETRIEVABLE} {_restriction(subtree, "e")}
        OFFSET 0
    ) x"""


def _exact_sql(subtree: bool) -> str:
    """Top-k candidates per question by a full scan: ordering by the score, not by the
    distance operator, keeps the index out."""
    return f"""
        SELECT i.ord, n.pmid, n.score
        FROM {_QUESTIONS}
        CROSS JOIN LATERAL (
            SELECT x.pmid, {_score("x.d")} AS score
            FROM {_candidates(subtree)}
            ORDER BY 2 DESC, x.pmid
            LIMIT :k
        ) n
        WHERE i.q IS NOT NULL
    """


_SOURCE_SQL = f"""
    SELECT i.ord, a.pmid, coalesce({_score("e.embedding <=> i.q")}, 0::float8)
    FROM unnest(CAST(:vecs AS vector[]), CAST(:sources AS bigint[])) WITH ORDINALITY
         AS i(q, source, ord)
    JOIN article a ON a.pmid = i.source
    LEFT JOIN {TABLE} e ON e.pmid = a.pmid AND e.model = :model
    WHERE {RETRIEVABLE}
"""


def _better_sql(subtree: bool) -> str:
    """Per question: the candidates other than the source that score strictly above it.

    One pass over the candidates for all questions (the questions are the inner side),
    rather than one scan per question.
    """
    return f"""
        SELECT x.ord, count(*) FILTER (WHERE x.pmid <> x.source AND {_score("x.d")} > x.score)
        FROM (
            SELECT i.ord, i.source, i.score, e.pmid, e.embedding <=> i.q AS d
            FROM {TABLE} e JOIN article a ON a.pmid = e.pmid
            CROSS JOIN unnest(CAST(:vecs AS vector[]), CAST(:sources AS bigint[]),
                              CAST(:scores AS float8[])) WITH ORDINALITY AS i(q, source, score, ord)
            WHERE e.model = :model AND {RETRIEVABLE} {_restriction(subtree, "e")}
            OFFSET 0
        ) x
        GROUP BY x.ord
    """


def _ef_search(k: int, subtree: bool, ef_search: int | None) -> int:
    if ef_search is not None:
        return max(1, min(1000, ef_search))
    return min(1000, max(200, 8 * k) if subtree else max(100, 4 * k))


def retrieve_vector_many(
    conn: Connection,
    items: Sequence[tuple[str, int]],
    k: int = 5,
    *,
    embedder: OpenAIEmbedder,
    subtree_uis: Sequence[str] | None = None,
    ef_search: int | None = None,
) -> list[list[ContextHit]]:
    """Hits for many ``(question, source_pmid)`` pairs, in the order given.

    The contract of :func:`meshdistill.distill.retrieve.retrieve_many`: per question the
    top ``k`` candidates by score, best first, ranks 1-based, ties to the source then to
    the lower PMID; the source appended with its own score and true rank when it misses
    the top k; no ``is_source`` hit when the source is not retrievable. Scores are
    ``(1 + cosine similarity) / 2`` in [0, 1). All questions are embedded together (one
    request per ``embedder.batch_size`` questions); a blank question is not sent and
    returns the source alone. Needs :func:`refresh_embeddings` to have run (a
    :class:`ConfigError` says so otherwise). ``ef_search`` overrides the HNSW candidate
    list size (default ``max(100, 4k)``, ``max(200, 8k)`` with ``subtree_uis``; at most
    1,000).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    results: list[list[ContextHit]] = [[] for _ in items]
    if not items:
        return results
    dim = table_dimension(conn)
    if dim is None:
        _pgvector(conn)
        raise ConfigError(f"no {TABLE} table: run refresh_embeddings before vector retrieval")
    live = [n for n, (question, _) in enumerate(items) if question.strip()]
    embedded = embedder.embed([items[n][0] for n in live]) if live else []
    if embedded and len(embedded[0]) != dim:
        raise ConfigError(
            f"model {embedder.model!r} gives {len(embedded[0])}-dimensional embeddings but "
            f"{TABLE} holds {dim}: refresh the embeddings with this model first")
    vecs: list[str | None] = [None] * len(items)
    for n, vector in zip(live, embedded, strict=True):
        vecs[n] = _vector_literal(vector)
    subtree = subtree_uis is not None
    pool = _ef_search(k, subtree, ef_search)
    params: dict[str, Any] = {"vecs": vecs, "model": embedder.model, "k": k, "pool": pool,
                              "sources": [int(s) for _, s in items]}
    if subtree:
        params["uis"] = list(subtree_uis or ())

    top: list[dict[int, float]] = [{} for _ in items]
    indexed = dim <= HNSW_MAX_DIM
    if indexed:
        conn.execute(text("SELECT set_config('hnsw.ef_search', :ef, true)"), {"ef": str(pool)})
    sql = _top_sql(subtree) if indexed else _exact_sql(subtree)
    for ord_, pmid, score in conn.execute(text(sql), params):
        top[ord_ - 1][pmid] = float(score)
    # The index scan may run out of candidates before k pass the filters: redo exactly.
    short = [n for n in live if len(top[n]) < k] if indexed else []
    if short:
        redo = {**params, "vecs": [vecs[n] for n in short]}
        for n in short:
            top[n] = {}
        for ord_, pmid, score in conn.execute(text(_exact_sql(subtree)), redo):
            top[short[ord_ - 1]][pmid] = float(score)

    sources: dict[int, float] = {}
    for ord_, _pmid, score in conn.execute(text(_SOURCE_SQL), params):
        sources[ord_ - 1] = float(score)

    beyond: list[int] = []
    for n, (_, source) in enumerate(items):
        candidates = dict(top[n])
        if n in sources:
            candidates[int(source)] = sources[n]
        ordered = sorted(candidates.items(), key=lambda c: (-c[1], c[0] != source, c[0]))
        for rank, (pmid, score) in enumerate(ordered, start=1):
            is_source = n in sources and pmid == source
            if rank <= k or is_source:
                results[n].append(ContextHit(pmid=pmid, rank=rank, score=score,
                                             is_source=is_source))
        if results[n] and results[n][-1].is_source and results[n][-1].rank > k:
            beyond.append(n)
    if beyond:
        _true_ranks(conn, items, results, beyond, params, sources, subtree)
    return results


def _true_ranks(
    conn: Connection, items: Sequence[tuple[str, int]], results: list[list[ContextHit]],
    beyond: list[int], params: dict[str, Any], sources: dict[int, float], subtree: bool,
) -> None:
    """Replace the provisional rank of sources beyond the top k by their exact rank."""
    counted = {**params, "vecs": [params["vecs"][n] for n in beyond],
               "sources": [int(items[n][1]) for n in beyond],
               "scores": [sources[n] for n in beyond]}
    for ord_, better in conn.execute(text(_better_sql(subtree)), counted):
        n = beyond[ord_ - 1]
        hit = results[n][-1]
        rank = max(hit.rank, 1 + int(better or 0))
        results[n][-1] = ContextHit(pmid=hit.pmid, rank=rank, score=hit.score,
                                    is_source=True)


def retrieve_vector(
    conn: Connection,
    question: str,
    source_pmid: int,
    k: int = 5,
    *,
    embedder: OpenAIEmbedder,
    subtree_uis: Sequence[str] | None = None,
) -> list[ContextHit]:
    """:func:`retrieve_vector_many` for one question."""
    return retrieve_vector_many(conn, [(question, source_pmid)], k, embedder=embedder,
                                subtree_uis=subtree_uis)[0]
