"""A candidate's terminal state, the answer checks, and run settings validation."""

from __future__ import annotations

from typing import Any

import pytest
from meshdistill.distill.candidates import (
    STAGES,
    TERMINAL,
    Candidate,
    ContextChoice,
    answer_problems,
    choose_contexts,
    evidence_in,
    normalize,
    preference_pairs,
)
from meshdistill.distill.settings import JUDGE_CRITERIA, DistillSettings, JudgeThresholds
from meshdistill.llm.backend import FailureKind, LLMResult, Stage
from meshdistill.llm.budget import DEFERRED_REASON, DeferredResult
from meshdistill.llm.schemas import Answer, AnswerLabel, Judgement, Question, QuestionType
from pydantic import ValidationError

SOURCE = "Tamoxifen reduced the risk of recurrence.\nSurvival  was unchanged at five years."
OTHER = "Radiotherapy was given to all patients."
CONTEXTS = {111: f"Title one {SOURCE}", 222: f"Title two {OTHER}"}


def _question(kind: QuestionType = QuestionType.YESNO) -> Question:
    return Question(type=kind, question="Does tamoxifen reduce recurrence risk?",
                    answer_hint="yes", evidence="Tamoxifen reduced the risk of recurrence.")


def _answer(**kw: Any) -> Answer:
    values: dict[str, Any] = {"answer": "Yes, it does.", "label": AnswerLabel.YES,
                              "cited_pmids": ["111"],
                              "evidence": ["Tamoxifen reduced the risk of recurrence."]}
    return Answer(**{**values, **kw})


def _result(**kw: Any) -> LLMResult[Judgement]:
    base: dict[str, Any] = {"stage": Stage.JUDGE, "prompt_version": "judge_v1",
                            "cache_key": "k", "backend": "openai", "model": "m"}
    return LLMResult(**{**base, **kw})


JUDGED = Judgement(groundedness=5, relevance=4, clarity=4, informativeness=3, safety=5,
                   rationale="fine")


# -- Candidate ------------------------------------------------------------------------------


def test_end_sets_one_terminal_state_and_refuses_a_second() -> None:
    c = Candidate("domain", 0, _question())
    assert c.live and c.state is None
    c.end("rejected", "grade", reason="hierarchy 0.1 < 0.2")
    assert (c.state, c.stage, c.reason, c.error) == ("rejected", "grade",
                                                     "hierarchy 0.1 < 0.2", None)
    assert not c.live
    for state in TERMINAL:
        with pytest.raises(RuntimeError, match="already rejected"):
            c.end(state, "answer")
    assert (c.state, c.stage) == ("rejected", "grade")  # unchanged by the refusals


@pytest.mark.parametrize(("state", "stage"), [("done", "answer"), ("accepted", "export"),
                                              ("", "judge"), (None, "judge")])
def test_end_rejects_unknown_states_and_stages(state: Any, stage: str) -> None:
    c = Candidate("general", 1)
    with pytest.raises(ValueError, match="bad terminal state"):
        c.end(state, stage)
    assert c.live


def test_every_terminal_state_and_stage_is_accepted_once() -> None:
    for state in TERMINAL:
        for stage in STAGES:
            c = Candidate("domain", 0)
            c.end(state, stage)
            assert (c.state, c.stage) == (state, stage)


def test_end_unless_ok_passes_a_result_with_output() -> None:
    c = Candidate("domain", 0, _question())
    assert c.end_unless_ok("judge", _result(output=JUDGED)) is True
    assert c.live and c.stage == "judge"
    assert c.prompt_versions == {"judge": "judge_v1"}


def test_end_unless_ok_defers_a_call_the_budget_refused() -> None:
    c = Candidate("domain", 0)
    deferred: DeferredResult[Question] = DeferredResult(
        stage=Stage.GENERATE, prompt_version="generate_domain_v1", cache_key="k",
        backend="openai", model="m", error=DEFERRED_REASON)
    assert c.end_unless_ok("generate", deferred) is False
    assert (c.state, c.stage, c.reason, c.error) == ("deferred", "generate",
                                                     DEFERRED_REASON, None)
    assert c.prompt_versions == {"generate": "generate_domain_v1"}


def test_end_unless_ok_fails_with_the_error() -> None:
    c = Candidate("general", 2, _question())
    failed = _result(failure=FailureKind.SERVER_ERROR, error="HTTP 500: boom")
    assert c.end_unless_ok("judge", failed) is False
    assert (c.state, c.stage, c.reason) == ("failed", "judge", "server_error")
    assert c.error == "server_error: HTTP 500: boom"


def test_end_unless_ok_failure_without_kind_or_message_still_carries_an_error() -> None:
    c = Candidate("general", 0)
    assert c.end_unless_ok("answer", _result()) is False
    assert (c.state, c.reason) == ("failed", "error")
    assert c.error  # the CHECK (state <> 'failed' OR error IS NOT NULL) holds


def test_end_unless_ok_truncates_long_errors() -> None:
    c = Candidate("general", 0)
    c.end_unless_ok("answer", _result(failure=FailureKind.INVALID_OUTPUT, error="x" * 5000))
    assert c.error is not None and len(c.error) == 2000


def test_end_unless_ok_on_an_ended_candidate_raises() -> None:
    c = Candidate("domain", 0)
    c.end("rejected", "generate", reason="evidence not found in the source")
    with pytest.raises(RuntimeError):
        c.end_unless_ok("judge", _result(failure=FailureKind.TIMEOUT, error="t"))


# -- evidence_in / answer_problems ----------------------------------------------------------


def test_evidence_in_ignores_case_and_whitespace_but_not_wording() -> None:
    assert evidence_in("survival was unchanged at five years.", SOURCE)
    assert evidence_in("  SURVIVAL WAS\n unchanged   at five years. ", SOURCE)
    assert evidence_in("risk of recurrence.\nSurvival", SOURCE)  # across a line break
    assert not evidence_in("Survival was unchanged at 5 years.", SOURCE)
    assert not evidence_in("Tamoxifen lowered the risk of recurrence.", SOURCE)
    assert normalize(" A\tB\n\nC ") == "a b c"


def test_a_grounded_answer_has_no_problems() -> None:
    assert answer_problems(_answer(), _question(), CONTEXTS) == []
    both = _answer(cited_pmids=["111", "222"],
                   evidence=["tamoxifen reduced the risk of  recurrence.", OTHER])
    assert answer_problems(both, _question(), CONTEXTS) == []
    factoid = _answer(label=None)
    assert answer_problems(factoid, _question(QuestionType.FACTOID), CONTEXTS) == []


@pytest.mark.parametrize(("changes", "expected"), [
    ({"cited_pmids": []}, ["answer cites no PMID"]),
    ({"cited_pmids": ["111", "999"]}, ["answer cites PMIDs not among its contexts: [999]"]),
    ({"evidence": []}, ["answer gives no evidence sentence"]),
    ({"evidence": ["Tamoxifen cured everyone.", OTHER]},
     ["1 evidence sentence(s) not found in the contexts"]),
    ({"label": None}, ["yesno answer without a yes/no/maybe label"]),
])
def test_answer_problems_name_each_defect(changes: dict[str, Any], expected: list[str]) -> None:
    assert answer_problems(_answer(**changes), _question(), CONTEXTS) == expected


def test_answer_problems_report_every_defect_at_once() -> None:
    bad = _answer(cited_pmids=[], evidence=[], label=None)
    assert answer_problems(bad, _question(), CONTEXTS) == [
        "answer cites no PMID", "answer gives no evidence sentence",
        "yesno answer without a yes/no/maybe label"]


def test_answer_evidence_from_an_uncited_context_still_counts() -> None:
    # Evidence is checked against all contexts given, not only the cited ones.
    ans = _answer(evidence=[OTHER])
    assert answer_problems(ans, _question(), CONTEXTS) == []


# -- settings -------------------------------------------------------------------------------


def test_default_settings_are_valid_and_item_params_omit_run_mechanics() -> None:
    s = DistillSettings()
    assert s.profiles == ("domain", "general")
    assert s.question_types == tuple(QuestionType)
    params = s.item_params()
    assert not {"redo", "articles_in_flight", "retrievals_in_flight", "flush_every",
                "max_articles"} & set(params)
    assert params["thresholds"] == JudgeThresholds().model_dump()
    assert params["question_types"] == [t.value for t in QuestionType]


@pytest.mark.parametrize("bad", [
    {"profiles": ("domain", "expert")},
    {"profiles": ()},
    {"question_types": ()},
    {"question_types": ("yesno", "essay")},
    {"max_articles": 0},
    {"questions_per_article": 0},
    {"questions_per_article": 21},
    {"k_retrieve": 0},
    {"k_contexts": 21},
    {"min_hierarchy": -0.1},
    {"min_hierarchy": 1.5},
    {"blend_weight": 1.01},
    {"preference_margin": -0.01},
    {"thresholds": {"clarity": 0}},
    {"thresholds": {"safety": 6}},
    {"thresholds": {"novelty": 3}},
    {"articles_in_flight": 0},
    {"flush_every": 0},
    {"unknown_field": 1},
])
def test_invalid_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DistillSettings.model_validate(bad)


def test_settings_deduplicate_types_and_profiles_keeping_order() -> None:
    s = DistillSettings.model_validate({"question_types": ["list", "yesno", "list"],
                                        "profiles": ["general", "domain", "general"],
                                        "max_articles": None})
    assert s.question_types == (QuestionType.LIST, QuestionType.YESNO)
    assert s.profiles == ("general", "domain")
    assert s.max_articles is None


def test_settings_are_frozen() -> None:
    s = DistillSettings()
    with pytest.raises(ValidationError):
        s.max_articles = 5


def test_pipeline_turns_bad_settings_into_a_config_error() -> None:
    from meshdistill.errors import ConfigError
    from meshdistill.pipeline import distill_subtree

    with pytest.raises(ConfigError, match="invalid distill settings"):
        distill_subtree("C04", run_id="x", settings={"profiles": ["nope"]},
                        database_url="postgresql://nobody@127.0.0.1:1/none")


def test_judge_thresholds_failures() -> None:
    t = JudgeThresholds()
    scores = {name: 5 for name in JUDGE_CRITERIA}
    assert t.failures(scores) == []
    at_threshold = {name: getattr(t, name) for name in JUDGE_CRITERIA}
    assert t.failures(at_threshold) == []
    low = {**scores, "clarity": 2, "safety": 3}
    assert t.failures(low) == ["clarity 2 < 3", "safety 3 < 4"]
    strict = JudgeThresholds(informativeness=5)
    assert strict.failures({**scores, "informativeness": 4}) == ["informativeness 4 < 5"]
    assert t.failures(JUDGED.model_dump()) == []  # the rationale is ignored


# --- context choice and preference pairs -------------------------------------------------


def _ctx(pmid: int, rank: int, blend: float, source: bool = False) -> ContextChoice:
    return ContextChoice(pmid, rank, 0.5, 0.5, blend, source)


def test_choose_contexts_keeps_the_best_blends_ties_by_rank() -> None:
    scored = [_ctx(1, 1, 0.6, source=True), _ctx(2, 2, 0.9), _ctx(3, 3, 0.9), _ctx(4, 4, 0.1)]
    assert [c.pmid for c in choose_contexts(scored, 3)] == [2, 3, 1]


def test_choose_contexts_puts_a_low_source_in_the_last_place() -> None:
    scored = [_ctx(1, 4, 0.05, source=True), _ctx(2, 1, 0.9), _ctx(3, 2, 0.8), _ctx(4, 3, 0.7)]
    chosen = choose_contexts(scored, 3)
    assert [c.pmid for c in chosen] == [2, 3, 1]
    assert [c.pmid for c in choose_contexts(scored, 1)] == [1]  # k = 1: the source alone


def _graded(profile: str, ordinal: int, score: float, state: str = "accepted") -> Candidate:
    c = Candidate(profile, ordinal, _question(), hierarchy_score=score)
    c.end(state, "answer" if state == "accepted" else "judge")
    return c


def test_preference_pairs_choose_the_higher_score_over_the_margin() -> None:
    candidates = [
        _graded("domain", 0, 0.7), _graded("general", 0, 0.5),  # domain wins by 0.2
        _graded("domain", 1, 0.40), _graded("general", 1, 0.43),  # margin 0.03 < 0.05
        _graded("domain", 2, 0.3), _graded("general", 2, 0.9, "rejected"),  # winner rejected
        _graded("domain", 3, 0.2), _graded("general", 3, 0.6),  # general wins
        _graded("domain", 4, 0.5),  # no partner
    ]
    pairs = preference_pairs(candidates, ("domain", "general"), 0.05)
    assert pairs == [(0, "domain", "general", 0.7, 0.5), (3, "general", "domain", 0.6, 0.2)]


def test_preference_pairs_skip_ungraded_and_need_two_profiles() -> None:
    ungraded = Candidate("general", 0, _question())
    ungraded.end("rejected", "retrieve", reason="source article is no longer retrievable")
    candidates = [_graded("domain", 0, 0.9), ungraded]
    assert preference_pairs(candidates, ("domain", "general"), 0.05) == []
    assert preference_pairs([_graded("domain", 0, 0.9)], ("domain",), 0.0) == []
