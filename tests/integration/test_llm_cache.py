"""The ``llm_call`` cache, run budget and cost ledger, end to end.

Real PostgreSQL (the ``database_url`` fixture), the real ``openai`` SDK over HTTP against
the local fake server, no mock objects. "Calls made" is always counted on the server side
(``FakeOpenAI.requests``), so a cache that silently re-asks the server cannot pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from meshdistill.errors import ConfigError
from meshdistill.llm.backend import (
    FailureKind,
    LLMBackend,
    LLMParams,
    LLMRequest,
    LLMResult,
    complete_all,
)
from meshdistill.llm.budget import DEFERRED_REASON, Budget, estimate_prompt_tokens, is_deferred
from meshdistill.llm.cache import CachedBackend, is_cached, usage
from meshdistill.llm.config import LLMConfig, cached_backend
from meshdistill.llm.inputs import ArticleInput, GenerateInput, JudgeInput, MeshHeading, Passage
from meshdistill.llm.offline import OfflineBackend
from meshdistill.llm.openai_backend import OpenAIBackend
from meshdistill.llm.pricing import Pricing
from meshdistill.llm.schemas import Judgement, Question, QuestionType
from meshdistill.llm.stages import generate_request, judge_request
from meshdistill.store.db import get_engine
from meshdistill.store.migrate import current_revision, downgrade, upgrade
from sqlalchemy import text

from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.integration

VALID = {"groundedness": 5, "relevance": 4, "clarity": 4, "informativeness": 3, "safety": 5,
         "rationale": "Supported by the second sentence."}
ARTICLE = ArticleInput(
    pmid="21645374", title="Mitochondria in lace plant PCD",
    abstract="Programmed cell death (PCD) is the regulated death of cells within an organism.",
    mesh=(MeshHeading("Apoptosis", True), MeshHeading("Mitochondria")), ancestry=("Cells",),
)


def judgement_responder(body: dict[str, Any]) -> str:
    return json.dumps(VALID)


def request(n: int) -> LLMRequest[Judgement]:
    """A judge request; ``n`` (0..99) varies the question, so the key, not the length much."""
    question = Question(type=QuestionType.YESNO,
                        question=f"Is PCD the regulated death of cells? (variant {n:02d})",
                        answer_hint="yes", evidence=ARTICLE.abstract)
    passage = Passage(ARTICLE.pmid, "t", ARTICLE.abstract)
    return judge_request(JudgeInput(question, ARTICLE, (passage,)))


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(judgement_responder) as fake:
        yield fake


def openai_backend(server: FakeOpenAI, **kw: Any) -> OpenAIBackend:
    kw = {"model": "fake-model", "base_url": server.url, "api_key": "sk-test",
          "backoff_initial": 0.01, "backoff_max": 0.02, "timeout": 5.0, **kw}
    return OpenAIBackend(**kw)


def run(
    inner: LLMBackend, url: str, reqs: Sequence[LLMRequest[Judgement]], **kw: Any
) -> list[LLMResult[Judgement]]:
    """One 'task run': a fresh CachedBackend (as a new Airflow try would have)."""

    async def go() -> list[LLMResult[Judgement]]:
        async with CachedBackend(inner, url, **kw) as cached:
            return await complete_all(cached, reqs)

    return asyncio.run(go())


def rows(url: str) -> list[dict[str, Any]]:
    with get_engine(url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT * FROM llm_call ORDER BY cache_key"))]


def test_second_run_makes_zero_requests_and_returns_identical_outputs(
    database_url: str, server: FakeOpenAI
) -> None:
    reqs = [request(n) for n in range(10)]
    first = run(openai_backend(server), database_url, reqs)
    assert all(r.ok and not is_cached(r) and r.attempts == 1 for r in first)
    assert len(server.requests) == 10
    stored = rows(database_url)
    assert len(stored) == 10
    row = stored[0]
    assert (row["stage"], row["backend"], row["model"], row["prompt_version"]) == (
        "judge", "openai", "fake-model", "judge_v1")
    assert row["params"]["temperature"] == 0.0 and row["params"]["output"] == "Judgement"
    assert row["tokens_in"] > 0 and row["tokens_out"] > 0 and row["attempts"] == 1

    second = run(openai_backend(server), database_url, reqs)
    assert len(server.requests) == 10  # zero new HTTP requests
    assert [r.output for r in second] == [r.output for r in first]
    assert [r.cache_key for r in second] == [r.cache_key for r in first]
    assert all(is_cached(r) and r.attempts == 0 and r.failure is None for r in second)
    assert [(r.tokens_in, r.tokens_out) for r in second] == [
        (r.tokens_in, r.tokens_out) for r in first]
    assert len(rows(database_url)) == 10  # no duplicates


def test_changed_params_prompt_version_or_model_is_a_miss(
    database_url: str, server: FakeOpenAI
) -> None:
    base = request(0)
    run(openai_backend(server), database_url, [base])
    variants = [
        dataclasses.replace(base, params=LLMParams(temperature=0.5)),
        dataclasses.replace(base, params=LLMParams(seed=7)),
        dataclasses.replace(base, prompt_version="judge_v9"),
    ]
    for n, variant in enumerate(variants, start=2):
        result = run(openai_backend(server), database_url, [variant])[0]
        assert result.ok and not is_cached(result)
        assert len(server.requests) == n
    other_model = run(openai_backend(server, model="other-model"), database_url, [base])[0]
    assert other_model.ok and not is_cached(other_model) and other_model.model == "other-model"
    assert len(server.requests) == 5
    assert len(rows(database_url)) == 5
    again = run(openai_backend(server), database_url, [base, *variants])
    assert all(is_cached(r) for r in again) and len(server.requests) == 5


def test_failures_are_returned_not_cached_and_retried_next_run(
    database_url: str, server: FakeOpenAI
) -> None:
    server.fail_next(2, "500")
    failed = run(openai_backend(server, max_attempts=2), database_url, [request(0)])[0]
    assert not failed.ok and failed.failure is FailureKind.SERVER_ERROR
    assert not is_cached(failed) and not is_deferred(failed)
    assert len(server.requests) == 2 and rows(database_url) == []

    retried = run(openai_backend(server, max_attempts=2), database_url, [request(0)])[0]
    assert retried.ok and retried.attempts == 1
    assert len(server.requests) == 3  # exactly one new request
    assert len(rows(database_url)) == 1


def test_an_unusable_answer_is_cached_and_replayed_without_a_request(
    database_url: str, server: FakeOpenAI
) -> None:
    """The model's own invalid reply (after its repair) is its answer to that request:
    stored with the failure, replayed as the same failure, tokens counted once."""
    server.fail_next(2, "schema_invalid")
    failed = run(openai_backend(server), database_url, [request(0)])[0]
    assert failed.failure is FailureKind.INVALID_OUTPUT and failed.attempts == 2
    [row] = rows(database_url)
    assert row["failure"] == "invalid_output" and row["output"] is None
    assert row["error"] == failed.error and row["tokens_in"] == failed.tokens_in > 0
    replayed = run(openai_backend(server), database_url, [request(0)])[0]
    assert len(server.requests) == 2, "the replay made a request"
    assert is_cached(replayed) and replayed.failure is FailureKind.INVALID_OUTPUT
    assert replayed.error == failed.error and replayed.output is None
    assert run(openai_backend(server), database_url, [request(1)])[0].ok
    assert len(rows(database_url)) == 2


def test_an_output_cap_is_sent_stored_and_keyed(database_url: str, server: FakeOpenAI
                                                 ) -> None:
    capped = run(openai_backend(server), database_url, [request(0)], max_output_tokens=300)[0]
    assert capped.ok and server.requests[-1].body["max_tokens"] == 300
    [row] = rows(database_url)
    assert row["params"]["max_tokens"] == 300
    # Without the cap it is another request: asked again, stored beside the first.
    full = run(openai_backend(server), database_url, [request(0)])[0]
    assert full.ok and not is_cached(full) and server.requests[-1].body["max_tokens"] == 2048
    assert len(rows(database_url)) == 2
    with pytest.raises(ConfigError, match="at least 16"):
        CachedBackend(openai_backend(server), database_url, max_output_tokens=8)


def test_a_narrowed_schema_is_sent_stored_and_keyed(database_url: str) -> None:
    """``narrow_schema``: the generate request that reaches the server carries its
    article's choices, and it is a call of its own in the cache, not the general one."""
    abstract = ("Programmed cell death is the regulated death of cells. "
                "It shapes the leaves of the lace plant.")
    gen = generate_request(GenerateInput(
        ArticleInput(pmid="1", title="Lace plant", abstract=abstract), "domain", 2))
    with FakeOpenAI() as fake:
        narrow = run(openai_backend(fake), database_url, [gen], narrow_schema=True)[0]
        schema = fake.requests[-1].body["response_format"]["json_schema"]["schema"]
        evidence = schema["$defs"]["Question"]["properties"]["evidence"]
        assert evidence["enum"] == [
            "Programmed cell death is the regulated death of cells.",
            "It shapes the leaves of the lace plant."]
        assert narrow.ok and narrow.params["choices"] and len(rows(database_url)) == 1
        again = run(openai_backend(fake), database_url, [gen], narrow_schema=True)[0]
        assert is_cached(again) and len(fake.requests) == 1
        general = run(openai_backend(fake), database_url, [gen])[0]
        assert not is_cached(general) and len(fake.requests) == 2
        assert "enum" not in json.dumps(
            fake.requests[-1].body["response_format"]["json_schema"]["schema"]["$defs"][
                "Question"]["properties"]["evidence"])
    assert len(rows(database_url)) == 2
    config = LLMConfig(backend="offline", narrow_schema=True)
    assert cached_backend(config, get_engine(database_url)).narrow_schema is True
    assert cached_backend(LLMConfig(backend="offline"), get_engine(database_url)
                          ).narrow_schema is False


def test_concurrent_identical_requests_share_one_call_and_one_row(
    database_url: str, server: FakeOpenAI
) -> None:
    server.latency = 0.05
    results = run(openai_backend(server), database_url, [request(0)] * 20)
    assert all(r.ok for r in results) and len({r.cache_key for r in results}) == 1
    assert len({r.output.model_dump_json() for r in results if r.output}) == 1
    assert len(server.requests) == 1
    assert sum(not is_cached(r) for r in results) == 1  # one made the call, 19 shared it
    assert len(rows(database_url)) == 1


def test_racing_tasks_in_separate_threads_store_one_row(
    database_url: str, server: FakeOpenAI
) -> None:
    """Two 'tasks' (own loops, own CachedBackends) race on the same keys: ON CONFLICT."""
    server.latency = 0.05
    reqs = [request(n) for n in range(5)] * 4
    barrier = threading.Barrier(2)
    outcomes: list[list[LLMResult[Judgement]]] = []

    def task() -> None:
        barrier.wait()
        outcomes.append(run(openai_backend(server), database_url, reqs))

    threads = [threading.Thread(target=task) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 2 and all(r.ok for out in outcomes for r in out)
    assert len(server.requests) <= 10  # at most one call per key per task
    assert len(rows(database_url)) == 5


def test_budget_stops_the_run_cleanly_and_the_next_run_finishes_it(
    database_url: str, server: FakeOpenAI
) -> None:
    server.latency = 0.05  # no call settles while the batch is still being admitted
    reqs = [request(n) for n in range(10)]
    per_call = estimate_prompt_tokens(reqs[0]) + 50
    assert {estimate_prompt_tokens(r) + 50 for r in reqs} == {per_call}
    budget = Budget(tokens=4 * per_call + per_call // 2, expected_output_tokens=50)
    first = run(openai_backend(server), database_url, reqs, budget=budget)

    done = [r for r in first if r.ok]
    deferred = [r for r in first if is_deferred(r)]
    assert (len(done), len(deferred)) == (4, 6)  # none lost: every request is one or other
    assert all(r.failure is None and r.error == DEFERRED_REASON and r.attempts == 0
               for r in deferred)
    assert budget.exhausted and budget.snapshot()["deferred"] == 6
    assert budget.spent_tokens == sum(r.tokens_in + r.tokens_out for r in done)
    assert len(server.requests) == 4
    assert {row["cache_key"] for row in rows(database_url)} == {r.cache_key for r in done}

    second = run(openai_backend(server), database_url, reqs, budget=Budget(tokens=10**9))
    assert all(r.ok for r in second)
    assert len(server.requests) == 10  # only the 6 deferred ones were called
    assert {r.cache_key for r in second if not is_cached(r)} == {r.cache_key for r in deferred}
    assert len(rows(database_url)) == 10


def test_usd_budget_and_cost_accounting_match_tokens_times_price(
    database_url: str, server: FakeOpenAI
) -> None:
    pricing = Pricing({"fake-model": {"input": 1.5, "output": 6.0}})
    reqs = [request(n) for n in range(6)]
    results = run(openai_backend(server), database_url, reqs, pricing=pricing)
    by_key = {r.cache_key: r for r in results}
    stored = rows(database_url)
    assert len(stored) == 6
    for row in stored:
        result = by_key[row["cache_key"]]
        # the tokens are the usage the fake server sent, as the SDK reported it
        assert (row["tokens_in"], row["tokens_out"]) == (result.tokens_in, result.tokens_out)
        expected = (result.tokens_in * 1.5 + result.tokens_out * 6.0) / 1_000_000
        assert float(row["cost_usd"]) == pytest.approx(expected, abs=1e-6)
        assert float(row["cost_usd"]) > 0
    with get_engine(database_url).connect() as conn:
        totals = usage(conn)
    assert totals["calls"] == 6
    assert totals["tokens_in"] == sum(r.tokens_in for r in results)
    assert totals["tokens_out"] == sum(r.tokens_out for r in results)
    assert totals["tokens"] == totals["tokens_in"] + totals["tokens_out"]
    assert totals["cost_usd"] == pytest.approx(sum(float(r["cost_usd"]) for r in stored))

    # a USD budget with room for about two more calls (output estimate: 50 tokens)
    more = [request(n) for n in range(6, 12)]
    est = pricing.cost_usd("fake-model", estimate_prompt_tokens(more[0]), 50)
    budget = Budget(usd=2.5 * est, expected_output_tokens=50)
    server.latency = 0.05
    later = run(openai_backend(server), database_url, more, pricing=pricing, budget=budget)
    assert sum(r.ok for r in later) == 2 and sum(is_deferred(r) for r in later) == 4
    assert budget.spent_usd <= 2.5 * est
    assert len(server.requests) == 8


def test_offline_backend_is_cached_and_free(database_url: str) -> None:
    reqs = [request(n) for n in range(3)]
    pricing = Pricing({"offline-extractive-v1": {"input": 100, "output": 100}})
    first = run(OfflineBackend(), database_url, reqs, pricing=pricing)
    assert all(r.ok and not is_cached(r) for r in first)
    stored = rows(database_url)
    assert len(stored) == 3 and all(float(r["cost_usd"]) == 0 for r in stored)
    assert {r["backend"] for r in stored} == {"offline"}
    second = run(OfflineBackend(), database_url, reqs)
    assert all(is_cached(r) for r in second)
    assert [r.output for r in second] == [r.output for r in first]


def test_migration_downgrades_and_upgrades(database_url: str) -> None:
    engine = get_engine(database_url)
    head = current_revision(engine)
    downgrade(engine, "0001")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT to_regclass('llm_call')")).scalar() is None
    upgrade(engine, "0002")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT to_regclass('llm_call')")).scalar() == "llm_call"
    upgrade(engine)
    assert current_revision(engine) == head
