"""Retrieve (pipeline step 4): top-k context abstracts for a question, by full-text search.

The corpus is the local ``article`` table. Its tsvectors,
``setweight(title, 'A') || setweight(abstract, 'B')`` (english configuration), live in the
side table ``article_fts`` (migration 0003) with a GIN index, for active articles with an
abstract (the only ones a context may come from). :func:`refresh_index` brings it up to
date in bulk (new or changed articles by content hash, gone ones removed); the distill
stage calls it once before retrieving, so loading stays fast (see 0003).

Choices, and why:

- **OR semantics.** A natural question ("Does X improve survival in patients with Y?")
  rarely has every one of its words in one abstract, so AND semantics (``plainto_tsquery``)
  returns nothing for most questions. The question's lexemes (stemmed, stop words dropped)
  are ORed instead and the ranking decides. The OR query is built from
  ``to_tsvector(question)``'s lexeme array, each lexeme quoted, rather than by rewriting
  ``&`` to ``|`` in a tsquery's text: a lexeme may itself contain ``&`` (URLs, "AT&T").
- **Ranking: ``ts_rank_cd(..., 1 | 32)``.** Under OR semantics every occurrence of any
  query word is a cover, so raw cover density grows with the abstract's length and long
  abstracts full of common words ("patients", "study") crowd out short, on-topic ones;
  flag 1 divides by 1 + log(length), which tempers that without the heavy penalty of flag
  2 (divide by length), which favours title-only matches of tiny documents. Flag 32
  (rank / (rank + 1)) keeps the order and maps scores to [0, 1), so they can be compared
  across questions and blended with the MeSH-hierarchy score. With these flags an
  article's own title retrieves it at rank 1 for 191 of 200 sampled articles of
  pubmed20n0014 (``tests/integration/test_retrieve.py``); the other flags were not compared.
- **The source is always a candidate.** The question was written from the source
  abstract, so the grader must see it even when the question shares no word with it
  (paraphrase, a question about MeSH headings): it is scored like any other candidate
  (possibly 0, never a made-up score), and added to the result when it is not in the top
  k. A source that is not itself retrievable (deleted, retracted, without abstract,
  unknown) is not returned: the caller sees no ``is_source`` hit and must treat the
  question as having lost its source.
- **Subtree restriction** (optional) keeps contexts to articles with at least one heading
  among the given descriptor UIs (``mesh.subtree.subtree_descriptor_uis``); it does not
  apply to the source, which is a candidate by definition.
- **Many questions at once.** :func:`retrieve_many` sends all questions in one statement
  (a ``LATERAL`` subquery over an ``unnest`` of the questions), so a batch costs one round
  trip and one plan instead of one per question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

# The stored vector of migration 0003's side table, joined as ``f``.
FTS_EXPRESSION = "f.fts"
RETRIEVABLE = "a.status = 'active' AND a.abstract <> ''"
RANK_NORMALIZATION = 1 | 32
"""``ts_rank_cd`` flags: 1 = divide by 1 + log(length), 32 = rank / (rank + 1)."""

# The question's lexemes ORed into one tsquery; NULL when the question has none (empty or
# stop words only), which matches nothing and scores NULL (read as 0 for the source).
_OR_QUERY = """
    (SELECT string_agg(
                '''' || replace(replace(l, '\\', '\\\\'), '''', '''''') || '''', ' | '
            )::tsquery
     FROM unnest(tsvector_to_array(to_tsvector('english'::regconfig, {question}))) AS l)
"""


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
    refresh after an unchanged reload costs one anti-join.
    """
    added = conn.exec_driver_sql(
        f"""
        INSERT INTO article_fts (pmid, content_hash, fts)
        SELECT a.pmid, a.content_hash,
               setweight(to_tsvector('english'::regconfig, coalesce(a.title, '')), 'A')
               || setweight(to_tsvector('english'::regconfig, a.abstract), 'B')
        FROM article a LEFT JOIN article_fts f ON f.pmid = a.pmid
        WHERE {RETRIEVABLE}
          AND (f.pmid IS NULL OR f.content_hash IS DISTINCT FROM a.content_hash)
        ON CONFLICT (pmid) DO UPDATE
            SET content_hash = EXCLUDED.content_hash, fts = EXCLUDED.fts
        """
    ).rowcount
    removed = conn.exec_driver_sql(
        f"""
        DELETE FROM article_fts f
        WHERE NOT EXISTS (SELECT 1 FROM article a WHERE a.pmid = f.pmid AND {RETRIEVABLE})
        """
    ).rowcount
    return {"added": int(added), "removed": int(removed)}


def _sql(subtree: bool) -> str:
    """The batch statement; one row per hit, ordered by question then rank."""
    restriction = (
        "AND EXISTS (SELECT 1 FROM article_mesh m"
        " WHERE m.pmid = a.pmid AND m.ui = ANY(CAST(:uis AS text[])))"
        if subtree
        else ""
    )
    fts = FTS_EXPRESSION
    return f"""
        SELECT i.ord, h.pmid, h.rank, h.score, h.is_source
        FROM unnest(CAST(:questions AS text[]), CAST(:sources AS bigint[]))
             WITH ORDINALITY AS i(question, source, ord)
        CROSS JOIN LATERAL (SELECT {_OR_QUERY.format(question="i.question")} AS q) t
        CROSS JOIN LATERAL (
            SELECT c.pmid, c.score, c.is_source,
                   row_number() OVER (
                       ORDER BY c.score DESC, c.is_source DESC, c.pmid
                   ) AS rank
            FROM (
                SELECT a.pmid,
                       coalesce(ts_rank_cd({fts}, t.q, {RANK_NORMALIZATION}), 0) AS score,
                       a.pmid = i.source AS is_source
                FROM article_fts f JOIN article a ON a.pmid = f.pmid
                WHERE {RETRIEVABLE} AND {fts} @@ t.q {restriction}
                UNION
                -- The source, matched or not (UNION drops the duplicate when it matched).
                SELECT a.pmid,
                       coalesce(ts_rank_cd({fts}, t.q, {RANK_NORMALIZATION}), 0),
                       true
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
) -> list[list[ContextHit]]:
    """Hits for many ``(question, source_pmid)`` pairs, in the order given, in one statement.

    Each list follows :func:`retrieve`'s contract. One round trip for the whole batch:
    the per-question work is the same, but the planning and the client/server exchanges
    are paid once (see the queries/s printed by the tests).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    results: list[list[ContextHit]] = [[] for _ in items]
    if not items:
        return results
    params: dict[str, Any] = {
        "questions": [q for q, _ in items],
        "sources": [int(s) for _, s in items],
        "k": k,
    }
    if subtree_uis is not None:
        params["uis"] = list(subtree_uis)
    rows = conn.execute(text(_sql(subtree_uis is not None)), params)
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
) -> list[ContextHit]:
    """The ``k`` best context abstracts for ``question``, plus its source if they miss it.

    Candidates are the active articles with an abstract that share at least one lexeme
    with the question (and, with ``subtree_uis``, carry one of those headings), and the
    source article itself whatever it matches. The result is the top ``k`` candidates by
    score, best first; when the source is not among them it is appended with its own
    score and true rank, so the list holds ``k`` hits, or ``k + 1`` when the source had to
    be added (fewer when fewer candidates exist: an empty or stop-word-only question
    returns the source alone). Exactly one hit has ``is_source`` set unless the source is
    not retrievable itself (see the module docstring).
    """
    return retrieve_many(conn, [(question, source_pmid)], k, subtree_uis=subtree_uis)[0]
