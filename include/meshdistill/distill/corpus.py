"""Reading articles for distillation: which sources a run takes, and their text and MeSH.

Which articles a run takes (``select_sources``), in this order, up to the limit:

0. articles this same run already wrote items for: re-running a DAG run (a retry, a
   cleared task) takes exactly the articles it took before, so it makes no new calls;
1. articles with a deferred candidate, or one failed by the server or the network (not by
   the model's own unusable answer, which the cache replays: ``MODEL_ANSWER_FAILURES``):
   a run after a budget stop or an outage finishes that work first;
2. articles never distilled for this subtree and model, newest PMID first;
3. with ``redo``, also articles already settled (to apply new thresholds; their LLM calls
   come from the cache).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from sqlalchemy import Connection, text

from meshdistill.distill.candidates import normalize
from meshdistill.distill.grade import Headings
from meshdistill.distill.retrieve import RETRIEVABLE
from meshdistill.llm.backend import MODEL_ANSWER_FAILURES
from meshdistill.llm.inputs import ArticleInput, MeshHeading, Passage

_MODEL_ANSWERS = "(" + ", ".join(f"'{k}'" for k in sorted(MODEL_ANSWER_FAILURES)) + ")"
_SELECT = f"""
    WITH cand AS (
        SELECT a.pmid,
               CASE
                 WHEN EXISTS (SELECT 1 FROM qa_item q WHERE q.subtree = :subtree
                              AND q.model = :model AND q.source_pmid = a.pmid
                              AND q.run_id = :run_id) THEN 0
                 WHEN EXISTS (SELECT 1 FROM qa_item q WHERE q.subtree = :subtree
                              AND q.model = :model AND q.source_pmid = a.pmid
                              AND (q.state = 'deferred' OR (q.state = 'failed'
                                   AND q.reason NOT IN {_MODEL_ANSWERS}))) THEN 1
                 WHEN NOT EXISTS (SELECT 1 FROM qa_item q WHERE q.subtree = :subtree
                              AND q.model = :model AND q.source_pmid = a.pmid) THEN 2
                 ELSE 3
               END AS priority
        FROM article a
        WHERE {RETRIEVABLE}
          AND EXISTS (SELECT 1 FROM article_mesh m
                      WHERE m.pmid = a.pmid AND m.ui = ANY(CAST(:uis AS text[])))
    )
    SELECT pmid, priority FROM cand
    WHERE priority < 3 OR :redo
    ORDER BY priority, pmid DESC
    LIMIT :limit
"""


def select_sources(
    conn: Connection,
    subtree: str,
    subtree_uis: Sequence[str],
    model: str,
    run_id: str,
    limit: int | None,
    *,
    redo: bool = False,
) -> list[int]:
    """PMIDs of the source articles a run over ``subtree`` takes (see the module doc)."""
    rows = conn.execute(text(_SELECT), {
        "subtree": subtree, "uis": list(subtree_uis), "model": model, "run_id": run_id,
        "redo": redo, "limit": limit,
    })
    return [int(r.pmid) for r in rows]


@dataclass(frozen=True)
class ArticleRecord:
    """An article's text and headings, as the stages need them."""

    pmid: int
    title: str
    abstract: str
    headings: tuple[tuple[str, str, bool], ...]  # (ui, name, major)

    @cached_property
    def mesh(self) -> Headings:
        """The headings as the grader takes them, built once per record (the grader's
        memo keys on them for every question citing this article)."""
        return Headings(tuple(ui for ui, _, _ in self.headings),
                        frozenset(ui for ui, _, major in self.headings if major))

    @cached_property
    def normalized_text(self) -> str:
        """``normalize(f"{title} {abstract}")``, computed once per record: the text quoted
        evidence is checked against (the question's, and every answer citing it)."""
        return normalize(f"{self.title} {self.abstract}")

    def passage(self) -> Passage:
        return Passage(str(self.pmid), self.title, self.abstract)

    def as_input(self, ancestry: Sequence[str], scope_note: str | None) -> ArticleInput:
        return ArticleInput(
            pmid=str(self.pmid), title=self.title, abstract=self.abstract,
            mesh=tuple(MeshHeading(name, major) for _, name, major in self.headings),
            ancestry=tuple(ancestry), scope_note=scope_note,
        )


def load_articles(conn: Connection, pmids: Iterable[int]) -> dict[int, ArticleRecord]:
    """Title, abstract and MeSH headings (names from ``mesh_descriptor``, which loading
    fills from the articles' own headings too) of the given articles, whatever their
    status."""
    wanted = sorted(set(pmids))
    if not wanted:
        return {}
    rows = conn.execute(text(
        """
        SELECT a.pmid, coalesce(a.title, '') AS title, a.abstract,
               coalesce(array_agg(m.ui ORDER BY m.major DESC, m.ui)
                        FILTER (WHERE m.ui IS NOT NULL), '{}') AS uis,
               coalesce(array_agg(coalesce(d.name, m.ui) ORDER BY m.major DESC, m.ui)
                        FILTER (WHERE m.ui IS NOT NULL), '{}') AS names,
               coalesce(array_agg(m.major ORDER BY m.major DESC, m.ui)
                        FILTER (WHERE m.ui IS NOT NULL), '{}') AS majors
        FROM article a
        LEFT JOIN article_mesh m ON m.pmid = a.pmid
        LEFT JOIN mesh_descriptor d ON d.ui = m.ui
        WHERE a.pmid = ANY(:pmids)
        GROUP BY a.pmid
        """), {"pmids": wanted})
    return {
        int(r.pmid): ArticleRecord(int(r.pmid), r.title, r.abstract,
                                   tuple(zip(r.uis, r.names, r.majors, strict=True)))
        for r in rows
    }
