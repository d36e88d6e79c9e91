"""Distill one MeSH subtree: generate → retrieve → grade → judge → answer, per article.

Up to ``articles_in_flight`` articles move through the stages independently, one
coroutine each, rather than one stage at a time over a batch: a stage barrier would leave
the LLM idle while a batch's slowest calls finish, so here the backend's concurrency cap
(32 requests by default), not this module, bounds what is in flight. Retrieval and reads
are synchronous SQL in worker threads, ``retrievals_in_flight`` full-text statements at a
time. Results are committed every ``flush_every`` finished articles, so a task that dies
or stops on its budget keeps what it finished; a rerun finds its LLM answers in the
``llm_call`` cache and its rows by natural key. Every candidate ends in exactly one
terminal state, and the summary's counts are checked against the stored rows before it
returns (a mismatch is an error). Why: docs/llm.md and docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from meshdistill.aio import gc_frozen
from meshdistill.distill.candidates import (
    STAGES,
    Candidate,
    ContextChoice,
    answer_problems,
    choose_contexts,
    evidence_in,
    preference_pairs,
    reason_keys,
)
from meshdistill.distill.corpus import ArticleRecord, load_articles, select_sources
from meshdistill.distill.grade import MeshGrader
from meshdistill.distill.items import ArticleOutcome, RunIdentity, state_counts, write_outcomes
from meshdistill.distill.retrieve import refresh_index, retrieve_many
from meshdistill.distill.settings import DistillSettings
from meshdistill.llm.backend import LLMBackend, complete_all
from meshdistill.llm.backend import start as start_backend
from meshdistill.llm.inputs import AnswerInput, ArticleInput, GenerateInput, JudgeInput
from meshdistill.llm.stages import answer_request, generate_request, judge_request
from meshdistill.mesh.subtree import get_subtree, subtree_descriptor_uis

if TYPE_CHECKING:
    from meshdistill.llm.embeddings import OpenAIEmbedder

log = logging.getLogger(__name__)

@dataclass
class RunStats:
    """Per-stage and per-state counts of one subtree run."""

    articles: int = 0
    stages: Counter[str] = field(default_factory=Counter)  # candidates entering each stage
    states: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    pairs: int = 0

    def add(self, outcome: ArticleOutcome) -> None:
        self.articles += 1
        self.pairs += len(outcome.pairs)
        for c in outcome.candidates:
            assert c.state is not None
            self.states[c.state] += 1
            if c.state in ("rejected", "failed"):
                self.reasons.update(reason_keys(c.stage, c.reason))

    @property
    def candidates(self) -> int:
        return sum(self.states.values())


class SubtreeDistiller:
    """One run over one subtree with one backend; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        subtree: str,
        backend: LLMBackend,
        settings: DistillSettings,
        run_id: str,
        grader: MeshGrader | None = None,
    ) -> None:
        self.engine = engine
        self.subtree = subtree
        self.backend = backend
        self.settings = settings
        self.run_id = run_id
        self._grader = grader
        self.articles: dict[int, ArticleRecord] = {}
        self._embedder: OpenAIEmbedder | None = None
        self._retrieval_gate = asyncio.Semaphore(settings.retrievals_in_flight)
        self.stats = RunStats()
        self.label = subtree  # "C04 [worker 1/2]" in a multi-process run's workers
        self.ident = RunIdentity(subtree, backend.model, backend.name, run_id,
                                 settings.item_params())

    # -- database (worker threads) ------------------------------------------------------

    def prepare(self, given: Sequence[int] | None = None, *, grade: bool = True) -> list[int]:
        """Subtree facts, the grader and the embedder; the source selection (after the
        index refresh) unless ``given`` (a worker of a multi-process run gets its share).
        ``grade=False``: selection only (the parent of a multi-process run grades nothing).
        """
        with self.engine.begin() as conn:
            info = get_subtree(conn, self.subtree)
            uis = subtree_descriptor_uis(conn, self.subtree)
            refreshed = refresh_index(conn) if given is None else None
            if self._grader is None and grade:
                self._grader = MeshGrader.for_release(
                    conn, blend_weight=self.settings.blend_weight)
            pmids = list(given) if given is not None else select_sources(
                conn, self.subtree, uis, self.backend.model, self.run_id,
                self.settings.max_articles, redo=self.settings.redo)
        self._ancestry = [*info.ancestry, info.name or self.subtree]
        self._scope_note = info.scope_note
        self._uis = uis if self.settings.contexts_in_subtree else None
        if refreshed is not None:
            log.info("%s (%s): %d source articles to distill; retrieval index +%d/-%d",
                     self.subtree, info.name, len(pmids), refreshed["added"],
                     refreshed["removed"])
        else:
            log.info("%s: %d source articles to distill", self.label, len(pmids))
        if self.settings.retrieval == "vector":
            from meshdistill.distill.embedding_index import refresh_embeddings
            from meshdistill.llm.embeddings import OpenAIEmbedder

            if given is None:
                embedder = OpenAIEmbedder()  # endpoint and model from the environment
                try:
                    with self.engine.connect() as conn:  # commits per batch: paid work survives
                        embedded = refresh_embeddings(conn, embedder)
                except BaseException:
                    embedder.close()
                    raise
                log.info("%s: embeddings +%d/-%d", self.subtree, embedded["added"],
                         embedded["removed"])
                if grade:
                    self._embedder = embedder
                else:
                    embedder.close()
            elif grade:
                self._embedder = OpenAIEmbedder()
        return pmids

    def read_articles(self, pmids: Sequence[int]) -> dict[int, ArticleRecord]:
        """The records of ``pmids`` (read once, then kept in :attr:`articles`); PMIDs
        that no longer exist are left out."""
        missing = [p for p in pmids if p not in self.articles]
        if missing:
            with self.engine.connect() as conn:
                self.articles.update(load_articles(conn, missing))
        return {p: self.articles[p] for p in pmids if p in self.articles}

    def retrieve(self, items: list[tuple[str, int]]) -> list[list[Any]]:
        """Context hits for each ``(question, source PMID)``, their articles read."""
        with self.engine.connect() as conn:
            if self._embedder is not None:
                from meshdistill.distill.vector import retrieve_vector_many

                hits = retrieve_vector_many(conn, items, self.settings.k_retrieve,
                                            embedder=self._embedder, subtree_uis=self._uis)
            else:
                hits = retrieve_many(conn, items, self.settings.k_retrieve,
                                     subtree_uis=self._uis)
        self.read_articles([h.pmid for group in hits for h in group])
        return hits

    def flush(self, outcomes: list[ArticleOutcome]) -> None:
        """Write finished articles' candidates and pairs in one transaction."""
        with self.engine.begin() as conn:
            write_outcomes(conn, self.ident, outcomes)

    # -- one article --------------------------------------------------------------------

    @property
    def grader(self) -> MeshGrader:
        assert self._grader is not None, "prepare() first"
        return self._grader

    async def distill_article(self, record: ArticleRecord) -> ArticleOutcome:
        """One source article through every stage; each candidate ends in one state."""
        s = self.settings
        article = record.as_input(self._ancestry, self._scope_note)
        generated = await complete_all(self.backend, [
            generate_request(GenerateInput(article, profile, s.questions_per_article,
                                           s.question_types))
            for profile in s.profiles
        ])
        candidates: list[Candidate] = []
        self.stats.stages["generate"] += len(s.profiles)
        for profile, result in zip(s.profiles, generated, strict=True):
            slot = Candidate(profile, 0)
            if not slot.end_unless_ok("generate", result):
                candidates.append(slot)
                continue
            assert result.output is not None
            for ordinal, question in enumerate(result.output.questions):
                c = Candidate(profile, ordinal, question,
                              prompt_versions=dict(slot.prompt_versions),
                              llm_params=dict(slot.llm_params))
                if not evidence_in(question.evidence, record.normalized_text, normalized=True):
                    c.end("rejected", "generate", reason="evidence not found in the source")
                candidates.append(c)
        live = [c for c in candidates if c.live]
        if live:
            await self._retrieve_and_grade(record, live)
        await self._judge(article, [c for c in candidates if c.live])
        await self._answer(article, [c for c in candidates if c.live])
        return ArticleOutcome(record.pmid, candidates, preference_pairs(
            candidates, s.profiles, s.preference_margin))

    async def _retrieve_and_grade(self, record: ArticleRecord, live: list[Candidate]) -> None:
        s, grader = self.settings, self.grader
        self.stats.stages["retrieve"] += len(live)
        # Full-text ranking is bounded: a burst of articles reaching this step together
        # (they start together) would otherwise run one ranking statement per worker
        # thread, and PostgreSQL would take both cores of the bench machine from the LLM
        # client for a while: replies then wait to be read, and the request rate drops
        # (measured). Vector retrieval is not: it mostly waits for the embeddings endpoint.
        gate = self._retrieval_gate if self._embedder is None else contextlib.nullcontext()
        async with gate:
            hits = await asyncio.to_thread(
                self.retrieve, [(c.question.question, record.pmid) for c in live if c.question])
        source = record.mesh
        graded = []
        for c, group in zip(live, hits, strict=True):
            c.stage = "retrieve"
            if not any(h.is_source for h in group):
                c.end("rejected", "retrieve", reason="source article is no longer retrievable")
                continue
            assert c.question is not None
            found = [(h, ctx) for h in group if (ctx := self.articles.get(h.pmid))]
            graded.append((c, grader.question_uis(c.question.question), found))
        # One similarity table for the article: its questions share the source and most of
        # their contexts, so one matrix over the union costs less than one per question
        # (every similarity is computed on its own, so each value is the same either way).
        table = grader.table([u for _, q_uis, _ in graded for u in q_uis], source,
                             [ctx.mesh for _, _, found in graded for _, ctx in found])
        for c, q_uis, found in graded:
            self.stats.stages["grade"] += 1
            c.stage = "grade"
            c.question_mesh = q_uis
            ranking_uis = q_uis or list(source.uis)  # the source's topic stands in
            scores = grader.context_scores(ranking_uis, [ctx.mesh for _, ctx in found],
                                           [h.score for h, _ in found], table)
            chosen = choose_contexts(
                [ContextChoice(h.pmid, h.rank, h.score, hierarchy, blended, h.is_source)
                 for (h, _), (hierarchy, blended) in zip(found, scores, strict=True)],
                s.k_contexts)
            c.contexts = chosen
            others = [self.articles[x.pmid].mesh for x in chosen if not x.is_source]
            c.hierarchy_score = grader.item_score(source, others, q_uis, table)
            c.retrieval_score = sum(x.retrieval for x in chosen) / len(chosen)
            c.blend_score = sum(x.blend for x in chosen) / len(chosen)
            if c.hierarchy_score < s.min_hierarchy:
                c.end("rejected", "grade", reason=(
                    f"hierarchy {c.hierarchy_score:.3f} < {s.min_hierarchy}"))
            # Let the loop run between questions: replies that have arrived release
            # their concurrency slots now rather than after the whole article's grading.
            await asyncio.sleep(0)

    async def _judge(self, article: ArticleInput, live: list[Candidate]) -> None:
        if not live:
            return
        self.stats.stages["judge"] += len(live)
        results = await complete_all(self.backend, [
            judge_request(JudgeInput(c.question, article, self._passages(c)))
            for c in live if c.question
        ])
        for c, result in zip(live, results, strict=True):
            if not c.end_unless_ok("judge", result):
                continue
            assert result.output is not None
            c.judgement = result.output.model_dump(mode="json")
            problems = self.settings.thresholds.failures(c.judgement)
            if problems:
                c.end("rejected", "judge", reason="; ".join(problems))

    async def _answer(self, article: ArticleInput, live: list[Candidate]) -> None:
        if not live:
            return
        self.stats.stages["answer"] += len(live)
        results = await complete_all(self.backend, [
            answer_request(AnswerInput(c.question, self._passages(c), article))
            for c in live if c.question
        ])
        for c, result in zip(live, results, strict=True):
            if not c.end_unless_ok("answer", result):
                continue
            assert result.output is not None and c.question is not None
            c.answer = result.output
            texts = {x.pmid: self.articles[x.pmid].normalized_text for x in c.contexts}
            problems = answer_problems(result.output, c.question, texts, normalized=True)
            if problems:
                c.end("rejected", "answer", reason="; ".join(problems))
            else:
                c.end("accepted", "answer")

    def _passages(self, c: Candidate) -> tuple[Any, ...]:
        return tuple(self.articles[x.pmid].passage() for x in c.contexts)

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Select, distill, flush and reconcile (one process)."""
        started = time.perf_counter()
        pmids = await self._prepared()
        with gc_frozen():  # the grader's tables, the modules: see gc_frozen
            read = await self._process(pmids, started)
        result = self.summary(read, time.perf_counter() - started)
        self.log_progress(len(read), started, final=True)
        return result

    async def run_pmids(self, pmids: Sequence[int]) -> list[int]:
        """Distill and flush exactly these source articles, without selecting or
        reconciling (a worker of :func:`distill_subtree_processes`); the articles read."""
        started = time.perf_counter()
        await self._prepared(pmids)
        with gc_frozen():  # the grader's tables, the modules: see gc_frozen
            read = await self._process(pmids, started)
        self.log_progress(len(read), started, final=True)
        return read

    async def _prepared(self, given: Sequence[int] | None = None) -> list[int]:
        """:meth:`prepare` in a worker thread while the backend sets itself up (the
        client process's start-up overlaps the index refresh and the grader build)."""
        starting = asyncio.ensure_future(start_backend(self.backend))
        try:
            return await asyncio.to_thread(self.prepare, given)
        finally:
            await starting

    async def _process(self, pmids: Sequence[int], started: float) -> list[int]:
        """The stages over ``pmids``, ``articles_in_flight`` at a time, flushed every
        ``flush_every``; returns the articles actually read (the rest vanished)."""
        try:
            records = await asyncio.to_thread(self.read_articles, pmids)
            gone = [p for p in pmids if p not in records]
            if gone:  # deleted between the selection and the read; nothing to distill
                log.warning("%s: %d selected articles vanished before reading", self.label,
                            len(gone))
            gate = asyncio.Semaphore(self.settings.articles_in_flight)
            pending: list[ArticleOutcome] = []

            async def one(record: ArticleRecord) -> ArticleOutcome:
                async with gate:
                    return await self.distill_article(record)

            tasks = [asyncio.ensure_future(one(records[p])) for p in pmids if p in records]
            try:
                for next_done in asyncio.as_completed(tasks):
                    outcome = await next_done
                    self.stats.add(outcome)
                    pending.append(outcome)
                    if len(pending) >= self.settings.flush_every:
                        await asyncio.to_thread(self.flush, pending)
                        pending = []
                        self.log_progress(len(tasks), started)
                if pending:
                    await asyncio.to_thread(self.flush, pending)
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise
        finally:
            if self._embedder is not None:
                self._embedder.close()
        return list(records)

    def log_progress(self, total: int, started: float, final: bool = False) -> None:
        elapsed = max(time.perf_counter() - started, 1e-9)
        st = self.stats.states
        log.info(
            "%s: %s%d/%d articles, %d candidates (accepted %d, rejected %d, failed %d, "
            "deferred %d), %.1f articles/s, %.1f candidates/s",
            self.label, "done: " if final else "", self.stats.articles, total,
            self.stats.candidates, st["accepted"], st["rejected"], st["failed"],
            st["deferred"], self.stats.articles / elapsed, self.stats.candidates / elapsed)
        if final:
            stages = self.stats.stages
            log.info("%s: candidates entering each stage: %s", self.label,
                     ", ".join(f"{k} {stages[k]}" for k in STAGES if k in stages))
            if self.stats.reasons:
                log.info("%s: rejected/failed by reason: %s", self.label, "; ".join(
                    f"{k} {n}" for k, n in self.stats.reasons.most_common()))

    def summary(self, pmids: list[int], seconds: float, *,
                 llm: dict[str, Any] | None = None,
                 budget: dict[str, Any] | None = None) -> dict[str, Any]:
        with self.engine.connect() as conn:
            stored = state_counts(conn, self.subtree, self.backend.model, pmids)
        counted = {k: self.stats.states[k] for k in stored}
        if stored != counted:
            raise RuntimeError(
                f"{self.subtree}: counts do not reconcile: stored {stored}, counted {counted}")
        stats = llm if llm is not None else getattr(self.backend, "stats", None)
        summary: dict[str, Any] = {
            "subtree": self.subtree, "run_id": self.run_id, "backend": self.backend.name,
            "model": self.backend.model, "articles": self.stats.articles,
            "candidates": self.stats.candidates, **counted,
            "preference_pairs": self.stats.pairs,
            "stages": dict(self.stats.stages), "reasons": dict(self.stats.reasons),
            "seconds": round(seconds, 2),
            "candidates_per_s": round(self.stats.candidates / seconds, 1) if seconds else None,
            "reconciled": True,
        }
        if isinstance(stats, dict):
            summary["llm"] = dict(stats)
        if budget is None:
            own = getattr(self.backend, "budget", None)
            budget = own.snapshot() if own is not None else None
        if budget is not None:
            summary["budget"] = budget
        return summary


async def distill_subtree_async(engine: Engine, subtree: str, backend: LLMBackend,
                                settings: DistillSettings, run_id: str,
                                grader: MeshGrader | None = None) -> dict[str, Any]:
    """Run one subtree (see :class:`SubtreeDistiller`); the summary is JSON-serialisable."""
    return await SubtreeDistiller(engine, subtree, backend, settings, run_id, grader).run()
