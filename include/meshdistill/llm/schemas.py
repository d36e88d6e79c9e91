"""What each LLM stage must return, as pydantic models.

The same model is three things at once: the JSON schema sent as the ``response_format``
(structured outputs), the validator applied to whatever text comes back (a server in JSON
mode, or one that ignores the schema, can return anything), and the typed value the
distillation stages consume. Validation is strict (``extra='forbid'``, enums, bounds)
because a lenient parse would let malformed items slip into a training set, where they
are much more expensive to find than a failed call is to retry.

Every field is required (optional ones are nullable, not defaulted): OpenAI's strict
structured outputs reject schemas whose properties are not all listed in ``required``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

_STRICT = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
Score = Annotated[int, Field(ge=1, le=5)]
Pmid = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]


class QuestionType(StrEnum):
    """BioASQ question types; ``yesno`` is also PubMedQA's."""

    YESNO = "yesno"
    FACTOID = "factoid"
    LIST = "list"
    SUMMARY = "summary"


class AnswerLabel(StrEnum):
    """PubMedQA's decision labels for ``yesno`` questions."""

    YES = "yes"
    NO = "no"
    MAYBE = "maybe"


class Question(BaseModel):
    """One candidate question with the sentence of the source it rests on."""

    model_config = _STRICT

    type: QuestionType
    question: Annotated[str, StringConstraints(min_length=8, max_length=600)]
    answer_hint: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        description="A short expected answer, or null",
    )
    evidence: NonEmpty = Field(
        description="One sentence copied verbatim from the abstract that supports the question",
    )


class GeneratedQuestions(BaseModel):
    """Output of the ``generate`` stage."""

    model_config = _STRICT

    questions: list[Question] = Field(min_length=1, max_length=20)


@dataclass(frozen=True)
class QuestionChoices:
    """One generate request's output narrowed to its input, for servers that constrain
    decoding to the schema: exactly ``count`` questions, each ``evidence`` one of
    ``sentences`` (the source's own, verbatim).

    A small model asked to copy a sentence writes one of its own and loses the question to
    the grounding check; choosing among the sentences it cannot miss, and a fixed number
    of items stops it from writing questions until its token limit. The reply is still
    validated against :class:`GeneratedQuestions` and grounded like any other: a server
    that ignores the schema gains nothing and loses nothing.
    """

    count: int
    sentences: tuple[str, ...]

    def narrow(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``GeneratedQuestions``' ``schema`` with these choices in it."""
        out = dict(schema)
        props = dict(out["properties"])
        props["questions"] = {**props["questions"], "minItems": self.count,
                              "maxItems": self.count}
        out["properties"] = props
        if self.sentences:
            defs = dict(out["$defs"])
            question = dict(defs["Question"])
            fields = dict(question["properties"])
            fields["evidence"] = {"type": "string", "enum": list(self.sentences),
                                  "description": fields["evidence"].get("description", "")}
            question["properties"] = fields
            defs["Question"] = question
            out["$defs"] = defs
        return out

    @cached_property
    def digest(self) -> str:
        """What enters the call's cache key: another count or sentence is another call."""
        text = json.dumps([self.count, self.sentences], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Judgement(BaseModel):
    """Output of the ``judge`` stage: five 1–5 scores and why.

    Thresholds on these decide accept/reject; the rationale is stored so a reviewer can
    see why an item was dropped.
    """

    model_config = _STRICT

    groundedness: Score
    relevance: Score
    clarity: Score
    informativeness: Score
    safety: Score
    rationale: Annotated[str, StringConstraints(min_length=1, max_length=2000)]


class Answer(BaseModel):
    """Output of the ``answer`` stage: grounded answer, its PMIDs and evidence sentences."""

    model_config = _STRICT

    answer: NonEmpty
    label: AnswerLabel | None = Field(description="yes/no/maybe for yesno questions, else null")
    cited_pmids: list[Pmid] = Field(max_length=20)
    evidence: list[NonEmpty] = Field(max_length=20)


STAGE_MODELS: dict[str, type[BaseModel]] = {
    "generate": GeneratedQuestions,
    "judge": Judgement,
    "answer": Answer,
}
