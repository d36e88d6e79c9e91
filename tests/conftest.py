"""Database fixtures: every test database is a fresh one on a real PostgreSQL server.

The server is ``MESHDISTILL_TEST_DATABASE_URL`` (an admin URL) when set, else the local
server on 127.0.0.1:5432 when one answers, else an embedded ``pgserver`` started for the
session: the suite runs on a machine with no PostgreSQL at all.
"""

from __future__ import annotations

import os

from tests.support import REPO

# Airflow reads its configuration when first imported: point it at a test home before
# any test module imports it. The pipeline database is separate (fixtures below).
os.environ.setdefault("AIRFLOW_HOME", str(REPO / ".airflow"))
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from meshdistill.store import embedded
from meshdistill.store.db import dispose_engines, get_engine, normalize_url
from sqlalchemy.engine import make_url

from tests.support import load_test_corpus, load_test_mesh

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ carries the ``integration`` marker (its module's
    ``pytestmark``), so ``-m "not integration"`` really leaves out what needs servers."""
    unmarked = sorted({item.path.name for item in items
                       if "integration" in item.path.parts
                       and item.get_closest_marker("integration") is None})
    if unmarked:
        raise pytest.UsageError(
            "integration modules without pytestmark = pytest.mark.integration: "
            + ", ".join(unmarked))


def _reachable(url: str) -> bool:
    try:
        psycopg2.connect(make_url(normalize_url(url)).render_as_string(False).replace(
            "postgresql+psycopg2", "postgresql"), connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A URL with rights to create databases."""
    explicit = os.environ.get("MESHDISTILL_TEST_DATABASE_URL")
    if explicit:
        return normalize_url(explicit)
    if _reachable(LOCAL_SERVER):
        return normalize_url(LOCAL_SERVER)
    home = Path(os.environ.get("MESHDISTILL_TEST_HOME") or tmp_path_factory.mktemp("pg"))
    url = embedded.start(home)
    return str(make_url(url).set(database="postgres").render_as_string(False))


def _dsn(url: str) -> str:
    return make_url(url).render_as_string(False).replace("postgresql+psycopg2", "postgresql")


@pytest.fixture(scope="session")
def make_database(admin_url: str) -> Iterator[Callable[[], str]]:
    """Factory: a new empty database (migrated on first use); all dropped at the end."""
    created: list[str] = []

    def make() -> str:
        name = f"md_test_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(_dsn(admin_url))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn.close()
        created.append(name)
        return str(make_url(admin_url).set(database=name).render_as_string(False))

    yield make
    dispose_engines()
    conn = psycopg2.connect(_dsn(admin_url))
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in created:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


@pytest.fixture
def database_url(make_database: Callable[[], str]) -> str:
    """A fresh, migrated database for one test."""
    url = make_database()
    get_engine(url)
    return url


@pytest.fixture(scope="session")
def mesh_loaded_url(make_database: Callable[[], str]) -> str:
    """One database per session with the 2023 MeSH trees (UIs joined from 2017) loaded.

    Tests that write articles into it must only assert on what they wrote themselves.
    """
    url = make_database()
    load_test_mesh(url)
    return url


@pytest.fixture
def fresh_mesh_url(make_database: Callable[[], str]) -> str:
    """A fresh database with MeSH loaded, for tests that count everything."""
    url = make_database()
    load_test_mesh(url)
    return url


@pytest.fixture(scope="session")
def corpus_url(make_database: Callable[[], str]) -> str:
    """MeSH and the first 3,000 citations of pubmed20n0014: the distillation corpus.

    Shared by the distillation modules; each test empties the QA tables it writes.
    """
    url = make_database()
    load_test_corpus(url)
    return url


@pytest.fixture
def distill_url(corpus_url: str) -> str:
    """The distillation corpus with its QA tables and LLM cache emptied for one test."""
    from sqlalchemy import text

    with get_engine(corpus_url).begin() as conn:
        conn.execute(text("TRUNCATE qa_item, preference_pair, llm_call"))
    return corpus_url


def run_airflow(*args: str) -> None:
    """The ``airflow`` command of this environment, failing the test on a non-zero exit."""
    from meshdistill_airflow.local import airflow_cli

    airflow_cli(os.environ, *args)


@pytest.fixture(scope="session")
def airflow_metadata() -> None:
    """Airflow's metadata database (SQLite under AIRFLOW_HOME) with the project's pools,
    as `make demo` makes them."""
    from airflow.models.pool import Pool
    from meshdistill_airflow import POOLS

    run_airflow("db", "migrate")
    for name, (slots, description) in POOLS.items():
        Pool.create_or_update_pool(name, slots, description, include_deferred=False)
