"""Schemas, prompt templates and the cache key."""

from __future__ import annotations

import json
from typing import Any

import pytest
from meshdistill.distill.candidates import evidence_in
from meshdistill.llm import prompts
from meshdistill.llm.backend import (
    MODEL_ANSWER_FAILURES,
    FailureKind,
    LLMParams,
    LLMResult,
    cache_key,
)
from meshdistill.llm.inputs import ArticleInput, GenerateInput, JudgeInput, MeshHeading
from meshdistill.llm.schemas import (
    MAX_QUESTIONS,
    Answer,
    GeneratedQuestions,
    Judgement,
    Question,
    QuestionChoices,
    QuestionType,
    grammar_schema,
)
from meshdistill.llm.stages import generate_request, judge_request, narrowed
from pydantic import ValidationError

ARTICLE = ArticleInput(
    pmid="123", title="Aspirin and colorectal cancer", abstract="Aspirin lowered risk by 20%.",
    mesh=(MeshHeading("Colorectal Neoplasms", major=True), MeshHeading("Aspirin")),
    ancestry=("Neoplasms", "Neoplasms by Site"), scope_note="Tumors of the colon.",
)


def test_schemas_are_strict() -> None:
    good = {"groundedness": 5, "relevance": 4, "clarity": 3, "informativeness": 2,
            "safety": 1, "rationale": "ok"}
    assert Judgement.model_validate(good).clarity == 3
    for bad in ({**good, "safety": 6}, {**good, "clarity": 0}, {**good, "extra": 1},
                {k: v for k, v in good.items() if k != "rationale"}):
        with pytest.raises(ValidationError):
            Judgement.model_validate(bad)
    with pytest.raises(ValidationError):  # unknown question type
        GeneratedQuestions.model_validate({"questions": [
            {"type": "essay", "question": "Why is the sky blue?", "answer_hint": None,
             "evidence": "x"}]})
    with pytest.raises(ValidationError):  # empty list
        GeneratedQuestions.model_validate({"questions": []})
    with pytest.raises(ValidationError):  # label outside yes/no/maybe, PMID not numeric
        Answer.model_validate({"answer": "a", "label": "probably", "cited_pmids": ["1"],
                               "evidence": []})
    with pytest.raises(ValidationError):
        Answer.model_validate({"answer": "a", "label": None, "cited_pmids": ["PMC1"],
                               "evidence": []})


def test_schemas_are_valid_for_strict_structured_outputs() -> None:
    """OpenAI strict mode: every property required, no additional properties."""

    def check(schema: dict[str, Any]) -> None:
        if schema.get("type") == "object":
            assert schema["additionalProperties"] is False
            assert set(schema["required"]) == set(schema["properties"])

    for model in (GeneratedQuestions, Judgement, Answer):
        schema = model.model_json_schema()
        check(schema)
        for sub in schema.get("$defs", {}).values():
            check(sub)


def test_prompt_loader_renders_versioned_files() -> None:
    assert set(prompts.available()) >= {"generate_domain", "generate_general", "judge", "answer"}
    req = generate_request(GenerateInput(ARTICLE, "domain", 3))
    assert req.prompt_version == "generate_domain_v1"
    assert [m["role"] for m in req.messages] == ["system", "user"]
    system, user = (m["content"] for m in req.messages)
    assert "Neoplasms > Neoplasms by Site" in system and "Tumors of the colon." in system
    assert "exactly 3 questions" in system
    assert "Colorectal Neoplasms*; Aspirin" in user and "Aspirin lowered risk by 20%." in user
    assert "$" not in system + user  # every placeholder filled
    explicit = prompts.render("answer", {"question_type": "yesno", "question": "Q?",
                                         "contexts": "C"}, version=1)
    assert explicit.version == "answer_v1"
    with pytest.raises(KeyError):
        prompts.render("answer", {"question": "Q?"})  # missing variables fail loudly
    with pytest.raises(KeyError):
        prompts.render("answer", {}, version=99)
    with pytest.raises(KeyError):
        prompts.render("nonexistent", {})


def test_cache_key_is_stable_and_sensitive() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    params = {"temperature": 0.0, "max_tokens": 100, "seed": 0}
    key = cache_key("m", "judge_v1", messages, params)
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == cache_key("m", "judge_v1", [dict(m) for m in messages],
                            dict(reversed(params.items())))  # dict order does not matter
    # pinned: the key must not change between processes or releases (it keys the DB cache)
    assert key == "4648b58bc9fb711c1c91a42250e2ea2c32fc699d2f788d2c6d7daa1f6f92be1d"
    variants = {
        cache_key("m2", "judge_v1", messages, params),
        cache_key("m", "judge_v2", messages, params),
        cache_key("m", "judge_v1", messages[::-1], params),
        cache_key("m", "judge_v1", [messages[0], {"role": "user", "content": "u "}], params),
        cache_key("m", "judge_v1", messages, {**params, "temperature": 0.7}),
        cache_key("m", "judge_v1", messages, {**params, "seed": None}),
    }
    assert key not in variants and len(variants) == 6


def test_request_cache_key_covers_params_and_schema() -> None:
    inp = GenerateInput(ARTICLE, "domain", 3)
    a = generate_request(inp)
    assert a.cache_key("m") == generate_request(inp).cache_key("m")
    assert a.cache_key("m") != generate_request(inp, LLMParams(temperature=0.1)).cache_key("m")
    assert a.cache_key("m") != a.cache_key("other-model")
    assert a.key_params()["output"] == "GeneratedQuestions" and len(a.key_params()["schema"]) == 16


@pytest.mark.parametrize(("failure", "cacheable"), [
    (None, True),
    (FailureKind.INVALID_OUTPUT, True),
    (FailureKind.REFUSED, True),
    (FailureKind.SERVER_ERROR, False),
    (FailureKind.RATE_LIMITED, False),
    (FailureKind.TIMEOUT, False),
    (FailureKind.CONNECTION, False),
    (FailureKind.REQUEST_REJECTED, False),
    (FailureKind.UNSUPPORTED, False),
])
def test_only_outputs_and_the_models_own_failures_are_cacheable(
    failure: FailureKind | None, cacheable: bool
) -> None:
    request = generate_request(GenerateInput(ARTICLE, "domain", 1))
    output = None if failure else GeneratedQuestions.model_validate({"questions": [{
        "type": "yesno", "question": "Does aspirin lower risk?", "answer_hint": None,
        "evidence": "Aspirin lowered risk by 20%."}]})
    result = LLMResult.for_request(request, "openai", "m", output=output, failure=failure)
    assert result.cacheable is cacheable
    assert (failure in MODEL_ANSWER_FAILURES) is (cacheable and failure is not None)


def test_an_output_cap_is_a_parameter_of_the_request() -> None:
    request = generate_request(GenerateInput(ARTICLE, "domain", 1))
    assert request.params.max_tokens == 2048
    assert request.capped(None) is request and request.capped(4096) is request
    capped = request.capped(512)
    assert capped.params.max_tokens == 512 and capped.messages == request.messages
    assert capped.params.temperature == request.params.temperature
    assert capped.cache_key("m") != request.cache_key("m")
    assert capped.cache_key("m") == request.capped(512).cache_key("m")


def test_an_empty_openai_base_url_in_the_environment_means_openai(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker Compose passes unset settings as empty strings; the SDK would take ``''``."""
    import asyncio

    from meshdistill.llm.embeddings import OpenAIEmbedder
    from meshdistill.llm.openai_backend import OpenAIBackend

    monkeypatch.setenv("OPENAI_BASE_URL", "")
    monkeypatch.setenv("MESHDISTILL_EMBEDDING_BASE_URL", "")

    async def client_url() -> str:
        client, _ = OpenAIBackend(model="m", api_key="k", transport="httpx")._state()
        return str(client.base_url)

    assert asyncio.run(client_url()).startswith("https://api.openai.com/v1")
    embedder = OpenAIEmbedder(model="e", api_key="k")
    assert str(embedder._get_client().base_url).startswith("https://api.openai.com/v1")


TWO_SENTENCES = ArticleInput(
    pmid="7", title="Aspirin", abstract=(
        "Aspirin lowered the risk of colorectal cancer by 20%.\nThe effect took ten\nyears "
        "to appear. Short one. Aspirin lowered the risk of colorectal cancer by 20%. "
        'Patients called it "the pill" in interviews. The dose was 75 \u03bcg a day. '
        "A path C:\\trial was logged."),
)


def test_a_generate_request_is_narrowed_to_its_articles_sentences_and_count() -> None:
    request = generate_request(GenerateInput(TWO_SENTENCES, "domain", 3))
    narrow = narrowed(request)
    # Repeated once; short ones, and those a llama.cpp grammar cannot hold (a quote, a
    # backslash) left out, other non-ASCII kept; line breaks made spaces (grounding
    # compares up to whitespace).
    assert narrow.choices == QuestionChoices(3, tuple(t.value for t in QuestionType), (
        "Aspirin lowered the risk of colorectal cancer by 20%.",
        "The effect took ten years to appear.", "The dose was 75 \u03bcg a day."))
    assert narrow.choices is not None
    assert all(evidence_in(s, TWO_SENTENCES.abstract) for s in narrow.choices.sentences)
    assert narrow.messages == request.messages and narrow.params == request.params
    assert narrowed(narrow) is narrow
    # Another count, type or sentence is another call; the same input is the same call.
    assert narrow.cache_key("m") != request.cache_key("m")
    assert narrow.cache_key("m") == narrowed(request).cache_key("m")
    fewer = narrowed(generate_request(GenerateInput(TWO_SENTENCES, "domain", 2)))
    yesno = narrowed(generate_request(GenerateInput(TWO_SENTENCES, "domain", 3,
                                                    (QuestionType.YESNO,))))
    assert yesno.choices is not None and yesno.choices.types == ("yesno",)
    assert len({narrow.cache_key("m"), fewer.cache_key("m"), yesno.cache_key("m")}) == 3
    # The count stays within what GeneratedQuestions accepts.
    many = narrowed(generate_request(GenerateInput(TWO_SENTENCES, "domain", 50)))
    assert many.choices is not None and many.choices.count == MAX_QUESTIONS
    # Only generate requests carry choices.
    judge = judge_request(JudgeInput(Question(
        type=QuestionType.YESNO, question="Does aspirin lower risk?", answer_hint=None,
        evidence="Aspirin lowered risk by 20%."), ARTICLE))
    assert narrowed(judge) is judge


def test_choices_narrow_a_copy_of_the_schema() -> None:
    schema = GeneratedQuestions.model_json_schema()
    before = json.dumps(schema, sort_keys=True)
    out = QuestionChoices(2, ("yesno", "list"), (
        "First sentence of it.", "Second sentence of it.")).narrow(schema)
    assert json.dumps(schema, sort_keys=True) == before  # the shared schema is untouched
    questions = out["properties"]["questions"]
    assert (questions["minItems"], questions["maxItems"]) == (1, 2)
    assert questions["items"] == schema["properties"]["questions"]["items"]
    fields = out["$defs"]["Question"]["properties"]
    assert fields["evidence"]["enum"] == ["First sentence of it.", "Second sentence of it."]
    assert fields["evidence"]["type"] == "string"
    assert fields["type"] == {"type": "string", "enum": ["yesno", "list"]}
    # The rest of a question is as the model says.
    rest = {k: v for k, v in fields.items() if k not in ("evidence", "type")}
    assert rest == {k: v for k, v in schema["$defs"]["Question"]["properties"].items()
                    if k not in ("evidence", "type")}
    # No sentence to choose from (an abstract of fragments): the evidence stays free.
    bare = QuestionChoices(1, ("yesno",), ()).narrow(schema)
    assert bare["$defs"]["Question"]["properties"]["evidence"] == \
        schema["$defs"]["Question"]["properties"]["evidence"]
    assert bare["properties"]["questions"]["maxItems"] == 1


def test_llama_cpp_parses_the_grammar_of_the_choices() -> None:
    """llama.cpp itself (the bundled model's vocabulary, no weights) parses the grammar
    llama-cpp-python's converter builds from the narrowed schema, with each choice as
    one literal and at most the questions asked for. A sentence with a quote shows why
    those are left out: llama.cpp cannot parse its grammar."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar
    from meshdistill.llm.local_server import bundled_model

    vocab_model = llama_cpp.Llama(model_path=str(bundled_model()), vocab_only=True,
                                  verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(vocab_model._model.model)

    def parses(grammar: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    def grammar(*sentences: str) -> str:
        choices = QuestionChoices(2, ("yesno", "factoid"), sentences)
        schema = choices.narrow(grammar_schema(GeneratedQuestions))
        return str(LlamaGrammar.from_json_schema(json.dumps(schema))._grammar)

    chosen = narrowed(generate_request(GenerateInput(TWO_SENTENCES, "domain", 2))).choices
    assert chosen is not None and any(not s.isascii() for s in chosen.sentences)
    text = grammar(*chosen.sentences)
    assert parses(text)
    rules = dict(line.split(" ::= ", 1) for line in text.splitlines())
    assert rules["Question-evidence"].count(" | ") == len(chosen.sentences) - 1
    assert "The effect took ten years to appear." in rules["Question-evidence"]
    assert rules["Question-type"] == '"\\"yesno\\"" | "\\"factoid\\""'
    assert "questions-item" in rules["questions"] and "(" in rules["questions"]  # up to 2
    # The judge's 1-5 scores: the converter ignores minimum and maximum, so they go as enums.
    judge = str(LlamaGrammar.from_json_schema(json.dumps(grammar_schema(Judgement)))._grammar)
    assert 'clarity ::= "1" | "2" | "3" | "4" | "5"' in judge.splitlines() and parses(judge)
    assert not parses(grammar('Patients called it "the pill" in interviews.'))
