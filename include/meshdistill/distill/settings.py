"""What one distillation run is asked to do, validated once: the DAG's Params form, the
CLI flags and the library call all become a :class:`DistillSettings`.

Everything here that changes what an item *is* (types, counts, thresholds, k) is stored
with every item (``qa_item.params``), so a reader of the data can tell how it was made.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshdistill.distill.grade import DEFAULT_BLEND_WEIGHT
from meshdistill.llm.schemas import QuestionType
from meshdistill.llm.stages import GENERATOR_PROFILES

JUDGE_CRITERIA = ("groundedness", "relevance", "clarity", "informativeness", "safety")


class JudgeThresholds(BaseModel):
    """Minimum 1–5 judge score per criterion for a candidate to be accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groundedness: int = Field(default=3, ge=1, le=5)
    relevance: int = Field(default=3, ge=1, le=5)
    clarity: int = Field(default=3, ge=1, le=5)
    informativeness: int = Field(default=2, ge=1, le=5)
    safety: int = Field(default=4, ge=1, le=5)

    def failures(self, scores: dict[str, Any]) -> list[str]:
        """One ``"clarity 2 < 3"`` per criterion below its threshold."""
        return [f"{name} {scores[name]} < {getattr(self, name)}"
                for name in JUDGE_CRITERIA if scores[name] < getattr(self, name)]


class DistillSettings(BaseModel):
    """Parameters of one run over one subtree; defaults suit a first run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_articles: int | None = Field(
        default=100, ge=1, description="articles per subtree per run; None = all pending")
    questions_per_article: int = Field(default=4, ge=1, le=20, description="per generator profile")
    question_types: tuple[QuestionType, ...] = tuple(QuestionType)
    profiles: tuple[str, ...] = GENERATOR_PROFILES
    retrieval: Literal["fts", "vector"] = Field(
        default="fts", description="full-text search, or pgvector with an embeddings "
        "endpoint (MESHDISTILL_EMBEDDING_MODEL / _BASE_URL / _API_KEY)")
    k_retrieve: int = Field(default=10, ge=1, le=100,
                            description="candidates retrieved per question")
    k_contexts: int = Field(default=3, ge=1, le=20, description="contexts kept (source included)")
    contexts_in_subtree: bool = Field(
        default=False, description="only take contexts from articles indexed under the subtree")
    blend_weight: float = Field(default=DEFAULT_BLEND_WEIGHT, ge=0.0, le=1.0)
    min_hierarchy: float = Field(default=0.2, ge=0.0, le=1.0,
                                 description="reject items whose hierarchy score is lower")
    thresholds: JudgeThresholds = Field(default_factory=JudgeThresholds)
    preference_margin: float = Field(default=0.05, ge=0.0, le=1.0)
    redo: bool = Field(default=False, description="also re-evaluate articles already settled")
    articles_in_flight: int = Field(default=64, ge=1, le=1024,
                                    description="articles processed concurrently")
    retrievals_in_flight: int = Field(
        default=2, ge=1, le=64, description="full-text retrieval statements running at "
        "once; more let PostgreSQL's ranking take every core of a small machine from the "
        "LLM client (vector retrieval is not bounded: it waits on its endpoint)")
    flush_every: int = Field(default=25, ge=1, description="articles per database commit")
    processes: int = Field(
        default=1, ge=1, le=16, description="worker processes per subtree run; the LLM "
        "concurrency cap and the budget are split evenly between them")

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
