"""The ``openai`` backend in a child process: the real SDK in a real second process, over
HTTP to the local server, its results crossing a real socket back to the test's loop.

What must hold: the same results as the backend run in place (so every guarantee of
``test_llm_openai`` carries over), the concurrency cap, faults and the JSON-mode fallback
seen from the parent, logs forwarded, the key never on the child's command line or in
its environment, and a child that dies costing only the calls it held.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshdistill import aio
from meshdistill.errors import ConfigError
from meshdistill.llm.backend import FailureKind, LLMResult, complete_all, start
from meshdistill.llm.client_process import ClientProcessBackend
from meshdistill.llm.config import LLMConfig, make_backend
from meshdistill.llm.inputs import ArticleInput, GenerateInput
from meshdistill.llm.openai_backend import OpenAIBackend
from meshdistill.llm.schemas import Judgement
from meshdistill.llm.stages import generate_request, narrowed

from tests.fakes.openai_server import FakeOpenAI
from tests.unit.test_llm_openai import VALID, judgement_responder, request

SECRET = "sk-test-client-process-secret"


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(judgement_responder) as fake:
        yield fake


def child(server: FakeOpenAI, **kw: Any) -> ClientProcessBackend:
    kw = {"model": "fake-model", "base_url": server.url, "api_key": SECRET,
          "backoff_initial": 0.01, "backoff_max": 0.05, "timeout": 5.0, **kw}
    return ClientProcessBackend(**kw)


def results(backend: Any, n: int) -> list[LLMResult[Judgement]]:
    async def go() -> list[LLMResult[Judgement]]:
        async with backend:
            return await complete_all(backend, [request(i) for i in range(n)])

    return aio.run(go())


def test_results_match_the_backend_run_in_place(server: FakeOpenAI) -> None:
    here = results(OpenAIBackend(model="fake-model", base_url=server.url, api_key=SECRET), 3)
    there = results(child(server), 3)
    assert [r.output for r in there] == [Judgement.model_validate(VALID)] * 3
    for a, b in zip(here, there, strict=True):
        assert (a.cache_key, a.output, a.raw_text, a.tokens_in, a.tokens_out, a.attempts,
                a.response_format, a.params, a.backend, a.model) == (
                b.cache_key, b.output, b.raw_text, b.tokens_in, b.tokens_out, b.attempts,
                b.response_format, b.params, b.backend, b.model)
    assert len(server.requests) == 6


def test_a_narrowed_request_reaches_the_server_through_the_child() -> None:
    """The choices travel with the request to the child (its inputs stay here)."""
    abstract = "Aspirin lowered the risk of colorectal cancer by 20%. It took ten years."
    req = narrowed(generate_request(GenerateInput(
        ArticleInput(pmid="1", title="T", abstract=abstract), "domain", 2)))
    with FakeOpenAI() as server:
        async def go() -> LLMResult[Any]:
            async with child(server) as backend:
                return await backend.complete(req)

        result = aio.run(go())
        sent = server.requests[-1].body["response_format"]["json_schema"]["schema"]
    assert result.ok, result.error
    assert result.cache_key == req.cache_key("fake-model") and result.params["choices"]
    assert sent["$defs"]["Question"]["properties"]["evidence"]["enum"] == [
        "Aspirin lowered the risk of colorectal cancer by 20%."]
    assert sent["properties"]["questions"]["maxItems"] == 2


def test_the_cap_holds_in_the_child() -> None:
    with FakeOpenAI(judgement_responder, latency=0.05) as server:
        out = results(child(server, max_concurrency=4), 40)
        assert all(r.ok for r in out)
        assert len(server.requests) == 40
        assert server.max_in_flight == 4  # reached, never exceeded


def test_faults_are_retried_and_reported_as_in_place(server: FakeOpenAI) -> None:
    server.fail_next(2, "429", retry_after=0.05)
    server.fail_next(1, "invalid_json")
    first, = results(child(server, max_concurrency=1), 1)
    assert first.ok and first.attempts == 4 and first.repaired  # 429, 429, bad JSON, fixed
    server.fail_next(3, "500")
    failed, = results(child(server, max_attempts=3), 1)
    assert failed.failure is FailureKind.SERVER_ERROR and "HTTP 500" in (failed.error or "")
    assert failed.attempts == 3


def test_json_mode_fallback_is_seen_and_logged_by_the_parent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with FakeOpenAI(judgement_responder, reject_json_schema=True) as server:
        backend = child(server)

        async def one_then_another() -> list[LLMResult[Judgement]]:
            async with backend:
                return [await backend.complete(request(1)), await backend.complete(request(2))]

        with caplog.at_level(logging.INFO, logger="meshdistill"):
            out = aio.run(one_then_another())
        assert all(r.ok and r.response_format == "json_object" for r in out)
        assert backend.structured_outputs is False
        assert server.statuses == [400, 200, 200]  # one child, one probe
        forwarded = [r for r in caplog.records if "refused response_format" in r.getMessage()]
        assert forwarded and forwarded[0].name == "meshdistill.llm.openai_backend"
        assert forwarded[0].process != os.getpid()  # it happened in the child
    assert SECRET not in caplog.text


def test_the_key_is_not_on_the_command_line_nor_in_the_environment(
    server: FakeOpenAI,
) -> None:
    backend = child(server)

    async def go() -> tuple[bytes, bytes]:
        async with backend:
            assert (await backend.complete(request())).ok
            assert backend.pid is not None
            proc = Path(f"/proc/{backend.pid}")
            return (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()

    cmdline, environ = aio.run(go())
    assert b"meshdistill.llm.client_process" in cmdline
    assert SECRET.encode() not in cmdline and SECRET.encode() not in environ
    assert SECRET not in repr(backend)


def test_a_dead_child_fails_only_its_calls_and_the_next_call_starts_another() -> None:
    with FakeOpenAI(judgement_responder, latency=1.0) as server:
        backend = child(server, max_concurrency=8)

        async def go() -> tuple[list[LLMResult[Judgement]], LLMResult[Judgement], int, int]:
            async with backend:
                calls = asyncio.gather(*(backend.complete(request(i)) for i in range(5)))
                while len(server.requests) + server.in_flight < 5:  # all five sent
                    await asyncio.sleep(0.01)
                first = backend.pid
                assert first is not None
                os.kill(first, signal.SIGKILL)
                lost = await calls
                server.latency = 0.0
                after = await backend.complete(request(9))
                assert backend.pid is not None
                return list(lost), after, first, backend.pid

        lost, after, first, second = aio.run(go())
        assert all(r.failure is FailureKind.CONNECTION for r in lost)
        assert all("LLM client process" in (r.error or "") and "ended" in (r.error or "")
                   for r in lost)
        assert after.ok and second != first


def test_close_stops_the_child(server: FakeOpenAI) -> None:
    backend = child(server)

    async def go() -> int:
        await backend.complete(request())
        pid = backend.pid
        assert pid is not None
        await backend.aclose()
        return pid

    pid = aio.run(go())
    assert backend.pid is None
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_config_chooses_the_child_process(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}
    monkeypatch.delenv("MESHDISTILL_LLM_CLIENT_PROCESS", raising=False)
    assert type(make_backend(LLMConfig(**base))) is ClientProcessBackend  # the default
    assert type(make_backend(LLMConfig(**base, client_process=False))) is OpenAIBackend
    monkeypatch.setenv("MESHDISTILL_LLM_CLIENT_PROCESS", "0")
    assert type(make_backend(LLMConfig(**base))) is OpenAIBackend
    assert type(make_backend(LLMConfig(**base, client_process=True))) is ClientProcessBackend
    extra = LLMConfig.from_extra("127.0.0.1:9", None, {"client_process": True, "model": "m"})
    assert extra.in_child_process is True
    assert type(make_backend(LLMConfig(backend="offline"))).__name__ == "OfflineBackend"
    monkeypatch.setenv("MESHDISTILL_LLM_CLIENT_PROCESS", "maybe")
    with pytest.raises(ConfigError, match="MESHDISTILL_LLM_CLIENT_PROCESS"):
        make_backend(LLMConfig(**base))


def test_a_child_that_cannot_start_is_not_respawned_for_every_call(
    server: FakeOpenAI,
) -> None:
    backend = child(server)
    backend.python = "/bin/false"  # a "child" that exits at once with status 1

    async def go() -> list[LLMResult[Judgement]]:
        return [await backend.complete(request(i)) for i in range(6)]

    out = aio.run(go())
    assert all(r.failure is FailureKind.CONNECTION for r in out)
    assert all("ended" in (r.error or "") for r in out[:3]), [r.error for r in out]
    assert all("3 times in a row without answering" in (r.error or "") for r in out[3:])
    assert server.requests == []


def test_start_returns_once_the_child_is_ready_and_the_first_call_reuses_it(
    server: FakeOpenAI,
) -> None:
    backend = child(server)

    async def go() -> tuple[int | None, bool, int | None, LLMResult[Judgement]]:
        async with backend:
            await start(backend)  # the helper a run calls while it prepares
            pid = backend.pid
            link = backend._link
            ready = link is not None and link.ready.is_set() and not link.closed
            result = await backend.complete(request())
            return pid, ready, backend.pid, result

    pid, ready, pid_after, result = aio.run(go())
    assert pid is not None and ready
    assert pid_after == pid and result.ok  # no second child
    assert len(server.requests) == 1  # starting sent no request


def test_start_of_a_child_that_cannot_start_does_not_raise(server: FakeOpenAI) -> None:
    backend = child(server)
    backend.python = "/bin/false"

    async def go() -> LLMResult[Judgement]:
        await backend.start()  # returns: the child ended; calls report it
        return await backend.complete(request())

    result = aio.run(go())
    assert result.failure is FailureKind.CONNECTION and "ended" in (result.error or "")
    assert server.requests == []
