"""Build the request of each stage from its structured inputs.

This is the only place that knows which template and output model go with which stage,
and how inputs are laid out as template variables; distillation code calls these and
hands the requests to whichever backend is configured.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from meshdistill.llm import prompts
from meshdistill.llm.backend import LLMParams, LLMRequest, Stage, T
from meshdistill.llm.inputs import (
    AnswerInput,
    ArticleInput,
    GenerateInput,
    JudgeInput,
    Passage,
    split_sentences,
)
from meshdistill.llm.schemas import Answer, GeneratedQuestions, Judgement, QuestionChoices

GENERATOR_PROFILES = ("domain", "general")


def format_mesh(article: ArticleInput) -> str:
    """MeSH headings on one line, majors starred (the prompt explains the star)."""
    if not article.mesh:
        return "(none)"
    return "; ".join(f"{h.name}*" if h.major else h.name for h in article.mesh)


def format_ancestry(article: ArticleInput) -> str:
    return " > ".join(article.ancestry) if article.ancestry else "(not given)"


def format_contexts(contexts: Iterable[Passage]) -> str:
    blocks = [f"[PMID {p.pmid}] {p.title}\n{p.text}" for p in contexts]
    return "\n\n".join(blocks) if blocks else "(none)"


def _article_vars(article: ArticleInput) -> dict[str, str]:
    return {
        "pmid": article.pmid,
        "title": article.title,
        "abstract": article.abstract,
        "mesh": format_mesh(article),
        "ancestry": format_ancestry(article),
        "scope_note": article.scope_note or "(not given)",
        "topic": article.ancestry[-1] if article.ancestry else "(not given)",
    }


def generate_request(
    inp: GenerateInput, params: LLMParams | None = None, version: int | None = None
) -> LLMRequest[GeneratedQuestions]:
    """Request for one generator profile (``domain`` or ``general``) on one article."""
    if inp.profile not in GENERATOR_PROFILES:
        raise ValueError(f"unknown generator profile {inp.profile!r}; use {GENERATOR_PROFILES}")
    variables = _article_vars(inp.article) | {
        "n_questions": str(inp.n_questions),
        "types": ", ".join(t.value for t in inp.types),
    }
    rendered = prompts.render(f"generate_{inp.profile}", variables, version)
    return LLMRequest(
        stage=Stage.GENERATE,
        prompt_version=rendered.version,
        messages=rendered.messages,
        output_model=GeneratedQuestions,
        params=params or LLMParams(temperature=0.7),
        inputs=inp,
    )


def narrowed(request: LLMRequest[T]) -> LLMRequest[T]:
    """``request`` with its output schema narrowed to its input when it is a generate
    request (:class:`QuestionChoices`: the questions and types asked for, evidence among
    the abstract's sentences); any other request as it is."""
    inp = request.inputs
    if request.stage is not Stage.GENERATE or not isinstance(inp, GenerateInput) \
            or request.choices is not None:
        return request
    spaced = (" ".join(s.split()) for s in split_sentences(inp.article.abstract))
    sentences = tuple(dict.fromkeys(s for s in spaced if _fits_a_grammar(s)))
    types = tuple(dict.fromkeys(t.value for t in inp.question_types))
    return replace(request, choices=QuestionChoices(inp.question_count, types, sentences))


def _fits_a_grammar(sentence: str) -> bool:
    """Whether llama-cpp-python's JSON-schema-to-grammar converter puts ``sentence`` into
    a grammar that only its own text matches. It writes a choice as a JSON string inside
    a grammar literal without escaping the JSON escapes' backslash: a double quote then
    ends the literal early (llama.cpp cannot parse the grammar, and the server drops the
    connection), a backslash turns into another character, and a character outside the
    Basic Multilingual Plane into a surrogate pair no reply can produce. Sentences with
    any of them are left out of the choices; other non-ASCII characters (µ, ±, β) come
    through as ``\\uXXXX``, which the grammar reads as the character itself. Line breaks
    are already spaces (grounding compares up to whitespace)."""
    return (sentence.isprintable() and not {'"', "\\"} & set(sentence)
            and all(ord(c) < 0x10000 for c in sentence))


def judge_request(
    inp: JudgeInput, params: LLMParams | None = None, version: int | None = None
) -> LLMRequest[Judgement]:
    """Request to score one candidate question against its contexts."""
    variables = _article_vars(inp.article) | {
        "question_type": inp.question.type.value,
        "question": inp.question.question,
        "evidence": inp.question.evidence,
        "contexts": format_contexts(inp.contexts),
    }
    rendered = prompts.render("judge", variables, version)
    return LLMRequest(
        stage=Stage.JUDGE,
        prompt_version=rendered.version,
        messages=rendered.messages,
        output_model=Judgement,
        params=params or LLMParams(temperature=0.0),
        inputs=inp,
    )


def answer_request(
    inp: AnswerInput, params: LLMParams | None = None, version: int | None = None
) -> LLMRequest[Answer]:
    """Request for a grounded answer to one question from its contexts."""
    variables = {
        "question_type": inp.question.type.value,
        "question": inp.question.question,
        "contexts": format_contexts(inp.contexts),
    }
    rendered = prompts.render("answer", variables, version)
    return LLMRequest(
        stage=Stage.ANSWER,
        prompt_version=rendered.version,
        messages=rendered.messages,
        output_model=Answer,
        params=params or LLMParams(temperature=0.0),
        inputs=inp,
    )
