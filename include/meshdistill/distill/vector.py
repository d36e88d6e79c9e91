"""Retrieval by embeddings: the pgvector alternative to full-text search.

Questions are embedded with the index's model and searched in ``article_embedding``
(:mod:`meshdistill.distill.embedding_index`) with the same contract as
:func:`~meshdistill.distill.retrieve.retrieve_many`
(:class:`~meshdistill.distill.retrieve.ContextHit`: scores in [0, 1), the source always a
candidate with its true rank), so the rest of the pipeline does not care which retrieval
ran. The HNSW scan is approximate and filters after it: ``hnsw.ef_search`` is raised per
statement, and a question left with fewer than ``k`` candidates is re-run exactly.
docs/retrieval.md, "The vector option", gives the reasons and figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, text

from meshdistill.distill.embedding_index import (
    HNSW_MAX_DIM,
    TABLE,
    pgvector_versions,
    table_dimension,
    vector_literal,
)
from meshdistill.distill.retrieve import RETRIEVABLE, ContextHit
from meshdistill.errors import ConfigError
from meshdistill.llm.embeddings import OpenAIEmbedder

SCORE_CAP = 1.0 - 1e-9
"""Scores stay below 1, like full-text scores."""



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
        pgvector_versions(conn)
        raise ConfigError(f"no {TABLE} table: run refresh_embeddings before vector retrieval")
    live = [n for n, (question, _) in enumerate(items) if question.strip()]
    embedded = embedder.embed([items[n][0] for n in live]) if live else []
    if embedded and len(embedded[0]) != dim:
        raise ConfigError(
            f"model {embedder.model!r} gives {len(embedded[0])}-dimensional embeddings but "
            f"{TABLE} holds {dim}: refresh the embeddings with this model first")
    vecs: list[str | None] = [None] * len(items)
    for n, vector in zip(live, embedded, strict=True):
        vecs[n] = vector_literal(vector)
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
