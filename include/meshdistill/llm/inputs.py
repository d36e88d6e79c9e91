"""The structured inputs of each stage, from which prompts are rendered.

A request carries these next to its rendered messages: an LLM reads the messages, but
the offline backend works from the structured fields (it must quote the abstract
verbatim, and re-parsing a rendered prompt to find it again would be fragile).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from meshdistill.llm.schemas import MAX_QUESTIONS, Question, QuestionType

# A sentence ends at . ! ? followed by space and an upper-case letter, digit or bracket;
# "e.g. the" and "vs. placebo" (lower case after the stop) are not split.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` of 20 characters or more, each a verbatim substring of it
    (structured-abstract labels kept as written)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) >= 20]


@dataclass(frozen=True)
class MeshHeading:
    """One MeSH heading of an article; ``major`` marks a major topic."""

    name: str
    major: bool = False


@dataclass(frozen=True)
class ArticleInput:
    """A source abstract and the MeSH knowledge that guides questions about it."""

    pmid: str
    title: str
    abstract: str
    mesh: tuple[MeshHeading, ...] = ()
    ancestry: tuple[str, ...] = ()  # subtree path, root first, e.g. ("Neoplasms", ...)
    scope_note: str | None = None


@dataclass(frozen=True)
class Passage:
    """A retrieved context abstract."""

    pmid: str
    title: str
    text: str


@dataclass(frozen=True)
class GenerateInput:
    """Generate ``n_questions`` questions of ``types`` about one article.

    ``profile`` names the generator profile (``domain`` or ``general``): the two profiles'
    candidates for the same source form KAILIN's preference pairs.
    """

    article: ArticleInput
    profile: str = "domain"
    n_questions: int = 4
    types: tuple[QuestionType, ...] = tuple(QuestionType)

    @property
    def question_count(self) -> int:
        """``n_questions`` within what one reply may hold (1 to ``MAX_QUESTIONS``)."""
        return max(1, min(self.n_questions, MAX_QUESTIONS))

    @property
    def question_types(self) -> tuple[QuestionType, ...]:
        """``types``, or every type when none is given."""
        return self.types or tuple(QuestionType)


@dataclass(frozen=True)
class JudgeInput:
    """Judge one candidate question against its source and retrieved contexts."""

    question: Question
    article: ArticleInput
    contexts: tuple[Passage, ...] = field(default=())


@dataclass(frozen=True)
class AnswerInput:
    """Answer one question from retrieved contexts (the source is among them)."""

    question: Question
    contexts: tuple[Passage, ...]
    article: ArticleInput | None = None


StageInput = GenerateInput | JudgeInput | AnswerInput
