"""Distilling a subtree end to end: terminal states, reconciliation, reruns, faults, budget.

One database per module: MeSH plus the first 3,000 citations of the real pubmed20n0014
file (loading all 30,000 takes ~10 s; 3,000 give enough C04 sources and a retrieval
corpus). Each test starts from empty ``qa_item``/``preference_pair``/``llm_call`` tables.

The ``openai`` path is the real SDK over HTTP against ``FakeOpenAI`` with
:func:`tests.fakes.llm_responder.realistic_responder`; calls made are counted on the
server side, so a cache that silently re-asks the server cannot pass.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from meshdistill.cli import main
from meshdistill.distill.candidates import TERMINAL
from meshdistill.distill.corpus import select_sources
from meshdistill.distill.grade import MeshGrader
from meshdistill.distill.run import distill_subtree_async
from meshdistill.distill.settings import DistillSettings
from meshdistill.llm.config import LLMConfig, cached_backend
from meshdistill.mesh.subtree import subtree_descriptor_uis
from meshdistill.pipeline import distill_subtree
from meshdistill.store.db import get_engine
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse

from tests.fakes.llm_responder import realistic_responder, sentences
from tests.fakes.openai_server import FakeOpenAI, RecordedRequest

pytestmark = pytest.mark.integration

SUBTREE = "C04"
MODEL = "fake-model"
SETTINGS: dict[str, Any] = {"max_articles": 6, "questions_per_article": 2}
FLAT = ("accepted", "rejected", "failed", "deferred")


@pytest.fixture(scope="module")
def grader(corpus_url: str) -> MeshGrader:
    """Built once: ``MeshGrader.from_db`` takes ~3.7 s here, per run when not given."""
    with get_engine(corpus_url).connect() as conn:
        return MeshGrader.from_db(conn, blend_weight=DistillSettings().blend_weight)


def distill(distill_url: str, run_id: str, llm: LLMConfig, grader: MeshGrader,
            settings: dict[str, Any] | None = None,
            budget_tokens: int | None = None) -> dict[str, Any]:
    """What ``pipeline.distill_subtree`` does, with the module's grader passed in."""
    validated = DistillSettings.model_validate(settings or SETTINGS)
    engine = get_engine(distill_url)

    async def run() -> dict[str, Any]:
        async with cached_backend(llm, engine, budget_tokens=budget_tokens) as backend:
            return await distill_subtree_async(engine, SUBTREE, backend, validated, run_id,
                                               grader)

    return asyncio.run(run())


# -- helpers -------------------------------------------------------------------------------


def items(distill_url: str) -> list[dict[str, Any]]:
    with get_engine(distill_url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT * FROM qa_item ORDER BY source_pmid, profile, ordinal"))]


def scalar(distill_url: str, sql: str) -> Any:
    with get_engine(distill_url).connect() as conn:
        return conn.execute(text(sql)).scalar_one()


def llm_keys(distill_url: str) -> set[str]:
    with get_engine(distill_url).connect() as conn:
        return set(conn.execute(text("SELECT cache_key FROM llm_call")).scalars())


def pending_sources(distill_url: str, model: str, run_id: str, limit: int) -> list[int]:
    with get_engine(distill_url).connect() as conn:
        uis = subtree_descriptor_uis(conn, SUBTREE)
        return select_sources(conn, SUBTREE, uis, model, run_id, limit)


def check_reconciled(
    distill_url: str, summary: dict[str, Any], n_profiles: int = 2
) -> list[dict[str, Any]]:
    """Everything the issue asks of one run's summary against the stored rows."""
    assert summary["reconciled"] is True
    rows = [r for r in items(distill_url) if r["run_id"] == summary["run_id"]]
    assert len({(r["source_pmid"], r["profile"], r["ordinal"]) for r in rows}) == len(rows)
    by_state = Counter(r["state"] for r in rows)
    assert set(by_state) <= set(TERMINAL)
    assert {s: by_state.get(s, 0) for s in FLAT} == {s: summary[s] for s in FLAT}
    assert summary["candidates"] == len(rows) == sum(summary[s] for s in FLAT)
    assert len({r["source_pmid"] for r in rows}) == summary["articles"]
    for r in rows:
        if r["state"] == "accepted":
            assert r["question"] and r["answer"] and r["judgement"], r
            assert r["stage"] == "answer" and r["reason"] is None and r["error"] is None, r
            assert r["cited_pmids"] and r["answer_evidence"], r
            assert set(r["cited_pmids"]) <= {c["pmid"] for c in r["contexts"]}, r
            assert (r["label"] is not None) == (r["qtype"] == "yesno"), r
        elif r["state"] == "rejected":
            assert r["reason"] and r["error"] is None, r
        elif r["state"] == "failed":
            assert r["error"] and r["reason"], r
            assert r["error"].startswith(r["reason"]), r
        else:
            assert r["reason"] == "deferred: budget exhausted" and r["error"] is None, r
        if r["question"] is None:
            assert (r["stage"], r["ordinal"]) == ("generate", 0), r
            assert r["state"] in ("failed", "deferred"), r
    # Per-stage counts: what entered a stage is what entered the one before minus what
    # ended there.
    ended = Counter(r["stage"] for r in rows)
    stages = summary["stages"]
    assert stages["generate"] == summary["articles"] * n_profiles
    entered = len(rows)
    for stage in ("retrieve", "grade", "judge", "answer"):
        previous = {"retrieve": "generate", "grade": "retrieve", "judge": "grade",
                    "answer": "judge"}[stage]
        entered -= ended[previous]
        assert stages.get(stage, 0) == entered, (stage, stages, dict(ended))
    assert entered == ended["answer"]
    # a candidate may have several reasons ("clarity 2 < 3; safety 3 < 4"), never none
    assert sum(summary["reasons"].values()) >= summary["rejected"] + summary["failed"]
    return rows


def check_pairs(distill_url: str, margin: float = 0.05) -> int:
    with get_engine(distill_url).connect() as conn:
        pairs = conn.execute(text(
            """
            SELECT p.*, c.source_pmid AS c_pmid, c.ordinal AS c_ord, c.profile AS c_prof,
                   c.hierarchy_score AS c_score, c.state AS c_state, r.source_pmid AS r_pmid,
                   r.ordinal AS r_ord, r.profile AS r_prof, r.hierarchy_score AS r_score
            FROM preference_pair p JOIN qa_item c ON c.id = p.chosen_id
            JOIN qa_item r ON r.id = p.rejected_id
            """)).all()
    for p in pairs:
        assert p.c_pmid == p.r_pmid == p.source_pmid
        assert p.c_ord == p.r_ord == p.ordinal
        assert p.c_prof != p.r_prof
        assert p.c_score >= p.r_score
        assert p.margin >= margin - 1e-6
        assert p.margin == pytest.approx(p.c_score - p.r_score, abs=1e-5)
        assert p.c_state == "accepted"
    return len(pairs)


def offline() -> LLMConfig:
    return LLMConfig(backend="offline")


def snapshot(distill_url: str) -> dict[tuple[int, str, int], tuple[int, str]]:
    return {(r["source_pmid"], r["profile"], r["ordinal"]): (r["id"], r["state"])
            for r in items(distill_url)}


# -- offline ------------------------------------------------------------------------------


def test_offline_run_ends_every_candidate_once_and_reconciles(distill_url: str) -> None:
    summary = distill_subtree(SUBTREE, run_id="off-1", settings=SETTINGS, llm=offline(),
                              database_url=distill_url)
    assert summary["articles"] == SETTINGS["max_articles"]
    assert summary["backend"] == "offline"
    rows = check_reconciled(distill_url, summary)
    assert summary["accepted"] > 0
    assert summary["candidates"] == len(items(distill_url))
    assert all(r["backend"] == "offline" and r["params"]["questions_per_article"] == 2
               for r in rows)
    assert check_pairs(distill_url) == summary["preference_pairs"]
    assert summary["llm"]["misses"] == summary["llm"]["stored"] == len(llm_keys(distill_url))


def test_rerun_of_the_same_run_makes_no_calls_and_no_duplicates(
    distill_url: str, grader: MeshGrader
) -> None:
    first = distill(distill_url, "off-1", offline(), grader)
    before, calls = snapshot(distill_url), llm_keys(distill_url)
    pairs = scalar(distill_url, "SELECT count(*) FROM preference_pair")

    again = distill(distill_url, "off-1", offline(), grader)
    assert again["llm"]["misses"] == 0 and again["llm"]["stored"] == 0
    assert again["llm"]["hits"] == first["llm"]["misses"]
    assert llm_keys(distill_url) == calls
    assert snapshot(distill_url) == before
    assert scalar(distill_url, "SELECT count(*) FROM preference_pair") == pairs
    assert {k: again[k] for k in (*FLAT, "candidates", "articles")} == {
        k: first[k] for k in (*FLAT, "candidates", "articles")}

    # Another run with the same limit takes the next pending articles.
    expected = pending_sources(distill_url, first["model"], "off-2", SETTINGS["max_articles"])
    assert not set(expected) & {k[0] for k in before}
    second = distill(distill_url, "off-2", offline(), grader)
    rows = check_reconciled(distill_url, second)
    assert {r["source_pmid"] for r in rows} == set(expected)
    assert {k: v for k, v in snapshot(distill_url).items() if k in before} == before
    assert second["llm"]["hits"] == 0


def test_rewriting_a_run_with_fewer_questions_leaves_no_stale_rows(
    distill_url: str, grader: MeshGrader
) -> None:
    first = distill(distill_url, "off-1", offline(), grader)
    assert first["candidates"] == 6 * 2 * 2
    settings = {**SETTINGS, "questions_per_article": 1, "redo": True}
    again = distill(distill_url, "off-1", offline(), grader, settings)
    rows = check_reconciled(distill_url, again)
    assert len(rows) == len(items(distill_url)) == again["candidates"] == 6 * 2
    assert all(r["ordinal"] == 0 and r["params"]["questions_per_article"] == 1 for r in rows)
    assert check_pairs(distill_url) == again["preference_pairs"]


def test_one_profile_makes_no_pairs(distill_url: str, grader: MeshGrader) -> None:
    summary = distill(distill_url, "off-1", offline(), grader,
                      {**SETTINGS, "profiles": ["general"]})
    rows = check_reconciled(distill_url, summary, n_profiles=1)
    assert {r["profile"] for r in rows} == {"general"}
    assert summary["preference_pairs"] == 0 == check_pairs(distill_url)


# -- openai: faults -----------------------------------------------------------------------


class FaultyOpenAI(FakeOpenAI):
    """FakeOpenAI that also answers chosen prompts badly every time (until cleared).

    ``poison_500``: first user messages answered with HTTP 500 (a call that fails after
    all its attempts); ``poison_json``: first user messages answered with text that is not
    JSON, the repair round included. The first request of a kind picks the prompt.
    """

    def __init__(self) -> None:
        super().__init__(self._reply, latency=0.01)
        self.poison_500: set[str] = set()
        self.poison_json: set[str] = set()
        self.arm = {"500": False, "json": False}

    @staticmethod
    def _user(body: dict[str, Any]) -> str:
        return next(m["content"] for m in body["messages"] if m["role"] == "user")

    def _reply(self, body: dict[str, Any]) -> str:
        user = self._user(body)
        system = body["messages"][0]["content"]
        with self._lock:
            if self.arm["json"] and system.startswith("You answer biomedical"):
                self.arm["json"] = False
                self.poison_json.add(user)
            bad = user in self.poison_json
        return "I cannot produce JSON today" if bad else realistic_responder(body)

    async def _chat(self, request: Request) -> JSONResponse:
        # A poisoned request takes no injected fault: those all land on other calls.
        body = await request.json()  # starlette caches the body for the parent's read
        user = self._user(body)
        with self._lock:
            if self.arm["500"] and "reading-comprehension" in body["messages"][0]["content"]:
                self.arm["500"] = False
                self.poison_500.add(user)
            if user in self.poison_500:
                self.requests.append(RecordedRequest(time.monotonic(), body, 500))
                return JSONResponse({"error": {"message": "boom", "type": "server_error",
                                               "param": None, "code": None}}, 500)
        return await super()._chat(request)


@pytest.fixture
def faulty() -> Iterator[FaultyOpenAI]:
    server = FaultyOpenAI()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def openai_config(server: FakeOpenAI, **kw: Any) -> LLMConfig:
    return LLMConfig(**{"backend": "openai", "base_url": server.url, "model": MODEL,
                        "api_key": "sk-test", "max_concurrency": 4, "timeout": 1.0,
                        "max_attempts": 3, **kw})


def _messages(r: RecordedRequest) -> str:
    return json.dumps(r.body["messages"], sort_keys=True)


@pytest.mark.parametrize("client_process", [False, True], ids=["in-loop", "client-process"])
def test_openai_run_with_faults_completes_and_a_rerun_finishes_the_failed(
    distill_url: str, faulty: FaultyOpenAI, grader: MeshGrader, client_process: bool
) -> None:
    """The same faults, retries, failures and reruns whether the SDK runs on the run's
    event loop or in its own process (:mod:`meshdistill.llm.client_process`)."""
    concurrency, attempts = 4, 3
    config = openai_config(faulty, max_concurrency=concurrency, max_attempts=attempts,
                           client_process=client_process)
    faulty.arm.update({"500": True, "json": True})
    injected = {"429": 3, "500": 2, "hang": 1, "invalid_json": 1}
    faulty.fail_next(2, "429", retry_after=0.1)
    faulty.fail_next(2, "500")
    faulty.fail_next(1, "hang", hang=1.05)
    faulty.fail_next(1, "invalid_json")
    faulty.fail_next(1, "429", retry_after=0.1)

    summary = distill(distill_url, "oa-1", config, grader)
    rows = check_reconciled(distill_url, summary)
    assert summary["backend"] == "openai" and summary["articles"] == 6
    assert not faulty._faults, "every injected fault was served"
    # Exactly the two poisoned calls fail; every transient fault was retried away.
    assert summary["failed"] == 2, summary["reasons"]
    assert summary["deferred"] == 0
    failed = [r for r in rows if r["state"] == "failed"]
    assert sorted((r["stage"], r["error"].split(":")[0]) for r in failed) == [
        ("answer", "invalid_output"), ("generate", "server_error")]
    gen_failed = next(r for r in failed if r["stage"] == "generate")
    assert gen_failed["profile"] == "general" and gen_failed["question"] is None
    assert "HTTP 500" in gen_failed["error"]
    assert summary["reasons"]["generate: server_error"] == 1
    assert summary["reasons"]["answer: invalid_output"] == 1
    assert summary["accepted"] > 0
    check_pairs(distill_url)

    # Retries stay bounded, and every retry is explained by a fault.
    reqs = list(faulty.requests)
    statuses = Counter(r.status for r in reqs)
    assert statuses[429] == injected["429"]
    assert statuses[500] == injected["500"] + attempts  # the poisoned call: every attempt
    misses = summary["llm"]["misses"]
    repairs = len({_messages(r) for r in reqs
                   if any(m["role"] == "assistant" for m in r.body["messages"])})
    assert repairs == 2  # the injected invalid JSON (repaired) and the poisoned answer
    assert len(reqs) <= (misses + repairs) * attempts
    faulted = [r for r in reqs if r.status in (429, 500) or r.fault == "hang"]
    assert len(faulted) == injected["429"] + injected["500"] + injected["hang"] + attempts
    # one request per round, plus one per fault that was not on a call's last attempt
    assert len(reqs) == misses + repairs + len(faulted) - 1
    assert faulty.max_in_flight <= concurrency + injected["hang"]  # a hung handler lingers
    # The repaired call (injected invalid JSON) succeeded and is in the cache; so is the
    # poisoned answer, the model's own unusable reply. The server error is not.
    assert summary["llm"]["stored"] == misses - 1
    assert len(llm_keys(distill_url)) == summary["llm"]["stored"]

    # Rerun of the same DAG run, the faults gone: the call the server failed is made
    # again; the model's unusable answer is replayed from the cache, like every answer
    # that succeeded, and its candidate fails the same way without a request.
    server_failed = set(faulty.poison_500)
    faulty.poison_500.clear()
    faulty.poison_json.clear()
    before, keys = snapshot(distill_url), llm_keys(distill_url)
    faulty.reset_stats()
    again = distill(distill_url, "oa-1", config, grader)
    rows2 = check_reconciled(distill_url, again)
    assert again["failed"] == 1 and again["deferred"] == 0
    assert again["reasons"] == {**again["reasons"], "answer: invalid_output": 1}
    assert {r["source_pmid"] for r in rows2} == {r["source_pmid"] for r in rows}
    assert len(faulty.requests) == again["llm"]["misses"] == again["llm"]["stored"]
    assert again["llm"]["hits"] == len(keys)
    assert len(llm_keys(distill_url)) == len(keys) + again["llm"]["stored"]
    first_round = {_messages(r) for r in reqs}
    repeated = [r for r in faulty.requests if _messages(r) in first_round]
    assert {FaultyOpenAI._user(r.body) for r in repeated} == server_failed
    for key, (item_id, state) in before.items():
        if state != "failed":
            assert snapshot(distill_url)[key] == (item_id, state)
    after = {(r["source_pmid"], r["profile"], r["ordinal"]): r for r in rows2}
    for r in failed:
        state = after[(r["source_pmid"], r["profile"], r["ordinal"])]["state"]
        assert state in ({"failed"} if r["stage"] == "answer" else {"accepted", "rejected"})
    # the general profile's generation now produced questions
    assert sum(1 for r in rows2 if r["source_pmid"] == gen_failed["source_pmid"]
               and r["profile"] == "general") == SETTINGS["questions_per_article"]

    # And a third run of the same DAG run asks the server nothing.
    settled = snapshot(distill_url)
    faulty.reset_stats()
    third = distill(distill_url, "oa-1", config, grader)
    assert faulty.requests == [] and third["llm"]["misses"] == 0
    assert snapshot(distill_url) == settled


# -- budget -------------------------------------------------------------------------------


def test_budget_stops_cleanly_and_the_next_run_finishes(distill_url: str,
                                                         grader: MeshGrader) -> None:
    settings = {**SETTINGS, "max_articles": 4}
    with FakeOpenAI(realistic_responder, latency=0.01) as server:
        config = openai_config(server)
        first = distill(distill_url, "b-1", config, grader, settings, budget_tokens=20_000)
        rows = check_reconciled(distill_url, first)
        assert first["deferred"] > 0 and first["failed"] == 0
        budget = first["budget"]
        assert budget["exhausted"] is True and budget["deferred"] > 0
        assert budget["limit_tokens"] == 20_000 and 0 < budget["spent_tokens"] <= 20_000
        assert first["llm"]["misses"] == first["llm"]["stored"] + first["llm"]["deferred"]
        assert len(server.requests) == first["llm"]["stored"]
        deferred = [r for r in rows if r["state"] == "deferred"]
        assert all(r["error"] is None for r in deferred)
        deferred_pmids = {r["source_pmid"] for r in deferred}
        first_bodies = {_messages(r) for r in server.requests}
        server.reset_stats()

        # More pending articles exist; the deferred ones must come first.
        assert len(pending_sources(distill_url, MODEL, "b-2", 100)) > len(deferred_pmids)
        second = distill(distill_url, "b-2", config, grader,
                         {**settings, "max_articles": len(deferred_pmids)},
                         budget_tokens=10_000_000)
        rows2 = check_reconciled(distill_url, second)
        assert {r["source_pmid"] for r in rows2} == deferred_pmids
        assert second["deferred"] == second["failed"] == 0
        assert second["budget"]["exhausted"] is False
        assert scalar(distill_url, "SELECT count(*) FROM qa_item "
                           "WHERE state IN ('deferred', 'failed')") == 0
        # Only the deferred work was asked for; run 1's answers came from the cache.
        assert not {_messages(r) for r in server.requests} & first_bodies
        assert len(server.requests) == second["llm"]["misses"] == second["llm"]["stored"]
        if deferred_pmids == {r["source_pmid"] for r in rows}:
            assert second["llm"]["hits"] == first["llm"]["stored"]


# -- CLI ----------------------------------------------------------------------------------


def test_cli_distill_and_status(
    distill_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHDISTILL_DATABASE_URL", distill_url)
    for var in ("MESHDISTILL_LLM_BACKEND", "OPENAI_BASE_URL", "MESHDISTILL_LLM_MODEL"):
        monkeypatch.delenv(var, raising=False)
    assert main(["distill", "--subtree", SUBTREE, "--limit", "3", "--questions", "2",
                 "--run-id", "cli-1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run_id"] == "cli-1"
    [summary] = out["subtrees"]
    assert summary["subtree"] == SUBTREE and summary["articles"] == 3
    assert summary["backend"] == "offline"
    check_reconciled(distill_url, summary)

    assert main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    with get_engine(distill_url).connect() as conn:
        grouped = conn.execute(text("SELECT state, count(*) FROM qa_item GROUP BY state"))
        states: dict[str, int] = {r[0]: r[1] for r in grouped}
        llm = conn.execute(text("SELECT count(*), coalesce(sum(tokens_in + tokens_out), 0), "
                                "coalesce(sum(cost_usd), 0) FROM llm_call")).one()
    assert st["qa"] == {s: states.get(s, 0) for s in FLAT}
    assert st["qa"]["accepted"] == summary["accepted"]
    assert st["preference_pairs"] == summary["preference_pairs"]
    assert st["llm"]["calls"] == llm[0] == summary["llm"]["stored"] > 0
    assert st["llm"]["tokens"] == llm[1]
    assert st["llm"]["cost_usd"] == 0.0 == float(llm[2])


# -- the responder itself ------------------------------------------------------------------


def test_realistic_responder_quotes_the_prompt() -> None:
    from meshdistill.llm.inputs import AnswerInput, ArticleInput, GenerateInput, Passage
    from meshdistill.llm.schemas import Answer, GeneratedQuestions, QuestionType
    from meshdistill.llm.stages import answer_request, generate_request

    abstract = ("Tumour growth was measured in 40 mice.\nThe treated group grew 50% less. "
                "No toxicity was seen in any animal.")
    article = ArticleInput("123", "A title", abstract, ancestry=("Neoplasms",))
    for profile in ("domain", "general"):
        req = generate_request(GenerateInput(article, profile, 3,
                                             (QuestionType.YESNO, QuestionType.LIST)))
        out = GeneratedQuestions.model_validate_json(
            realistic_responder({"messages": list(req.messages)}))
        assert [q.type for q in out.questions] == [QuestionType.YESNO, QuestionType.LIST,
                                                   QuestionType.YESNO]
        assert all(q.evidence in abstract for q in out.questions)
    q = out.questions[0]
    ctx = (Passage("123", "A title", abstract), Passage("77", "Other", "Mice were fed well. Ok."))
    req2 = answer_request(AnswerInput(q, ctx))
    ans = Answer.model_validate_json(realistic_responder({"messages": list(req2.messages)}))
    assert ans.cited_pmids == ["123", "77"] and ans.label is not None
    assert all(e in abstract or e in "Mice were fed well. Ok." for e in ans.evidence)
    assert sentences("Short. A much longer sentence follows here.") == [
        "A much longer sentence follows here."]
