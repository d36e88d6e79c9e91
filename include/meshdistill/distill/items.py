"""Writing candidates and preference pairs to ``qa_item`` / ``preference_pair`` (0004).

Every write is an upsert on the natural key (subtree, source_pmid, model, profile,
ordinal), one transaction per flush: re-running a task rewrites the same rows. When an
article is rewritten with fewer candidates than it has stored (a generation that succeeds
with fewer questions, or fewer questions asked), its extra rows are deleted in the same
transaction, so what is stored is always exactly the last run's candidates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg2.extras import execute_values
from sqlalchemy import Connection, text

from meshdistill.distill.candidates import TERMINAL, Candidate, PreferencePair
from meshdistill.store.bulk import upsert_sql, values_template

_KEY = ("subtree", "source_pmid", "model", "profile", "ordinal")
# The qa_item columns ``_row`` fills, in its order (migration 0004 owns the DDL), and the
# casts the VALUES template needs: JSON goes as text, arrays as Python lists.
_COLUMNS = (
    *_KEY, "backend", "prompt_versions", "params", "qtype", "question", "answer_hint",
    "evidence", "question_mesh", "contexts", "retrieval_score", "hierarchy_score",
    "blend_score", "judgement", "answer", "label", "cited_pmids", "answer_evidence", "state",
    "stage", "reason", "error", "run_id",
)
_CASTS = {
    "prompt_versions": "::jsonb", "params": "::jsonb", "question_mesh": "::text[]",
    "contexts": "::jsonb", "judgement": "::jsonb", "cited_pmids": "::bigint[]",
    "answer_evidence": "::jsonb",
}
_JSON_COLUMNS = frozenset(c for c, cast in _CASTS.items() if cast == "::jsonb")
_ITEM_SQL = upsert_sql("qa_item", _COLUMNS, _KEY, update=True, touch="updated_at",
                       returning=("id", "source_pmid", "profile", "ordinal"))
_ITEM_TEMPLATE = values_template(_COLUMNS, _CASTS)
_PAIR_COLUMNS = ("subtree", "source_pmid", "model", "ordinal", "chosen_id", "rejected_id",
                 "chosen_score", "rejected_score", "margin", "run_id")
_PAIR_SQL = f"INSERT INTO preference_pair ({', '.join(_PAIR_COLUMNS)}) VALUES %s"


def _values(row: dict[str, Any]) -> tuple[Any, ...]:
    """One row's parameters in ``_COLUMNS`` order; JSON as ``json.dumps`` text (None is
    the JSON ``null``, not SQL NULL, as SQLAlchemy's JSONB type sent it before)."""
    return tuple(json.dumps(row[c]) if c in _JSON_COLUMNS else row[c] for c in _COLUMNS)


@dataclass
class ArticleOutcome:
    """All candidates of one source article, and its preference pairs (by ordinal)."""

    pmid: int
    candidates: list[Candidate]
    pairs: list[PreferencePair]


@dataclass(frozen=True)
class RunIdentity:
    """What every row of one run shares."""

    subtree: str
    model: str
    backend: str
    run_id: str
    params: dict[str, Any]


def _row(ident: RunIdentity, pmid: int, c: Candidate) -> dict[str, Any]:
    q = c.question
    a = c.answer
    return {
        "subtree": ident.subtree, "source_pmid": pmid, "model": ident.model,
        "profile": c.profile, "ordinal": c.ordinal, "backend": ident.backend,
        "prompt_versions": c.prompt_versions,
        "params": {**ident.params, "llm": c.llm_params},
        "qtype": q.type.value if q else None, "question": q.question if q else None,
        "answer_hint": q.answer_hint if q else None, "evidence": q.evidence if q else None,
        "question_mesh": c.question_mesh if q else None,
        "contexts": [x.as_json() for x in c.contexts] if c.contexts else None,
        "retrieval_score": c.retrieval_score, "hierarchy_score": c.hierarchy_score,
        "blend_score": c.blend_score, "judgement": c.judgement,
        "answer": a.answer if a else None, "label": a.label.value if a and a.label else None,
        "cited_pmids": [int(p) for p in a.cited_pmids] if a else None,
        "answer_evidence": list(a.evidence) if a else None,
        "state": c.state, "stage": c.stage, "reason": c.reason, "error": c.error,
        "run_id": ident.run_id,
    }


def write_outcomes(conn: Connection, ident: RunIdentity,
                   outcomes: Sequence[ArticleOutcome]) -> dict[str, int]:
    """Upsert the outcomes' rows and replace their pairs; call inside a transaction."""
    rows = [_row(ident, o.pmid, c) for o in outcomes for c in o.candidates]
    if not rows:
        return {"items": 0, "pairs": 0, "removed": 0}
    unfinished = [r for r in rows if r["state"] is None]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} candidates reached the store without a state")
    ids: dict[tuple[int, str, int], int] = {}
    # psycopg2's execute_values on this transaction's connection: SQLAlchemy compiles a
    # fresh 500-row x 30-column multi-VALUES statement per chunk, 0.3-0.5 ms of CPU per
    # row in a worker thread holding the GIL the event loop needs. Same statement
    # semantics (upsert on the natural key, every other column replaced, updated_at
    # now()), same parameter values and JSON text.
    dbapi: Any = conn.connection.dbapi_connection
    with dbapi.cursor() as cur:
        for start in range(0, len(rows), 500):
            chunk = [_values(r) for r in rows[start:start + 500]]
            for id_, pmid, profile, ordinal in execute_values(
                    cur, _ITEM_SQL, chunk, template=_ITEM_TEMPLATE, page_size=len(chunk),
                    fetch=True):
                ids[(pmid, profile, ordinal)] = id_
    groups: dict[tuple[int, str], int] = {}
    for o in outcomes:
        for c in o.candidates:
            groups[(o.pmid, c.profile)] = max(groups.get((o.pmid, c.profile), 0), c.ordinal + 1)
    removed = conn.execute(text(
        """
        DELETE FROM qa_item q
        USING unnest(CAST(:pmids AS bigint[]), CAST(:profiles AS text[]),
                     CAST(:counts AS int[])) AS g(pmid, profile, n)
        WHERE q.subtree = :subtree AND q.model = :model AND q.source_pmid = g.pmid
          AND q.profile = g.profile AND q.ordinal >= g.n
        """), {
        "pmids": [k[0] for k in groups], "profiles": [k[1] for k in groups],
        "counts": list(groups.values()), "subtree": ident.subtree, "model": ident.model,
    }).rowcount
    pmids = [o.pmid for o in outcomes]
    conn.execute(text(
        "DELETE FROM preference_pair WHERE subtree = :subtree AND model = :model "
        "AND source_pmid = ANY(:pmids)"),
        {"subtree": ident.subtree, "model": ident.model, "pmids": pmids})
    pair_rows = [
        (ident.subtree, o.pmid, ident.model, ordinal, ids[(o.pmid, chosen, ordinal)],
         ids[(o.pmid, rejected, ordinal)], cs, rs, cs - rs, ident.run_id)
        for o in outcomes for ordinal, chosen, rejected, cs, rs in o.pairs
    ]
    if pair_rows:
        with dbapi.cursor() as cur:
            execute_values(cur, _PAIR_SQL, pair_rows, page_size=1000)
    return {"items": len(rows), "pairs": len(pair_rows), "removed": int(removed)}


def state_counts(conn: Connection, subtree: str, model: str,
                 pmids: Sequence[int]) -> dict[str, int]:
    """Stored candidates of these sources by state (for reconciliation)."""
    rows = conn.execute(text(
        "SELECT state, count(*) FROM qa_item WHERE subtree = :subtree AND model = :model "
        "AND source_pmid = ANY(:pmids) GROUP BY state"),
        {"subtree": subtree, "model": model, "pmids": list(pmids)})
    counts = dict.fromkeys(TERMINAL, 0)
    counts.update({r[0]: int(r[1]) for r in rows})
    return counts


def qa_counts(conn: Connection) -> dict[str, Any]:
    """``status``'s ``qa.*`` and ``preference_pairs`` figures over the whole database."""
    rows = conn.execute(text("SELECT state, count(*) FROM qa_item GROUP BY state"))
    states = {str(r[0]): int(r[1]) for r in rows}
    pairs = conn.execute(text("SELECT count(*) FROM preference_pair")).scalar_one()
    return {
        "qa": {s: states.get(s, 0) for s in TERMINAL},
        "preference_pairs": int(pairs),
    }
