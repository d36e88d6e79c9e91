"""The Postgres-backed NCBI rate limiter: one spacing across threads and processes.

Processes are started with ``spawn`` (fresh interpreters, their own engines), as Airflow
workers would be, and released together by a barrier so their requests really contend.
What NCBI sees is checked at a local server that timestamps arrivals, with the CPU busy.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import subprocess
import sys
import threading
import time
import uuid
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from meshdistill.config import Settings
from meshdistill.pubmed.eutils import EutilsClient
from meshdistill.pubmed.ratelimit import SPACING, PostgresRateLimiter, ncbi_rate
from meshdistill.store.db import get_engine
from sqlalchemy import create_engine, text

from tests.fakes.eutils_server import FakeEutils, metapub_corpus

pytestmark = pytest.mark.integration

# How late a woken sleeper may run is up to the OS (the machine may be busy): the tests
# check what the limiter controls, i.e. slot spacing and that nobody goes before its slot.
EARLY = 0.005
# For sends observed at the HTTP server: a generous allowance for a late first request.
LATE = 0.1


def _clock_offset(url: str) -> tuple[float, float]:
    """(database clock - local clock, uncertainty): slots are on the server's clock."""
    engine = get_engine(url)
    with engine.connect() as conn:
        best = (0.0, float("inf"))
        for _ in range(5):
            before = time.time()
            server = conn.execute(
                text("SELECT extract(epoch FROM clock_timestamp())::float8")
            ).scalar_one()
            after = time.time()
            if after - before < best[1]:
                best = (server - (before + after) / 2, after - before)
    return best


def _acquire_in_process(
    url: str, name: str, rate: float, n: int, barrier: Barrier, out: mp.Queue
) -> None:
    """Child process: its own engine, then ``n`` acquires; reports (slot, woke, pid)."""
    engine = create_engine(url, pool_pre_ping=True)
    limiter = PostgresRateLimiter(engine, rate, name=name)
    with engine.connect() as conn:  # connect before the race starts
        conn.execute(text("SELECT 1"))
    barrier.wait(timeout=60)
    rows = []
    for _ in range(n):
        slot = limiter.acquire()
        rows.append((slot.at, time.time(), mp.current_process().pid))
    out.put(rows)
    engine.dispose()


def _check_spacing(
    rows: list[tuple[float, float, int | None]], rate: float, url: str
) -> None:
    interval = 1 / rate
    offset, uncertainty = _clock_offset(url)
    slots = sorted(r[0] for r in rows)
    assert len(set(slots)) == len(slots)
    # The reservations are exactly one interval apart, whoever made them...
    assert min(b - a for a, b in itertools.pairwise(slots)) >= interval - 1e-6
    # ...and every caller slept until its own slot before going on.
    for slot, woke, _ in rows:
        assert woke + offset >= slot - EARLY - uncertainty


def test_ncbi_rates() -> None:
    assert ncbi_rate(None) == 3.0
    assert ncbi_rate("") == 3.0
    assert ncbi_rate("key") == 10.0


def test_spacing_across_processes(database_url: str) -> None:
    rate, per_process = 25.0, 8
    name = f"test-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    out: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_acquire_in_process,
            args=(database_url, name, rate, per_process, barrier, out),
        )
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    rows = [r for _ in procs for r in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(rows) == 2 * per_process
    _check_spacing(rows, rate, database_url)
    # The two processes really contended: their slots interleave.
    order = [pid for _, _, pid in sorted(rows)]
    switches = sum(1 for a, b in itertools.pairwise(order) if a != b)
    assert switches >= 2


def test_spacing_across_threads(database_url: str) -> None:
    rate, threads, per_thread = 40.0, 4, 5
    limiter = PostgresRateLimiter(get_engine(database_url), rate, name=f"t-{uuid.uuid4().hex}")
    rows: list[tuple[float, float, int | None]] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            slot = limiter.acquire()
            with lock:
                rows.append((slot.at, time.time(), threading.get_ident()))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(rows) == threads * per_thread
    _check_spacing(rows, rate, database_url)


def test_first_slot_is_immediate_and_row_is_shared(database_url: str) -> None:
    name = f"first-{uuid.uuid4().hex[:8]}"
    engine = get_engine(database_url)
    a = PostgresRateLimiter(engine, 5.0, name=name)
    b = PostgresRateLimiter(database_url, 5.0, name=name)  # a second limiter, same row
    started = time.perf_counter()
    first = a.acquire()
    second = b.acquire()
    elapsed = time.perf_counter() - started
    assert first.waited == 0.0  # a new limiter name: the first slot is now
    assert a.interval == b.interval == pytest.approx(SPACING / 5.0)
    assert second.at - first.at == pytest.approx(a.interval, abs=1e-3)
    assert elapsed >= a.interval - EARLY  # the second caller slept to its slot
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT count(*) FROM rate_limit_slot WHERE name = :n"), {"n": name}
        ).scalar_one()
    assert rows == 1


def test_clients_share_the_limit_at_the_server(database_url: str) -> None:
    """Two clients (as two mapped tasks would be) together keep the rate NCBI sees."""
    rate, n = 10.0, 4
    name = f"clients-{uuid.uuid4().hex[:8]}"
    engine = get_engine(database_url)
    with FakeEutils(metapub_corpus()) as fake:
        clients = [
            EutilsClient(fake.base_url, limiter=PostgresRateLimiter(engine, rate, name=name))
            for _ in range(2)
        ]

        def work(client: EutilsClient) -> None:
            for _ in range(n):
                client.efetch_ids(["219391"])

        pool = [threading.Thread(target=work, args=(c,)) for c in clients]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        for c in clients:
            c.close()
        arrivals = sorted(r.time for r in fake.requests)
    assert len(arrivals) == 2 * n
    # Unlimited, 8 local requests take a few ms; limited, 7 intervals of 0.1 s.
    assert arrivals[-1] - arrivals[0] >= (2 * n - 1) / rate - LATE
    # No more than `rate` requests reached the server in any one second.
    assert _busiest_second(arrivals) <= rate


def _busiest_second(arrivals: list[float]) -> int:
    """The most arrivals in any window [a, a + 1 s) starting at an arrival."""
    return max(sum(1 for t in arrivals if a <= t < a + 1.0) for a in arrivals)


def _fetch_in_process(
    url: str, base_url: str, name: str, rate: float, n: int, barrier: Barrier
) -> None:
    """Child process: its own engine and client, then ``n`` efetch calls."""
    engine = create_engine(url, pool_pre_ping=True)
    with engine.connect() as conn:  # connect before the race starts
        conn.execute(text("SELECT 1"))
    with EutilsClient(base_url, limiter=PostgresRateLimiter(engine, rate, name=name)) as client:
        barrier.wait(timeout=60)
        for _ in range(n):
            client.efetch_ids(["219391"])
    engine.dispose()


def test_no_second_exceeds_the_limit_on_a_busy_machine(database_url: str) -> None:
    """Two processes and two threads at 10/s while two busy loops load both cores.

    Sleep overshoot and send delays vary under load; whatever they do, no one-second
    window at the server holds more than 10 requests (NCBI's limit with a key), and the
    server's own 10-per-second check never answers 429.
    """
    rate, limit, per_client = 10.0, 10, 6
    name = f"busy-{uuid.uuid4().hex[:8]}"
    engine = get_engine(database_url)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        with FakeEutils(metapub_corpus(), rate_limit=limit) as fake:
            ctx = mp.get_context("spawn")
            barrier = ctx.Barrier(4)
            procs = [
                ctx.Process(
                    target=_fetch_in_process,
                    args=(database_url, fake.base_url, name, rate, per_client, barrier),
                )
                for _ in range(2)
            ]
            for p in procs:
                p.start()

            def work() -> None:
                with EutilsClient(
                    fake.base_url, limiter=PostgresRateLimiter(engine, rate, name=name)
                ) as client:
                    barrier.wait(timeout=60)
                    for _ in range(per_client):
                        client.efetch_ids(["219391"])

            pool = [threading.Thread(target=work) for _ in range(2)]
            for t in pool:
                t.start()
            try:
                for t in pool:
                    t.join(timeout=120)
                    assert not t.is_alive(), "a client thread did not finish"
                for p in procs:
                    p.join(timeout=120)
                    assert p.exitcode == 0
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                        p.join()
            requests = list(fake.requests)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert [r.status for r in requests] == [200] * (4 * per_client)
    arrivals = sorted(r.time for r in requests)
    assert _busiest_second(arrivals) <= limit
    # The margin costs no more than its share: 23 gaps of 0.11 s, plus one late start.
    assert arrivals[-1] - arrivals[0] < (4 * per_client - 1) * SPACING / rate + 1.0


def test_client_from_settings_uses_the_shared_limiter(database_url: str) -> None:
    """The pipeline's call: explicit URL/identity override settings; limiter in Postgres."""
    settings = Settings(home=Path("/nonexistent"), ncbi_email="env@example.org")
    with EutilsClient.from_settings(
        settings, base_url="http://127.0.0.1:9/eutils", api_key="k", database_url=database_url
    ) as keyed:
        assert isinstance(keyed.limiter, PostgresRateLimiter)
        assert keyed.limiter.rate == 10.0
        assert keyed.base_url == "http://127.0.0.1:9/eutils/"
        assert keyed.email == "env@example.org"
    with EutilsClient.from_settings(settings, database_url=database_url) as anonymous:
        assert anonymous.limiter.rate == 3.0
        assert anonymous.base_url == settings.eutils_url
    with EutilsClient.from_settings(settings, shared_limiter=False) as local:
        assert not isinstance(local.limiter, PostgresRateLimiter)
