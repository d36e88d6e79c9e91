"""Calibration: how well do the ranking signals tell a question's own abstract from others?

On PubMedQA-L each question's own abstract is the positive; the negatives are *random*
other abstracts (seeded) and *hard* ones, those the pipeline's retrieval ranks highest.
Each pair gets four scores (``hierarchy``, ``retrieval``, ``blend``, ``judge``) and each
score's ROC AUC is reported per kind of negative, pooled and per question. Retrieval runs
the real code on the benchmark abstracts (:mod:`meshdistill.evaluate.corpus`); which
candidate is the positive never enters a score. The method, its guards and the figures
are in ``docs/calibration.md``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from sqlalchemy import Connection

from meshdistill import aio
from meshdistill.distill.grade import Headings, MeshGrader
from meshdistill.distill.retrieve import retrieve_many
from meshdistill.errors import ConfigError
from meshdistill.evaluate.auc import roc_auc
from meshdistill.evaluate.corpus import map_mesh_names, shadow_corpus
from meshdistill.evaluate.pubmedqa import PqalRecord
from meshdistill.llm.backend import LLMBackend, complete_all
from meshdistill.llm.inputs import ArticleInput, JudgeInput, MeshHeading, Passage
from meshdistill.llm.offline import OfflineBackend
from meshdistill.llm.schemas import Judgement, Question, QuestionType
from meshdistill.llm.stages import judge_request

log = logging.getLogger(__name__)

SIGNALS = ("hierarchy", "retrieval", "blend", "judge")

HIERARCHY_TARGET = 0.85
"""The bar for the hierarchy AUC on random negatives (pooled)."""


# --- scoring ------------------------------------------------------------------------------


@dataclass
class Pair:
    """One (question, candidate) pair with its scores."""

    question: int  # index into the records
    candidate: int  # PMID
    positive: bool
    kind: str  # 'positive' | 'random' | 'hard'
    retrieval: float = 0.0
    hierarchy: float = 0.0
    blend: float = 0.0
    judge: float = 0.0


def judge_score(judgement: Judgement) -> float:
    """A pair's judge score: mean of groundedness and relevance (1–5).

    The other three criteria (clarity, informativeness, safety) look at the question
    alone, so they are the same for every candidate of a question and cannot rank them.
    """
    return (judgement.groundedness + judgement.relevance) / 2.0


def _judge_input(question: str, record: PqalRecord) -> JudgeInput:
    # The question is its own "evidence": PubMedQA gives none, and a sentence of the
    # positive abstract would tell the judge which candidate is right.
    q = Question(type=QuestionType.YESNO, question=question, answer_hint=None,
                 evidence=question)
    passage = Passage(str(record.pmid), "", record.abstract)
    article = ArticleInput(
        pmid=str(record.pmid), title="", abstract=record.abstract,
        mesh=tuple(MeshHeading(n) for n in record.mesh_names),
    )
    return JudgeInput(question=q, article=article, contexts=(passage,))


def _aucs(
    pairs: Sequence[Pair], kind: str, questions: set[int] | None = None, *, judged: bool = True
) -> dict[str, Any]:
    """The four AUCs of positives against negatives of ``kind`` (pooled and per question)."""
    pos = [p for p in pairs if p.positive and (questions is None or p.question in questions)]
    neg = [p for p in pairs if p.kind == kind and (questions is None or p.question in questions)]
    signals = SIGNALS if judged else tuple(s for s in SIGNALS if s != "judge")
    out: dict[str, Any] = {f"{s}_auc": None for s in SIGNALS}
    within: dict[str, float | None] = {f"{s}_auc": None for s in SIGNALS}
    neg_by_q: dict[int, list[Pair]] = {}
    for p in neg:
        neg_by_q.setdefault(p.question, []).append(p)
    pos_by_q = {p.question: p for p in pos}
    for s in signals:
        out[f"{s}_auc"] = round(
            roc_auc([getattr(p, s) for p in pos], [getattr(p, s) for p in neg]), 4
        )
        within[f"{s}_auc"] = round(fmean(
            roc_auc([getattr(pos_by_q[q], s)], [getattr(n, s) for n in ns])
            for q, ns in neg_by_q.items()
        ), 4)
    out["within_question"] = within
    out["questions"] = len(pos)
    out["positives"] = len(pos)
    out["negatives"] = len(neg)
    return out


def split_half(pmid: int) -> str:
    """Held-out split: half ``A`` (where grade.py was tuned) or ``B``, by sha256 of the PMID."""
    return "A" if hashlib.sha256(str(pmid).encode()).digest()[0] % 2 == 0 else "B"


@dataclass
class PairSet:
    """The calibration pairs and what was needed to build them (no grader involved)."""

    records: list[PqalRecord]
    headings: dict[int, Headings]
    pairs: list[Pair]
    counts: dict[str, Any]


def build_pairs(
    conn: Connection,
    records: Sequence[PqalRecord],
    *,
    n_random: int = 5,
    n_hard: int = 5,
    seed: int = 0,
    zero_checks: int = 100,
) -> PairSet:
    """Positives, random and hard negatives, each with its retrieval score.

    One exhaustive :func:`retrieve_many` call (``candidate_budget=None``, ``k`` = the corpus
    size) returns each question's whole ranking: every article sharing a lexeme with it,
    with its score, and the positive (passed as the source) in any case. The hard
    negatives are the top ``n_hard`` non-positive hits of the search the pipeline runs
    (default candidate budget). A random negative absent from that ranking shares no
    lexeme with the question, so retrieval gives it 0.0 (``ContextHit``'s contract); up to
    ``zero_checks`` of them are re-scored exactly, as the "source" of a ``k=1`` retrieval,
    and a non-zero score raises, so a change of retrieve.py's scoring cannot silently
    falsify the figures.
    """
    records = list(records)
    if len(records) < max(n_random, n_hard) + 1:
        raise ConfigError(
            f"{len(records)} questions: need more than {max(n_random, n_hard)} "
            "(the negatives per question)"
        )
    all_names = [n for r in records for n in r.mesh_names]
    mapped, unmapped = map_mesh_names(conn, all_names)
    headings = {
        r.pmid: Headings(tuple(dict.fromkeys(mapped[n] for n in r.mesh_names if n in mapped)))
        for r in records
    }
    unmapped_uses = sum(1 for n in all_names if n not in mapped)
    log.info("calibrate: %d of %d distinct MeSH names mapped to UIs (%d unmapped: %d uses)",
             len(set(all_names)) - len(unmapped), len(set(all_names)), len(unmapped),
             unmapped_uses)
    by_pmid = {r.pmid: r for r in records}
    pmids = [r.pmid for r in records]
    rng = random.Random(seed)
    pairs: list[Pair] = []
    random_pairs: list[Pair] = []
    with shadow_corpus(conn, records, headings) as loaded:
        log.info("calibrate: %d abstracts, %d MeSH links in TEMP tables, %d indexed",
                 loaded["articles"], loaded["mesh_links"], loaded["indexed"])
        t0 = time.perf_counter()
        items = [(r.question, r.pmid) for r in records]
        # Scores of every pair: the exhaustive search (no candidate pruning; the scores of
        # the articles both searches return are identical). Hard negatives: what the
        # pipeline's pruned search ranks highest.
        rankings = retrieve_many(conn, items, k=len(records), candidate_budget=None)
        production = retrieve_many(conn, items, k=n_hard + 1)
        log.info("calibrate: %d questions ranked (%d hits) in %.1fs", len(records),
                 sum(map(len, rankings)), time.perf_counter() - t0)
        absent: list[Pair] = []
        for i, (r, hits, top) in enumerate(zip(records, rankings, production, strict=True)):
            stray = [h.pmid for h in hits if h.pmid not in by_pmid]
            if stray:
                raise RuntimeError(
                    f"retrieval returned PMID {stray[0]}, not in the calibration corpus: a "
                    "table retrieve.py reads is not shadowed (retrieve.TABLES)"
                )
            score = {h.pmid: h.score for h in hits}
            pairs.append(Pair(i, r.pmid, True, "positive", score.get(r.pmid, 0.0)))
            others = [h for h in top if not h.is_source][:n_hard]
            pairs.extend(Pair(i, h.pmid, False, "hard", h.score) for h in others)
            drawn = [c for c in rng.sample(pmids, n_random + 1) if c != r.pmid][:n_random]
            for c in drawn:
                pair = Pair(i, c, False, "random", score.get(c, 0.0))
                random_pairs.append(pair)
                if c not in score:
                    absent.append(pair)
        check = absent[:zero_checks]
        if check:
            t0 = time.perf_counter()
            exact = retrieve_many(
                conn, [(records[p.question].question, p.candidate) for p in check], k=1
            )
            for p, hits in zip(check, exact, strict=True):
                s = next((h.score for h in hits if h.is_source), None)
                if s != 0.0:
                    raise RuntimeError(
                        f"PMID {p.candidate} is not in question {p.question}'s ranking but "
                        f"retrieval scores it {s}: retrieve.py's contract changed"
                    )
            log.info("calibrate: %d unranked random negatives re-scored exactly (all 0) in "
                     "%.1fs", len(check), time.perf_counter() - t0)
    pairs.extend(random_pairs)
    counts = {
        "questions": len(records),
        "mesh_names": len(set(all_names)),
        "mesh_names_unmapped": len(unmapped),
        "mesh_name_uses": len(all_names),
        "mesh_name_uses_unmapped": unmapped_uses,
        "unmapped_names": unmapped,
        "random_negatives_unranked": len(absent),
        "random_negatives_rescored": len(check),
        "positives_unranked": sum(1 for p in pairs if p.positive and p.retrieval == 0.0),
    }
    return PairSet(records, headings, pairs, counts)


def score_hierarchy(grader: MeshGrader, pairset: PairSet) -> int:
    """Fill in each pair's hierarchy and blend scores; returns questions without MeSH."""
    q_uis = [grader.question_uis(r.question) for r in pairset.records]
    by_question: dict[int, list[Pair]] = {}
    for p in pairset.pairs:
        by_question.setdefault(p.question, []).append(p)
    for question, pairs in by_question.items():  # one similarity table per question
        table = grader.table(q_uis[question], None,
                             [pairset.headings[p.candidate] for p in pairs])
        for p in pairs:
            p.hierarchy, p.blend = grader.context_score(
                q_uis[question], pairset.headings[p.candidate], p.retrieval, table
            )
    return sum(1 for u in q_uis if not u)


def score_judge(backend: LLMBackend, pairset: PairSet) -> int:
    """Fill in each pair's judge score; returns the failed calls (scored 0)."""
    by_pmid = {r.pmid: r for r in pairset.records}
    requests = [
        judge_request(_judge_input(pairset.records[p.question].question, by_pmid[p.candidate]))
        for p in pairset.pairs
    ]
    results = aio.run(complete_all(backend, requests))
    failed = 0
    for pair, result in zip(pairset.pairs, results, strict=True):
        if result.output is None:
            failed += 1
            pair.judge = 0.0  # below every valid score (1–5): a failure never helps a pair
        else:
            pair.judge = judge_score(result.output)
    return failed


def summarize(pairset: PairSet, judged: bool = True) -> dict[str, Any]:
    """``{"random": {...}, "hard": {...}, "split": {"A": ..., "B": ...}}`` of AUCs."""
    out: dict[str, Any] = {kind: _aucs(pairset.pairs, kind, judged=judged)
                           for kind in ("random", "hard")}
    halves = {h: {i for i, r in enumerate(pairset.records) if split_half(r.pmid) == h}
              for h in "AB"}
    out["split"] = {
        h: {kind: _aucs(pairset.pairs, kind, qs, judged=judged) for kind in ("random", "hard")}
        for h, qs in halves.items() if qs
    }
    return out


def calibrate(
    conn: Connection,
    records: Sequence[PqalRecord],
    *,
    n_random: int = 5,
    n_hard: int = 5,
    seed: int = 0,
    blend_weight: float | None = None,
    backend: LLMBackend | None = None,
    judge: bool = True,
    grader: MeshGrader | None = None,
) -> dict[str, Any]:
    """AUCs of the four signals on random and hard negatives; see the module docstring.

    ``conn`` must be in a transaction on a database with MeSH loaded; it is left as it
    was (the TEMP tables are dropped). ``backend`` is the judge (default: the offline
    heuristic); ``judge=False`` skips judging (``judge_auc`` is then ``None``).
    """
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    if grader is None:
        grader = MeshGrader.from_db(conn)
    if not len(grader.index):
        raise ConfigError("no MeSH tree numbers with a descriptor UI in the database: "
                          "load MeSH first (meshdistill mesh load)")
    if blend_weight is not None:
        if not 0.0 <= blend_weight <= 1.0:
            raise ConfigError(f"blend weight must be in [0, 1], got {blend_weight}")
        grader = grader.with_blend_weight(blend_weight)
    log.info("calibrate: MeSH grader built in %.1fs", time.perf_counter() - t0)
    pairset = build_pairs(conn, records, n_random=n_random, n_hard=n_hard, seed=seed)
    t0 = time.perf_counter()
    without_mesh = score_hierarchy(grader, pairset)
    log.info("calibrate: hierarchy scores of %d pairs in %.1fs (%d questions name no MeSH "
             "descriptor)", len(pairset.pairs), time.perf_counter() - t0, without_mesh)
    judge_failed = 0
    backend = backend or OfflineBackend()
    if judge:
        t0 = time.perf_counter()
        judge_failed = score_judge(backend, pairset)
        log.info("calibrate: judged %d pairs with %s/%s in %.1fs (%d failed)",
                 len(pairset.pairs), backend.name, backend.model, time.perf_counter() - t0,
                 judge_failed)
    result = summarize(pairset, judged=judge)
    result["params"] = {
        "n_random": n_random,
        "n_hard": n_hard,
        "seed": seed,
        "blend_weight": grader.blend_weight,
        "judge": f"{backend.name}/{backend.model}" if judge else None,
        "judge_score": "mean(groundedness, relevance) of the question against the candidate",
        "auc": "pooled over all questions; within_question: mean of per-question AUCs",
        "title": "empty (PubMedQA-L has no titles)",
        "abstract": "CONTEXTS sections joined (no conclusion, as in PubMedQA)",
        "split": "A/B by sha256(PMID); grade.py was tuned on A only",
    }
    result["counts"] = pairset.counts | {
        "questions_without_mesh": without_mesh,
        "judge_failed": judge_failed,
    }
    result["targets"] = targets(result)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The two calibration targets, on pooled AUCs: met or not, with the figures."""
    h = result["random"]["hierarchy_auc"]
    b, r = result["hard"]["blend_auc"], result["hard"]["retrieval_auc"]
    return {
        "hierarchy_random_at_least": HIERARCHY_TARGET,
        "hierarchy_random_met": h >= HIERARCHY_TARGET,
        "blend_beats_retrieval_hard_met": b > r,
    }


def verdict(result: dict[str, Any]) -> list[str]:
    """Plain sentences on the two targets, with the figures."""
    t = targets(result)
    h = result["random"]["hierarchy_auc"]
    b, r = result["hard"]["blend_auc"], result["hard"]["retrieval_auc"]
    lines = [
        f"target 1 {'met' if t['hierarchy_random_met'] else 'NOT MET'}: hierarchy AUC on "
        f"random negatives {h:.3f} {'>=' if t['hierarchy_random_met'] else '<'} "
        f"{HIERARCHY_TARGET}",
        f"target 2 {'met' if t['blend_beats_retrieval_hard_met'] else 'NOT MET'}: blend AUC "
        f"on hard negatives {b:.3f} {'>' if b > r else '<='} retrieval alone {r:.3f}",
    ]
    return lines
