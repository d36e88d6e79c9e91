"""One candidate's way through the stages, and the checks that end it.

A :class:`Candidate` is one question of one generator profile about one source article
(or, when generation produced nothing, the empty slot standing for it). Each stage either
moves it on or ends it with :meth:`Candidate.end`; :data:`TERMINAL` are the only states a
stored row can have, and ``end`` refuses to end a candidate twice, so "exactly one
terminal state" is enforced where it happens, not audited afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from meshdistill.llm.backend import LLMResult
from meshdistill.llm.budget import DEFERRED_REASON, is_deferred
from meshdistill.llm.schemas import Answer, Question, QuestionType

TERMINAL = ("accepted", "rejected", "failed", "deferred")
STAGES = ("generate", "retrieve", "grade", "judge", "answer")

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed: how quoted evidence is compared with its source
    (a model may re-wrap lines or change case at a sentence start; it may not reword)."""
    return _SPACE.sub(" ", text).strip().lower()


@dataclass(frozen=True)
class ContextChoice:
    """A retrieved candidate context of one question, with its three scores."""

    pmid: int
    rank: int
    retrieval: float
    hierarchy: float
    blend: float
    is_source: bool

    def as_json(self) -> dict[str, Any]:
        return {"pmid": self.pmid, "rank": self.rank, "retrieval": round(self.retrieval, 6),
                "hierarchy": round(self.hierarchy, 6), "blend": round(self.blend, 6),
                "is_source": self.is_source}


@dataclass
class Candidate:
    """The row being built for one candidate; ``state`` is None until it ends."""

    profile: str
    ordinal: int
    question: Question | None = None
    question_mesh: list[str] = field(default_factory=list)
    contexts: list[ContextChoice] = field(default_factory=list)
    retrieval_score: float | None = None
    hierarchy_score: float | None = None
    blend_score: float | None = None
    judgement: dict[str, Any] | None = None
    answer: Answer | None = None
    prompt_versions: dict[str, str] = field(default_factory=dict)
    llm_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage
    stage: str = "generate"
    state: str | None = None
    reason: str | None = None
    error: str | None = None

    @property
    def live(self) -> bool:
        return self.state is None

    def end(self, state: str, stage: str, reason: str | None = None,
            error: str | None = None) -> None:
        if self.state is not None:
            raise RuntimeError(f"candidate {self.profile}/{self.ordinal} already {self.state}")
        if state not in TERMINAL or stage not in STAGES:
            raise ValueError(f"bad terminal state {state!r} at stage {stage!r}")
        self.state, self.stage, self.reason, self.error = state, stage, reason, error

    def end_unless_ok(self, stage: str, result: LLMResult[Any]) -> bool:
        """Record prompt version and parameters; end as deferred/failed on no output.

        True when the result has output and the candidate goes on.
        """
        self.prompt_versions[stage] = result.prompt_version
        self.llm_params[stage] = dict(result.params)
        self.stage = stage
        if is_deferred(result):
            self.end("deferred", stage, reason=DEFERRED_REASON)
            return False
        if not result.ok:
            kind = result.failure.value if result.failure else "error"
            self.end("failed", stage, reason=kind, error=f"{kind}: {result.error or ''}"[:2000])
            return False
        return True


_REASON_HEAD = re.compile(r"\s*(?:[0-9.]+\s*<.*|:.*)$")


def reason_keys(stage: str, reason: str | None) -> list[str]:
    """One ``"stage: what"`` per part of a rejection or failure reason, its figures
    dropped (``"judge: clarity"`` for ``"clarity 2 < 3"``): what runs count by."""
    return [f"{stage}: {_REASON_HEAD.sub('', part)}" for part in (reason or "").split("; ")]


def evidence_in(evidence: str, text: str, *, normalized: bool = False) -> bool:
    """True when ``evidence`` occurs in ``text`` up to case and whitespace.

    ``normalized``: ``text`` is already ``normalize``d (the pipeline normalizes each
    article once and reuses it; re-normalizing whole abstracts on every check was a
    measurable share of a request's CPU). Same answer either way: ``normalize`` is
    idempotent.
    """
    return normalize(evidence) in (text if normalized else normalize(text))


def answer_problems(answer: Answer, question: Question, contexts: dict[int, str], *,
                    normalized: bool = False) -> list[str]:
    """Why an answer is not grounded in its contexts (empty when it is).

    Cited PMIDs must be among the contexts given, at least one must be cited, every
    evidence sentence must occur in a context, and ``yesno`` needs a yes/no/maybe label.
    ``normalized``: the context texts are already ``normalize``d; the non-empty ones are
    then joined with a single space, which is exactly what normalizing the space-joined
    raw texts gives.
    """
    problems: list[str] = []
    cited = [int(p) for p in answer.cited_pmids]
    if not cited:
        problems.append("answer cites no PMID")
    unknown = [p for p in cited if p not in contexts]
    if unknown:
        problems.append(f"answer cites PMIDs not among its contexts: {unknown[:5]}")
    if not answer.evidence:
        problems.append("answer gives no evidence sentence")
    if normalized:
        joined = " ".join(t for t in contexts.values() if t)
    else:
        joined = normalize(" ".join(contexts.values()))
    missing = [e for e in answer.evidence if not evidence_in(e, joined, normalized=True)]
    if missing:
        problems.append(f"{len(missing)} evidence sentence(s) not found in the contexts")
    if question.type is QuestionType.YESNO and answer.label is None:
        problems.append("yesno answer without a yes/no/maybe label")
    return problems


def choose_contexts(scored: Sequence[ContextChoice], k: int) -> list[ContextChoice]:
    """The ``k`` best contexts by blended score (ties: better retrieval rank), the source
    always among them: it replaces the last one when the blend ranks it lower."""
    ranked = sorted(scored, key=lambda x: (-x.blend, x.rank))
    chosen = ranked[:k]
    if not any(x.is_source for x in chosen):
        chosen = [*chosen[: k - 1], next(x for x in ranked if x.is_source)]
    return chosen


class PreferencePair(NamedTuple):
    """Two profiles' candidates at one ordinal: the chosen one scores higher."""

    ordinal: int
    chosen: str  # profile
    rejected: str
    chosen_score: float
    rejected_score: float


def preference_pairs(candidates: Sequence[Candidate], profiles: Sequence[str],
                     margin: float) -> list[PreferencePair]:
    """Pairs of the two profiles' graded candidates at the same ordinal.

    The one with the higher hierarchy score is chosen (the first profile on a tie); a
    pair is kept when the chosen one is accepted and wins by at least ``margin``. With
    other than two profiles there are no pairs.
    """
    if len(profiles) != 2:
        return []
    first, second = profiles
    graded = {(c.profile, c.ordinal): c for c in candidates
              if c.question is not None and c.hierarchy_score is not None}
    pairs: list[PreferencePair] = []
    for (profile, ordinal), a in graded.items():
        b = graded.get((second, ordinal))
        if profile != first or b is None:
            continue
        chosen, rejected = (a, b) if _hierarchy(a) >= _hierarchy(b) else (b, a)
        high, low = _hierarchy(chosen), _hierarchy(rejected)
        if chosen.state == "accepted" and high - low >= margin:
            pairs.append(PreferencePair(ordinal, chosen.profile, rejected.profile, high, low))
    return pairs


def _hierarchy(c: Candidate) -> float:
    assert c.hierarchy_score is not None
    return c.hierarchy_score
