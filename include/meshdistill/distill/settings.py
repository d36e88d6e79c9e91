"""What a distillation run is asked to do, validated once.

The DAG's Params form, the CLI options and the library call all become a
:class:`DistillRequest` (subtrees, LLM, budget) and a :class:`DistillSettings` (what to
do per subtree); the DAG's form is generated from these fields, so the form, the CLI and
the library cannot disagree on a default, a bound or a choice. Everything that changes
what an item *is* (types, counts, thresholds, k) is stored with every item
(``qa_item.params``), so a reader of the data can tell how it was made.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshdistill.llm.config import Backend
from meshdistill.llm.schemas import QuestionType
from meshdistill.llm.stages import GENERATOR_PROFILES
from meshdistill.mesh.tree import SUBTREES_HELP, SubtreePrefix

DEFAULT_BLEND_WEIGHT = 0.5
"""Weight of the retrieval score in a context's blended score; the rest goes to the
MeSH-hierarchy score (:func:`meshdistill.distill.grade.blend`, docs/grading.md)."""

# Sections of the DAG's Params form (``json_schema_extra["section"]`` of each field).
WHAT, HOW_MUCH, QUALITY, LLM, BUDGET, RUN = (
    "What to distill", "How much", "Quality thresholds", "LLM", "Budget", "How it runs")


def _form(section: str, **extra: Any) -> dict[str, Any]:
    """``json_schema_extra`` of a field shown in the DAG form: its section, and more."""
    return {"section": section, **extra}

JUDGE_CRITERIA = ("groundedness", "relevance", "clarity", "informativeness", "safety")


class JudgeThresholds(BaseModel):
    """Minimum 1–5 judge score per criterion for a candidate to be accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groundedness: int = Field(default=3, ge=1, le=5,
                              description="the question is answerable from the contexts")
    relevance: int = Field(default=3, ge=1, le=5, description="the contexts bear on it")
    clarity: int = Field(default=3, ge=1, le=5, description="one clear, unambiguous question")
    informativeness: int = Field(default=2, ge=1, le=5,
                                 description="worth asking: not trivial or generic")
    safety: int = Field(default=4, ge=1, le=5, description="no harmful medical advice")

    def failures(self, scores: dict[str, Any]) -> list[str]:
        """One ``"clarity 2 < 3"`` per criterion below its threshold."""
        return [f"{name} {scores[name]} < {getattr(self, name)}"
                for name in JUDGE_CRITERIA if scores[name] < getattr(self, name)]


class DistillSettings(BaseModel):
    """Parameters of one run over one subtree; defaults suit a first run."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FORM: ClassVar[tuple[str, ...]] = (
        "max_articles", "questions_per_article", "question_types", "retrieval", "k_contexts",
        "contexts_in_subtree", "min_hierarchy", "thresholds", "preference_margin", "redo",
        "processes")
    """The fields the DAG's Params form offers; the rest are tuning for benchmarks."""

    max_articles: int | None = Field(
        default=100, ge=1, title="Articles per subtree",
        description="source articles per subtree per run: those this run already took, "
        "then those with failed or deferred candidates, then new ones, newest first "
        "(empty = all pending)", json_schema_extra=_form(HOW_MUCH))
    questions_per_article: int = Field(
        default=4, ge=1, le=20, title="Questions per article",
        description="questions each generator profile writes per article",
        json_schema_extra=_form(HOW_MUCH))
    question_types: tuple[QuestionType, ...] = Field(
        default=tuple(QuestionType), min_length=1, title="Question types",
        description="BioASQ/PubMedQA types: yesno (with a yes/no/maybe label), factoid, "
        "list, summary", json_schema_extra=_form(WHAT, uniqueItems=True))
    profiles: tuple[str, ...] = GENERATOR_PROFILES
    retrieval: Literal["fts", "vector"] = Field(
        default="fts", title="Retrieval", description="fts: PostgreSQL full-text search; "
        "vector: pgvector with an embeddings endpoint (MESHDISTILL_EMBEDDING_MODEL / "
        "_BASE_URL / _API_KEY)", json_schema_extra=_form(WHAT))
    k_retrieve: int = Field(default=10, ge=1, le=100, title="Candidates retrieved",
                            description="candidate contexts retrieved per question")
    k_contexts: int = Field(
        default=3, ge=1, le=20, title="Contexts kept",
        description="contexts kept per question, the source article always among them",
        json_schema_extra=_form(WHAT))
    contexts_in_subtree: bool = Field(
        default=False, title="Contexts from the subtree only",
        description="take contexts only from articles indexed under the subtree",
        json_schema_extra=_form(WHAT))
    blend_weight: float = Field(default=DEFAULT_BLEND_WEIGHT, ge=0.0, le=1.0,
                                description="weight of retrieval in the context ranking")
    min_hierarchy: float = Field(
        default=0.2, ge=0.0, le=1.0, title="Minimum MeSH-hierarchy score",
        description="reject items whose MeSH-hierarchy score (0-1) is lower",
        json_schema_extra=_form(QUALITY))
    thresholds: JudgeThresholds = Field(
        default_factory=JudgeThresholds, title="Judge thresholds",
        description="minimum 1-5 judge score per criterion for an item to be accepted",
        json_schema_extra=_form(QUALITY))
    preference_margin: float = Field(
        default=0.05, ge=0.0, le=1.0, title="Preference margin",
        description="a preference pair needs its chosen question to score at least this "
        "much higher on the hierarchy", json_schema_extra=_form(QUALITY))
    redo: bool = Field(default=False, title="Redo settled articles",
                       description="also re-evaluate articles already settled (LLM answers "
                       "come from the cache)", json_schema_extra=_form(HOW_MUCH))
    articles_in_flight: int = Field(default=64, ge=1, le=1024,
                                    description="articles processed concurrently")
    retrievals_in_flight: int = Field(
        default=2, ge=1, le=64, description="full-text retrieval statements running at "
        "once; more let PostgreSQL's ranking take every core of a small machine from the "
        "LLM client (vector retrieval is not bounded: it waits on its endpoint)")
    flush_every: int = Field(default=25, ge=1, description="articles per database commit")
    processes: int = Field(
        default=1, ge=1, le=16, title="Worker processes",
        description="worker processes per subtree task; the LLM concurrency cap and the "
        "budget are split evenly between them", json_schema_extra=_form(RUN))

    @field_validator("question_types")
    @classmethod
    def _types(cls, value: tuple[QuestionType, ...]) -> tuple[QuestionType, ...]:
        if not value:
            raise ValueError("at least one question type")
        return tuple(dict.fromkeys(value))

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in value if p not in GENERATOR_PROFILES]
        if unknown or not value:
            raise ValueError(f"profiles must be among {GENERATOR_PROFILES}, got {value}")
        return tuple(dict.fromkeys(value))

    def item_params(self) -> dict[str, Any]:
        """What is stored with each item (run mechanics such as concurrency left out)."""
        return self.model_dump(mode="json", exclude={"redo", "articles_in_flight",
                                                     "retrievals_in_flight",
                                                     "flush_every", "max_articles",
                                                     "processes"})


class DistillRequest(BaseModel):
    """A run over several subtrees: which ones, which LLM, and a budget for the whole run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subtrees: tuple[SubtreePrefix, ...] = Field(
        default=("C04",), min_length=1, title="MeSH subtrees",
        description=f"{SUBTREES_HELP}; a run triggered by pubmed_ingest takes the "
        "subtrees it ingested", json_schema_extra=_form(WHAT))
    backend: Backend | None = Field(
        default=None, title="LLM backend", description="offline (deterministic, no "
        "network) or openai (any OpenAI-compatible server); empty = the meshdistill_llm "
        "connection, else MESHDISTILL_LLM_BACKEND, else offline",
        json_schema_extra=_form(LLM))
    model: str | None = Field(
        default=None, title="Model", description="empty = the connection's or the "
        "backend's default", json_schema_extra=_form(LLM))
    budget_usd: float | None = Field(
        default=None, ge=0, title="Budget (USD)", description="cap for the whole run, "
        "split evenly over the subtrees; past it, candidates are deferred to the next run "
        "(empty = no cap)", json_schema_extra=_form(BUDGET))
    budget_tokens: int | None = Field(
        default=None, ge=1, title="Budget (tokens)", description="token cap for the whole "
        "run, split evenly over the subtrees (empty = no cap)",
        json_schema_extra=_form(BUDGET))
