"""The offline backend on real PubMedQA abstracts: valid, verbatim, deterministic."""

from __future__ import annotations

import asyncio
import json
from functools import cache
from typing import Any

import pytest
from meshdistill.fileio import read_text
from meshdistill.llm.backend import FailureKind, LLMRequest, LLMResult, Stage
from meshdistill.llm.inputs import (
    AnswerInput,
    ArticleInput,
    GenerateInput,
    JudgeInput,
    MeshHeading,
    Passage,
    split_sentences,
)
from meshdistill.llm.offline import OfflineBackend
from meshdistill.llm.schemas import (
    AnswerLabel,
    GeneratedQuestions,
    Judgement,
    Question,
    QuestionType,
)
from meshdistill.llm.stages import answer_request, generate_request, judge_request

from tests.support import PQAL


@cache
def articles(n: int = 40) -> tuple[ArticleInput, ...]:
    """Real abstracts (PubMedQA-L); the expert question stands in for the title."""
    data = json.loads(read_text(PQAL))
    out = []
    for pmid, item in list(data.items())[:n]:
        out.append(ArticleInput(
            pmid=pmid, title=item["QUESTION"], abstract=" ".join(item["CONTEXTS"]),
            mesh=tuple(MeshHeading(m, major=i == 0) for i, m in enumerate(item["MESHES"])),
            ancestry=("Diseases", "Neoplasms"), scope_note="New abnormal growth of tissue.",
        ))
    return tuple(out)


def run(request: LLMRequest[Any]) -> LLMResult[Any]:
    return asyncio.run(OfflineBackend().complete(request))


@pytest.mark.parametrize("profile", ["domain", "general"])
def test_generated_evidence_is_verbatim_and_types_follow_the_request(profile: str) -> None:
    for article in articles():
        result = run(generate_request(GenerateInput(article, profile, n_questions=4)))
        assert result.ok, result.error
        assert result.backend == "offline" and result.model == "offline-extractive-v1"
        assert isinstance(result.output, GeneratedQuestions)
        questions = result.output.questions
        assert [q.type for q in questions] == list(QuestionType)
        for q in questions:
            assert q.evidence in article.abstract, (article.pmid, q.evidence)
            assert q.question.endswith("?")


def test_same_request_same_output_and_profiles_differ() -> None:
    article = articles()[3]
    first = run(generate_request(GenerateInput(article, "domain", 6)))
    again = run(generate_request(GenerateInput(article, "domain", 6)))
    other = run(generate_request(GenerateInput(article, "general", 6)))
    assert first.raw_text == again.raw_text
    assert first.cache_key == again.cache_key
    assert first.raw_text != other.raw_text
    assert first.cache_key != other.cache_key
    assert first.prompt_version == "generate_domain_v1"
    assert other.prompt_version == "generate_general_v1"


def test_judge_scores_in_range_and_prefer_grounded_questions() -> None:
    article = articles()[0]
    source = Passage(article.pmid, article.title, article.abstract)
    generated = run(generate_request(GenerateInput(article, "domain", 1, (QuestionType.YESNO,))))
    assert generated.output is not None
    good = generated.output.questions[0]
    bad = Question(type=QuestionType.YESNO,
                   question="Does this study show that quantum cryptography beats RSA?",
                   answer_hint=None, evidence="Quantum cryptography beats RSA.")
    good_j = run(judge_request(JudgeInput(good, article, (source,)))).output
    bad_j = run(judge_request(JudgeInput(bad, article, (source,)))).output
    assert isinstance(good_j, Judgement) and isinstance(bad_j, Judgement)
    assert good_j.groundedness > bad_j.groundedness
    assert good_j.clarity > bad_j.clarity  # "this study" is not standalone
    assert good_j.relevance >= bad_j.relevance
    assert "offline heuristic" in good_j.rationale


def test_answer_cites_context_pmids_with_verbatim_evidence() -> None:
    a, b = articles()[0], articles()[1]
    contexts = (Passage(a.pmid, a.title, a.abstract), Passage(b.pmid, b.title, b.abstract))
    generated = run(generate_request(GenerateInput(a, "general", 4)))
    assert generated.output is not None
    for q in generated.output.questions:
        result = run(answer_request(AnswerInput(q, contexts)))
        assert result.ok and result.output is not None
        ans = result.output
        assert ans.evidence and ans.cited_pmids
        assert set(ans.cited_pmids) <= {a.pmid, b.pmid}
        assert q.evidence in ans.evidence  # its own evidence sentence ranks first
        for sentence in ans.evidence:
            assert any(sentence in c.text for c in contexts)
        if q.type is QuestionType.YESNO:
            assert ans.label in set(AnswerLabel)
        else:
            assert ans.label is None


def test_yesno_label_follows_negation_and_hedging() -> None:
    def label(sentence: str) -> AnswerLabel | None:
        q = Question(type=QuestionType.YESNO, question="Is drug X effective for condition Y?",
                     answer_hint=None, evidence=sentence)
        out = run(answer_request(AnswerInput(q, (Passage("1", "t", sentence),)))).output
        assert out is not None
        return out.label

    assert label("Drug X reduced mortality in condition Y by 30%.") is AnswerLabel.YES
    assert label("Drug X did not reduce mortality in condition Y.") is AnswerLabel.NO
    assert label("Drug X may reduce mortality in condition Y.") is AnswerLabel.MAYBE


def test_request_without_inputs_fails_without_raising() -> None:
    req = generate_request(GenerateInput(articles()[0]))
    bare = LLMRequest(stage=Stage.GENERATE, prompt_version=req.prompt_version,
                      messages=req.messages, output_model=GeneratedQuestions)
    result = run(bare)
    assert not result.ok and result.failure is FailureKind.UNSUPPORTED


def test_sentences_are_substrings() -> None:
    text = articles()[5].abstract
    sentences = split_sentences(text)
    assert len(sentences) >= 3
    assert all(s in text for s in sentences)


@pytest.mark.parametrize("profile", ["domain", "general"])
def test_yesno_questions_come_from_findings_not_aims(profile: str) -> None:
    """An aim or method sentence ("To assess ...") makes no yes/no question while a
    finding is left; an abstract made only of aims still gets its question."""
    abstract = ("OBJECTIVE: To assess whether tamoxifen lowers breast neoplasm recurrence. "
                "We investigated 400 women with breast neoplasms. "
                "Tamoxifen reduced breast neoplasm recurrence by 40% over five years.")
    article = ArticleInput("1", "Tamoxifen and breast neoplasms", abstract,
                           mesh=(MeshHeading("Breast Neoplasms", True),))
    inp = GenerateInput(article, profile, n_questions=1, types=(QuestionType.YESNO,))
    [question] = run(generate_request(inp)).output.questions  # type: ignore[union-attr]
    assert question.evidence.startswith("Tamoxifen reduced")
    only_aims = ArticleInput("2", "T", "To assess something about breast neoplasms here. "
                             "We examined many patients with breast neoplasms.")
    [fallback] = run(generate_request(GenerateInput(only_aims, profile, 1, (QuestionType.YESNO,)))
                     ).output.questions  # type: ignore[union-attr]
    assert fallback.evidence in only_aims.abstract
