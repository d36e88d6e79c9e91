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

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, cast

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


MAX_QUESTIONS = 20
"""Most questions one generate call may return (``GeneratedQuestions.questions``)."""


class GeneratedQuestions(BaseModel):
    """Output of the ``generate`` stage."""

    model_config = _STRICT

    questions: list[Question] = Field(min_length=1, max_length=MAX_QUESTIONS)


@dataclass(frozen=True)
class QuestionChoices:
    """One generate request's output narrowed to its input, for servers that constrain
    decoding to the schema: at most ``count`` questions, of the ``types`` asked for, each
    ``evidence`` one of ``sentences`` (the source's own, verbatim; with none, the evidence
    stays free text).

    A small model asked to copy a sentence writes one of its own and loses the question to
    the grounding check; choosing among the sentences it cannot miss, and a bounded list
    stops it from writing questions until its token limit. The reply is still validated
    against :class:`GeneratedQuestions` and grounded like any other: a server that ignores
    the schema gains nothing and loses nothing.
    """

    count: int
    types: tuple[str, ...]
    sentences: tuple[str, ...]

    def narrow(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``GeneratedQuestions``' ``schema`` with these choices in it (the
        levels it changes are copied; ``schema`` itself is shared and left as it is)."""
        out = dict(schema)
        props = dict(out["properties"])
        props["questions"] = {**props["questions"], "minItems": 1, "maxItems": self.count}
        out["properties"] = props
        defs = dict(out["$defs"])
        question = dict(defs["Question"])
        fields = dict(question["properties"])
        fields["type"] = {"type": "string", "enum": list(self.types)}
        if self.sentences:
            fields["evidence"] = {"type": "string", "enum": list(self.sentences),
                                  "description": fields["evidence"].get("description", "")}
        question["properties"] = fields
        defs["Question"] = question
        out["$defs"] = defs
        return out

    @cached_property
    def digest(self) -> str:
        """What enters the call's cache key: another count, type or sentence is another
        call."""
        text = json.dumps([self.count, self.types, self.sentences], ensure_ascii=False)
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


@functools.cache
def output_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The output model's JSON schema, built once per model class.

    ``model_json_schema()`` costs 0.45-0.8 ms per call, the largest CPU cost of a request
    on the event loop. The dict is shared by every request body: read-only from here on
    (it is only ever serialised, or copied where it is narrowed).
    """
    return model.model_json_schema()


_EXPANDED_BOUNDS = frozenset({"maxLength", "maxItems"})
"""Schema bounds that a grammar-constraining server unrolls into one rule per repetition:
llama.cpp's converter refuses a ``maxLength`` in the hundreds ("number of rules ...
exceeds sane defaults"), and its server process then aborts."""

_ENUMERATED_RANGE = 32
"""An integer range at most this wide goes to a grammar-constraining server as the list of
its values: llama.cpp's converter ignores ``minimum`` and ``maximum`` (SmolLM2's judge
then scored 10 of 5), and it holds an enum."""


@functools.cache
def grammar_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The schema sent beside JSON mode, for servers that turn it into a grammar: the
    output schema without :data:`_EXPANDED_BOUNDS`, its small integer ranges as enums
    (:data:`_ENUMERATED_RANGE`). The server still constrains the structure, types and
    enums; the lengths are checked when the reply is validated (and repaired once)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: strip(v) for k, v in node.items() if k not in _EXPANDED_BOUNDS}
            low, high = out.get("minimum"), out.get("maximum")
            if out.get("type") == "integer" and "enum" not in out \
                    and isinstance(low, int) and isinstance(high, int) \
                    and 0 <= high - low <= _ENUMERATED_RANGE:
                out["enum"] = list(range(low, high + 1))
            return out
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return cast(dict[str, Any], strip(output_schema(model)))


STAGE_MODELS: dict[str, type[BaseModel]] = {
    "generate": GeneratedQuestions,
    "judge": Judgement,
    "answer": Answer,
}
