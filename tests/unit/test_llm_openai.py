"""The ``openai`` backend: the real SDK over HTTP against a local OpenAI-compatible server.

No mock objects: faults (429 with Retry-After, 500, hangs, invalid JSON, schema
violations, servers without structured outputs) are produced by the server in
``tests/fakes/openai_server.py`` and cross the wire like the real ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from meshdistill.errors import ConfigError
from meshdistill.llm.backend import FailureKind, LLMRequest, LLMResult, complete_all
from meshdistill.llm.inputs import (
    ArticleInput,
    GenerateInput,
    JudgeInput,
    MeshHeading,
    Passage,
)
from meshdistill.llm.openai_backend import OpenAIBackend
from meshdistill.llm.schemas import GeneratedQuestions, Judgement, Question, QuestionType
from meshdistill.llm.stages import generate_request, judge_request, narrowed

from tests.fakes.openai_server import FakeOpenAI, example_from_schema

VALID = {"groundedness": 5, "relevance": 4, "clarity": 4, "informativeness": 3, "safety": 5,
         "rationale": "Supported by the second sentence."}


def judgement_responder(body: dict[str, Any]) -> str:
    return json.dumps(VALID)


ARTICLE = ArticleInput(
    pmid="21645374", title="Mitochondria in lace plant PCD",
    abstract="Programmed cell death (PCD) is the regulated death of cells within an organism.",
    mesh=(MeshHeading("Apoptosis", True), MeshHeading("Mitochondria")), ancestry=("Cells",),
)
QUESTION = Question(type=QuestionType.YESNO, question="Is PCD the regulated death of cells?",
                    answer_hint="yes", evidence=ARTICLE.abstract)


def request(n: int = 0) -> LLMRequest[Judgement]:
    q = QUESTION.model_copy(update={"question": f"{QUESTION.question} (variant {n})"})
    return judge_request(JudgeInput(q, ARTICLE, (Passage(ARTICLE.pmid, "t", ARTICLE.abstract),)))


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(judgement_responder) as fake:
        yield fake


def backend(server: FakeOpenAI, **kw: Any) -> OpenAIBackend:
    kw = {"model": "fake-model", "base_url": server.url, "api_key": "sk-test-secret",
          "backoff_initial": 0.01, "backoff_max": 0.05, "timeout": 5.0, **kw}
    return OpenAIBackend(**kw)


def run(b: OpenAIBackend, req: LLMRequest[Judgement]) -> LLMResult[Judgement]:
    async def go() -> LLMResult[Judgement]:
        async with b:
            return await b.complete(req)

    return asyncio.run(go())


def test_structured_output_parsed(server: FakeOpenAI) -> None:
    result = run(backend(server), request())
    assert result.ok and result.output == Judgement.model_validate(VALID)
    assert (result.failure, result.attempts, result.repaired) == (None, 1, False)
    assert result.response_format == "json_schema"
    assert result.backend == "openai" and result.model == "fake-model"
    assert result.tokens_in > 0 and result.tokens_out > 0 and result.latency_ms > 0
    assert result.prompt_version == "judge_v1" and len(result.cache_key) == 64
    assert server.requests[0].content_type == "application/json"  # body sent as bytes
    sent = server.requests[0].body
    assert sent["messages"] == [{"role": m["role"], "content": m["content"]}
                                for m in request().messages]
    fmt = sent["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "Judgement"
    assert fmt["json_schema"]["schema"] == Judgement.model_json_schema()
    assert sent["temperature"] == 0.0 and sent["seed"] == 0 and sent["model"] == "fake-model"


def test_default_responder_builds_schema_valid_content(server: FakeOpenAI) -> None:
    server.responder = FakeOpenAI().responder  # schema-driven example
    result = run(backend(server), request())
    assert result.ok, result.error
    assert example_from_schema(Judgement.model_json_schema())["groundedness"] == 1


def test_json_schema_rejected_falls_back_to_json_mode_and_remembers() -> None:
    with FakeOpenAI(judgement_responder, reject_json_schema=True) as server:
        b = backend(server)
        first, second = run_twice(b)
        assert first.ok and second.ok
        assert first.response_format == second.response_format == "json_object"
        assert b.structured_outputs is False
        assert server.statuses == [400, 200, 200]  # the probe is paid once, not per call
        assert [r.response_format for r in server.requests] == [
            "json_schema", "json_object", "json_object"]
        system = server.requests[1].body["messages"][0]
        assert system["role"] == "system" and '"groundedness"' in system["content"]
        assert "JSON" in system["content"]


@pytest.mark.parametrize("shape", ["400", "422", "500"])
def test_each_refusal_of_json_schema_moves_to_json_mode_with_the_schema(shape: str) -> None:
    with FakeOpenAI(reject_json_schema=shape) as server:
        b = backend(server)
        first, second = run_twice(b)
        assert first.ok and second.ok, (first.error, second.error)
        assert b.structured_outputs is False and b.response_format == "json_object+schema"
        assert server.statuses == [int(shape), 200, 200]  # the refusal is not retried
        fmt = server.requests[1].body["response_format"]
        schema = without_length_bounds(Judgement.model_json_schema())
        for score in ("groundedness", "relevance", "clarity", "informativeness", "safety"):
            schema["properties"][score]["enum"] = [1, 2, 3, 4, 5]
        assert fmt == {"type": "json_object", "schema": schema}
        assert first.response_format == second.response_format == "json_object"


def without_length_bounds(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_length_bounds(v) for k, v in node.items()
                if k not in ("maxLength", "maxItems")}
    return [without_length_bounds(v) for v in node] if isinstance(node, list) else node


def test_the_schema_beside_json_mode_has_no_bounds_a_grammar_unrolls() -> None:
    """llama.cpp turns ``maxLength: 600`` into 600 nested grammar rules, refuses the
    grammar and aborts; structure, types, enums and minimum lengths stay constrained."""
    with FakeOpenAI(reject_json_schema="500") as server:
        b = backend(server)
        result = run(b, generate_request(GenerateInput(
            article=ArticleInput(pmid="1", title="T", abstract="An abstract."),
            profile="domain", n_questions=1, types=(QuestionType.YESNO,))))
        sent = server.requests[-1].body["response_format"]["schema"]
    full = GeneratedQuestions.model_json_schema()
    text = json.dumps(full)
    assert '"maxLength"' in text and '"maxItems"' in text  # what there is to take out
    assert sent == without_length_bounds(full)
    sent_text = json.dumps(sent)
    assert '"maxLength"' not in sent_text and '"maxItems"' not in sent_text
    assert '"minLength": 8' in sent_text and '"enum"' in sent_text
    assert result.ok, result.error


@pytest.mark.parametrize("refuse", [False, True])
def test_a_narrowed_request_sends_its_choices_in_either_schema(refuse: bool) -> None:
    """``json_schema`` and the schema beside JSON mode both carry the request's choices;
    the system message of JSON mode keeps the general schema (the sentences are in the
    prompt already). The fake server answers from the schema it was sent."""
    abstract = ("Aspirin lowered the risk of colorectal cancer by 20%. "
                "The effect took ten years to appear.")
    req = narrowed(generate_request(GenerateInput(
        ArticleInput(pmid="1", title="T", abstract=abstract), "domain", 3)))
    assert req.choices is not None
    with FakeOpenAI(reject_json_schema="500" if refuse else False) as server:
        result = run(backend(server), req)
        body = server.requests[-1].body
    fmt = body["response_format"]
    sent = fmt["schema"] if refuse else fmt["json_schema"]["schema"]
    assert sent["properties"]["questions"]["maxItems"] == 3
    evidence = sent["$defs"]["Question"]["properties"]["evidence"]
    assert evidence["enum"] == list(req.choices.sentences)
    assert result.ok, result.error
    assert result.output is not None and result.output.questions
    assert {q.evidence for q in result.output.questions} <= set(req.choices.sentences)
    system = body["messages"][0]["content"]
    assert ("The effect took ten years" in system) is False
    assert ('JSON Schema:' in system) is refuse  # JSON mode only: the schema in the prompt


def test_a_server_refusing_the_schema_in_json_mode_gets_plain_json_mode() -> None:
    with FakeOpenAI(judgement_responder, reject_json_schema=True,
                    reject_schema_in_json_mode=True) as server:
        b = backend(server)
        first, second = run_twice(b)
        assert first.ok and second.ok
        assert b.response_format == "json_object"
        assert server.statuses == [400, 400, 200, 200]
        assert [r.body["response_format"] for r in server.requests[2:]] == [
            {"type": "json_object"}] * 2
        assert '"groundedness"' in server.requests[3].body["messages"][0]["content"]


def test_a_500_that_does_not_name_the_format_is_retried_not_a_fallback(
        server: FakeOpenAI) -> None:
    server.fail_next(1, "500")
    b = backend(server)
    result = run(b, request())
    assert result.ok and b.structured_outputs is True
    assert server.statuses == [500, 200]
    assert [r.body["response_format"]["type"] for r in server.requests] == ["json_schema"] * 2


def run_twice(b: OpenAIBackend) -> list[LLMResult[Judgement]]:
    async def go() -> list[LLMResult[Judgement]]:
        first = await b.complete(request(1))
        second = await b.complete(request(2))
        await b.aclose()
        return [first, second]

    return asyncio.run(go())


def test_invalid_json_gets_one_repair_then_succeeds(server: FakeOpenAI) -> None:
    server.fail_next(1, "invalid_json")
    result = run(backend(server), request())
    assert result.ok and result.repaired and result.attempts == 2
    assert result.failure is None and result.error is None
    repair_messages = server.requests[1].body["messages"]
    assert repair_messages[-2]["role"] == "assistant"
    assert "{not json" in repair_messages[-2]["content"]
    assert repair_messages[-1]["role"] == "user"
    assert "did not validate" in repair_messages[-1]["content"]
    clean = run(backend(server), request())
    assert clean.ok and clean.attempts == 1
    assert result.tokens_in > clean.tokens_in  # tokens are summed over both exchanges


def test_still_invalid_after_repair_is_a_failure_not_an_exception(server: FakeOpenAI) -> None:
    server.fail_next(2, "schema_invalid")
    result = run(backend(server), request())
    assert not result.ok and result.output is None
    assert result.failure is FailureKind.INVALID_OUTPUT
    assert result.error is not None and "groundedness" in result.error  # missing field named
    assert result.raw_text == '{"unexpected": "field"}'
    assert result.attempts == 2 and len(server.requests) == 2


def test_429_waits_at_least_retry_after(server: FakeOpenAI) -> None:
    server.fail_next(1, "429", retry_after=1)
    result = run(backend(server), request())
    assert result.ok and result.attempts == 2
    assert server.statuses == [429, 200]
    gap = server.requests[1].at - server.requests[0].at
    assert gap >= 1.0, gap


def test_429_retries_are_bounded(server: FakeOpenAI) -> None:
    server.fail_next(10, "429", retry_after=0.02)
    result = run(backend(server, max_attempts=3), request())
    assert result.failure is FailureKind.RATE_LIMITED and "429" in (result.error or "")
    assert result.attempts == 3 and server.statuses == [429, 429, 429]


def test_retry_after_beyond_cap_fails_fast(server: FakeOpenAI) -> None:
    server.fail_next(1, "429", retry_after=600)
    start = time.monotonic()
    result = run(backend(server, max_retry_after=5), request())
    assert time.monotonic() - start < 3
    assert result.failure is FailureKind.RATE_LIMITED and "600" in (result.error or "")
    assert result.attempts == 1


def test_500s_retried_then_success(server: FakeOpenAI) -> None:
    server.fail_next(2, "500")
    result = run(backend(server, max_attempts=4), request())
    assert result.ok and result.attempts == 3
    assert server.statuses == [500, 500, 200]


def test_500s_exhaust_attempts_into_failure(server: FakeOpenAI) -> None:
    server.fail_next(10, "500")
    result = run(backend(server, max_attempts=3), request())
    assert result.failure is FailureKind.SERVER_ERROR and "500" in (result.error or "")
    assert result.attempts == 3 and len(server.requests) == 3


def test_timeout_is_retried(server: FakeOpenAI) -> None:
    server.fail_next(1, "hang", hang=1.0)
    start = time.monotonic()
    result = run(backend(server, timeout=0.3), request())
    assert result.ok and result.attempts == 2
    assert time.monotonic() - start < 0.9  # did not wait for the hung response


def test_timeouts_exhaust_attempts_into_failure(server: FakeOpenAI) -> None:
    server.fail_next(2, "hang", hang=1.0)
    result = run(backend(server, timeout=0.2, max_attempts=2), request())
    assert result.failure is FailureKind.TIMEOUT and result.attempts == 2


def test_client_errors_are_not_retried(server: FakeOpenAI) -> None:
    result = run(backend(server, base_url=server.url + "/nowhere"), request())
    assert result.failure is FailureKind.REQUEST_REJECTED and "404" in (result.error or "")
    assert result.attempts == 1


def test_unreachable_server_is_a_connection_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there
    b = OpenAIBackend(model="m", base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                      backoff_initial=0.01, backoff_max=0.02, max_attempts=2)
    result = run(b, request())
    assert result.failure is FailureKind.CONNECTION and result.attempts == 2


@pytest.mark.parametrize("limit", [4, 32])
def test_concurrency_never_exceeds_the_semaphore(limit: int) -> None:
    with FakeOpenAI(judgement_responder, latency=0.05) as server:
        b = backend(server, max_concurrency=limit)

        async def go() -> list[LLMResult[Judgement]]:
            async with b:
                return await complete_all(b, [request(i) for i in range(limit * 3)])

        results = asyncio.run(go())
        assert all(r.ok for r in results) and len(server.requests) == limit * 3
        assert server.max_in_flight <= limit
        assert server.max_in_flight >= limit // 2  # and it does run them concurrently


def test_one_backend_serves_several_event_loops(server: FakeOpenAI) -> None:
    b = backend(server)
    assert asyncio.run(b.complete(request(1))).ok
    assert asyncio.run(b.complete(request(2))).ok  # a new loop: client and semaphore renewed
    assert len(server.requests) == 2


def test_config_from_env_and_key_never_shown(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    monkeypatch.setenv("MESHDISTILL_LLM_MODEL", "env-model")
    b = OpenAIBackend()
    assert b.model == "env-model" and b.base_url == server.url
    assert "sk-very-secret" not in repr(b)
    result = run(b, request())
    assert result.ok and server.requests[0].body["model"] == "env-model"
    server.fail_next(2, "schema_invalid")
    assert run(b, request()).failure is FailureKind.INVALID_OUTPUT  # logs a failure
    assert caplog.records and "sk-very-secret" not in caplog.text
    monkeypatch.delenv("MESHDISTILL_LLM_MODEL")
    with pytest.raises(ConfigError):
        OpenAIBackend()
