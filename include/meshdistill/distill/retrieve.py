"""Retrieve (docs/architecture.md, Pipeline steps: Retrieve): context abstracts by full-text search.

:func:`retrieve_many` returns, per ``(question, source_pmid)``, the top ``k`` retrievable
articles (:data:`RETRIEVABLE`) as :class:`ContextHit`: ``ts_rank_cd`` scores normalised to
[0, 1), 1-based ranks. The source is always a candidate: when it misses the top ``k`` it
is appended with its own score and true rank, because the grader must see the abstract
the question was written from; an unretrievable source is not returned. The question's
lexemes are ORed (a natural question rarely has all its words in one abstract); the
candidates are the articles holding its rarest lexemes, up to a postings budget
(:data:`CANDIDATE_BUDGET`), or holding its two rarest when even the rarest is common, and
never more than :data:`CANDIDATE_CAP`: no question's words can make it rank more. They are
ranked over all its lexemes, so a hit's score is the one the exhaustive search gives it,
each computed against the lexemes the article holds, which gives the same score at a
fraction of the cost (``_SCORE``).
All questions of a batch go in one statement. The vectors live in ``article_fts`` and
the document frequencies in ``lexeme_df``, both kept by :func:`refresh_index`, which the
distill step calls once before retrieving, outside the load path. Why each choice, with
its measurements: ``docs/retrieval.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

TABLES = ("article", "article_mesh", "article_fts", "lexeme_df")
"""Every table this module's SQL reads or writes (calibration shadows exactly these)."""
# The stored vector of migration 0003's side table, joined as ``f``.
FTS_EXPRESSION = "f.fts"
RETRIEVABLE = "a.status = 'active' AND a.abstract <> ''"
"""Which articles may be a source or a context (joined as ``a``): the one rule for the
full-text side table, the embeddings table and the distill source selection."""
RANK_NORMALIZATION = 1 | 32
"""``ts_rank_cd`` flags: 1 = divide by 1 + log(length), 32 = rank / (rank + 1)."""

CANDIDATE_BUDGET = 100
"""Default postings budget: the rarest lexemes of a question whose document frequencies
add up to at most this many articles choose the candidates (``docs/retrieval.md``)."""
QUERY_LEXEMES = 24
"""The most lexemes of a question that retrieval uses, its rarest first: ranking costs
grow with them, and a well-formed question has fewer (a median of 10 for titles, 16 for
generated questions; a 200-word ramble has over 100)."""
CANDIDATE_CAP = 200
"""The most candidates a question ranks (its source aside), whatever its words: the
bound on a question's cost however common its words and however large the corpus."""

_REFRESH_LOCK = 0x6D64_6674  # pg_advisory_xact_lock key of refresh_index ("mdft")

# One quoted tsquery operand per lexeme: a lexeme may contain quotes, backslashes, '&'.
_OPERAND = r"'''' || replace(replace(l, '\', '\\'), '''', '''''') || ''''"

# A question is its QUERY_LEXEMES rarest lexemes that occur in the corpus, then unknown
# ones (which match nothing). Per question: ``lexemes``, those lexemes (ranking, see
# _SCORE), and ``candidates``, a tsquery of some of them (matching).
# Lexemes are taken by ascending document frequency (unknown ones count 0) while the
# frequencies taken add up to at most :budget; every lexeme up to and including the first
# that occurs at all is always taken, and ``candidates`` is the OR of those taken. When
# that first occurring lexeme alone is over the budget (all the question's words are
# common), ``candidates`` is instead the AND of the two rarest occurring lexemes: the
# articles sharing two of its least common words, as an article shares every word of its
# title. A question with a single occurring lexeme keeps the OR. ``candidates`` is empty
# only when ``lexemes`` is; both NULL when the question has no lexeme (empty or stop
# words only), which matches nothing and scores NULL (read as 0 for the source). A NULL
# :budget takes every lexeme (the exhaustive search).
_QUERIES = f"""
    SELECT array_agg(l ORDER BY l) AS lexemes,
           (CASE WHEN bool_or(occurs = 1 AND df > CAST(:budget AS bigint))
                      AND count(*) FILTER (WHERE occurs <= 2) = 2
                 THEN string_agg(op, ' & ' ORDER BY l) FILTER (WHERE occurs <= 2)
                 ELSE string_agg(op, ' | ' ORDER BY l) FILTER (
                          WHERE CAST(:budget AS bigint) IS NULL
                             OR taken = 0 OR taken + df <= CAST(:budget AS bigint))
            END)::tsquery AS candidates
    FROM (
        SELECT l, df, {_OPERAND} AS op,
               coalesce(sum(df) OVER (ORDER BY df, l
                                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                        0) AS taken,
               CASE WHEN df > 0
                    THEN row_number() OVER (PARTITION BY df > 0 ORDER BY df, l) END AS occurs
        FROM (SELECT l, coalesce(d.ndoc, 0) AS df
              FROM unnest(tsvector_to_array(
                       to_tsvector('english'::regconfig, {{question}}))) AS l
              LEFT JOIN lexeme_df d ON d.lexeme = l
              ORDER BY coalesce(d.ndoc, 0) = 0, coalesce(d.ndoc, 0), l
              LIMIT {QUERY_LEXEMES}) x
    ) y
"""


# A candidate's score: ts_rank_cd(fts, q, RANK_NORMALIZATION), computed with q cut down to
# the question's lexemes that occur in the article. Why: ts_rank_cd zeroes a 32 KB buffer
# per query node for every article it scores, whether the lexeme occurs or not, so a
# 24-lexeme question (47 nodes) costs about 20 µs an article; the article's own share of
# those lexemes (three or four for most candidates) costs a few. The score is the same to
# the bit: under OR every position of a query lexeme is a cover of its own, and lexemes
# that do not occur add none. The article's lexemes among the question's are the ones
# setweight marks D and ts_filter keeps: the stored vectors carry weights A and B only.
# No such lexeme (a source that shares no word): NULL, read as 0 like a non-match.
_SCORE = f"""coalesce(ts_rank_cd({{fts}}, (
        SELECT string_agg({_OPERAND}, ' | ')::tsquery
        FROM unnest(tsvector_to_array(
                 ts_filter(setweight({{fts}}, 'D', t.lexemes), '{{{{d}}}}'))) AS l
    ), {RANK_NORMALIZATION}), 0)"""


@dataclass(frozen=True, slots=True)
class ContextHit:
    """One retrieved abstract for one question.

    ``rank`` is 1-based among all candidates of the question (ties broken by the source
    first, then by PMID), so an added source that did not make the top k carries its true
    rank (> k). ``score`` is ``ts_rank_cd`` normalised to [0, 1); 0 means no query word
    occurs in the article.
    """

    pmid: int
    rank: int
    score: float
    is_source: bool


def refresh_index(conn: Connection) -> dict[str, int]:
    """Bring ``article_fts`` up to date with ``article``; returns rows added and removed.

    Only articles that are new or whose content hash changed get a new vector, so a
    refresh after an unchanged reload costs one anti-join. The document frequencies in
    ``lexeme_df`` (migration 0005) follow incrementally: the lexemes of every vector taken
    out are subtracted, those of every vector put in are added. ``added`` counts new and
    re-indexed (changed) articles, ``removed`` the ones that left the retrievable set.
    Concurrent refreshes are serialised by a transaction-level advisory lock.
    """
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_REFRESH_LOCK})")
    # Stale vectors out first (gone, or built from another content hash), their lexemes
    # subtracted; then every retrievable article without a vector gets one, counted in.
    removed = conn.exec_driver_sql(
        f"""
        WITH stale AS (
            DELETE FROM article_fts f
            WHERE NOT EXISTS (
                SELECT 1 FROM article a
                WHERE a.pmid = f.pmid AND {RETRIEVABLE}
                  AND a.content_hash IS NOT DISTINCT FROM f.content_hash)
            RETURNING f.pmid, f.fts
        ), counted AS (
            UPDATE lexeme_df d SET ndoc = d.ndoc - s.n
            FROM (SELECT l, count(*) AS n
                  FROM stale, unnest(tsvector_to_array(stale.fts)) AS l GROUP BY l) s
            WHERE d.lexeme = s.l
        )
        SELECT count(*) FROM stale s
        WHERE NOT EXISTS (SELECT 1 FROM article a WHERE a.pmid = s.pmid AND {RETRIEVABLE})
        """
    ).scalar_one()
    added = conn.exec_driver_sql(
        f"""
        WITH fresh AS (
            INSERT INTO article_fts (pmid, content_hash, fts)
            SELECT a.pmid, a.content_hash,
                   setweight(to_tsvector('english'::regconfig, coalesce(a.title, '')), 'A')
                   || setweight(to_tsvector('english'::regconfig, a.abstract), 'B')
            FROM article a
            WHERE {RETRIEVABLE}
              AND NOT EXISTS (SELECT 1 FROM article_fts f WHERE f.pmid = a.pmid)
            RETURNING fts
        ), counted AS (
            INSERT INTO lexeme_df AS d (lexeme, ndoc)
            SELECT l, count(*) FROM fresh, unnest(tsvector_to_array(fresh.fts)) AS l
            GROUP BY l
            ON CONFLICT (lexeme) DO UPDATE SET ndoc = d.ndoc + EXCLUDED.ndoc
        )
        SELECT count(*) FROM fresh
        """
    ).scalar_one()
    conn.exec_driver_sql("DELETE FROM lexeme_df WHERE ndoc <= 0")
    if added:
        _merge_pending_entries(conn)
    return {"added": int(added), "removed": int(removed)}


def _merge_pending_entries(conn: Connection) -> None:
    """Move the GIN index's pending list into the index proper, now.

    Why: GIN buffers new entries in an unsorted pending list (``fastupdate``) until a
    vacuum merges them, and every search scans that whole list. After a bulk refresh it
    holds some 400 articles' entries; merging them cuts retrieval's PostgreSQL CPU by
    about a tenth (``docs/retrieval.md``). Merging needs the index's owner (or MAINTAIN);
    a role without it keeps the pending list until autovacuum, which is only slower.
    """
    try:
        with conn.begin_nested():
            conn.exec_driver_sql("SELECT gin_clean_pending_list('article_fts_gin'::regclass)")
    except DBAPIError as exc:
        log.info("article_fts_gin's pending entries stay until autovacuum: %s",
                 str(exc.orig).strip())


def _sql(subtree: bool) -> str:
    """The batch statement; one row per hit, ordered by question then rank."""
    restriction = (
        "AND EXISTS (SELECT 1 FROM article_mesh m"
        " WHERE m.pmid = a.pmid AND m.ui = ANY(CAST(:uis AS text[])))"
        if subtree
        else ""
    )
    fts = FTS_EXPRESSION
    score = _SCORE.format(fts=fts)
    return f"""
        SELECT i.ord, h.pmid, h.rank, h.score, h.is_source
        FROM unnest(CAST(:questions AS text[]), CAST(:sources AS bigint[]))
             WITH ORDINALITY AS i(question, source, ord)
        CROSS JOIN LATERAL ({_QUERIES.format(question="i.question")}) t
        CROSS JOIN LATERAL (
            SELECT c.pmid, c.score, c.is_source,
                   row_number() OVER (
                       ORDER BY c.score DESC, c.is_source DESC, c.pmid
                   ) AS rank
            FROM (
                SELECT f.pmid, {score} AS score, f.pmid = i.source AS is_source
                FROM (SELECT f.pmid, f.fts
                      FROM article_fts f JOIN article a ON a.pmid = f.pmid
                      WHERE {RETRIEVABLE} AND {fts} @@ t.candidates {restriction}
                      LIMIT CAST(:cap AS bigint)) f
                UNION
                -- The source, matched or not (UNION drops the duplicate when it matched).
                SELECT a.pmid, {score}, true
                FROM article a LEFT JOIN article_fts f ON f.pmid = a.pmid
                WHERE a.pmid = i.source AND {RETRIEVABLE}
            ) c
        ) h
        WHERE h.rank <= :k OR h.is_source
        ORDER BY i.ord, h.rank
    """


def retrieve_many(
    conn: Connection,
    items: Sequence[tuple[str, int]],
    k: int = 5,
    *,
    subtree_uis: Sequence[str] | None = None,
    candidate_budget: int | None = CANDIDATE_BUDGET,
    candidate_cap: int = CANDIDATE_CAP,
) -> list[list[ContextHit]]:
    """Hits for many ``(question, source_pmid)`` pairs, in the order given, in one statement.

    Each list follows :func:`retrieve`'s contract. One round trip for the whole batch:
    the per-question work is the same, but the planning and the client/server exchanges
    are paid once (see the queries/s printed by the tests). ``candidate_budget`` chooses
    the candidates by document frequency, at most ``candidate_cap`` of them
    (``docs/retrieval.md``); a ``None`` budget ranks every article that shares a lexeme
    with the question, with no cap (slow: the exact candidate set, for calibration).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if candidate_budget is not None and candidate_budget < 0:
        raise ValueError(f"candidate_budget must be >= 0 or None, got {candidate_budget}")
    if candidate_cap < 1:
        raise ValueError(f"candidate_cap must be at least 1, got {candidate_cap}")
    results: list[list[ContextHit]] = [[] for _ in items]
    if not items:
        return results
    params: dict[str, Any] = {
        "questions": [q for q, _ in items],
        "sources": [int(s) for _, s in items],
        "k": k,
        "budget": candidate_budget,
        "cap": None if candidate_budget is None else candidate_cap,  # LIMIT NULL: none
    }
    if subtree_uis is not None:
        params["uis"] = list(subtree_uis)
    # JIT compilation costs ~0.2 s per batch statement for nothing (the work is in the
    # text-search functions, not in expressions): off for this statement, the caller's
    # value back.
    jit = conn.exec_driver_sql(
        "SELECT current_setting('jit'), set_config('jit', 'off', true)"
    ).one()[0]
    rows = conn.execute(text(_sql(subtree_uis is not None)), params).all()
    conn.execute(text("SELECT set_config('jit', :v, true)"), {"v": jit})
    for ord_, pmid, rank, score, is_source in rows:
        results[ord_ - 1].append(
            ContextHit(pmid=pmid, rank=rank, score=float(score), is_source=is_source)
        )
    return results


def retrieve(
    conn: Connection,
    question: str,
    source_pmid: int,
    k: int = 5,
    *,
    subtree_uis: Sequence[str] | None = None,
    candidate_budget: int | None = CANDIDATE_BUDGET,
    candidate_cap: int = CANDIDATE_CAP,
) -> list[ContextHit]:
    """The ``k`` best context abstracts for ``question``, plus its source if they miss it.

    Candidates are the active articles with an abstract that contain one of the
    question's rarest lexemes (chosen by ``candidate_budget``, at most ``candidate_cap``
    of them, see ``docs/retrieval.md``; with ``None``, any of its lexemes, uncapped)
    and, with ``subtree_uis``, carry one of those headings; and the source article
    itself whatever it matches. The result is the top ``k`` candidates by score, best
    first; when the source is not among them it is appended with its own score and true
    rank, so the list holds ``k`` hits, or ``k + 1`` when the source had to be added
    (fewer when fewer candidates exist: an empty or stop-word-only question returns the
    source alone). Exactly one hit has ``is_source`` set unless the source is not
    retrievable itself (see the module docstring).
    """
    return retrieve_many(
        conn,
        [(question, source_pmid)],
        k,
        subtree_uis=subtree_uis,
        candidate_budget=candidate_budget,
        candidate_cap=candidate_cap,
    )[0]
