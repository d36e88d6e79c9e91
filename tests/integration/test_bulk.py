"""COPY text-format escaping, round-tripped through a real ``COPY ... FROM STDIN``.

Every article's title, abstract and JSON document goes through these helpers; a value
that is escaped wrongly either breaks the whole file's COPY (a stray tab or newline shifts
columns) or silently changes the text (a backslash eaten, ``\\N`` read as NULL). Only the
server can say which, so the values are sent to PostgreSQL and read back.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from meshdistill.store.bulk import (
    copy_json,
    copy_lines,
    copy_rows,
    copy_text,
    copy_value,
    create_staging,
)
from meshdistill.store.db import get_engine
from sqlalchemy import Connection, text

pytestmark = pytest.mark.integration

TRICKY = [
    "plain",
    "",
    " leading and trailing ",
    "tab\there",
    "new\nline",
    "carriage\rreturn\r\n",
    "back\\slash",
    "ends with a backslash\\",
    "\\N",  # the two characters, not NULL
    "a\\Nb",
    "\\.",  # COPY's end-of-data marker, as a value
    "\\t is not a tab",
    "vertical\x0btab and form\x0cfeed and bell\x07",
    'quotes " and \' and ``',
    "NF-κB, 13C, ≥65 years, 日本語, 🧬",
    "κB\tα\\β\nγ\r– and a tab, a backslash, a newline among non-ASCII letters",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "x" * 100_000,
]


@pytest.fixture(scope="module")
def url(make_database: Callable[[], str]) -> str:
    """One database for the module: these tests only use temporary tables."""
    database = make_database()
    get_engine(database)
    return database


@pytest.fixture
def conn(url: str) -> Iterator[Connection]:
    with get_engine(url).connect() as connection, connection.begin() as tx:
        yield connection
        tx.rollback()


def test_text_round_trip(conn: Connection) -> None:
    create_staging(conn, "t", "id integer, v text")
    sent = copy_rows(conn, "t", ("id", "v"), [(i, v) for i, v in enumerate(TRICKY)])
    assert sent == len(TRICKY)
    back = [r[0] for r in conn.execute(text("SELECT v FROM t ORDER BY id"))]
    assert back == TRICKY


def test_copy_text_and_none(conn: Connection) -> None:
    create_staging(conn, "t", "id integer, v text")
    lines = [f"{i}\t{copy_text(v)}\n" for i, v in enumerate([*TRICKY, None])]
    copy_lines(conn, "t", ("id", "v"), lines)
    back = [r[0] for r in conn.execute(text("SELECT v FROM t ORDER BY id"))]
    assert back == [*TRICKY, None]
    assert copy_text(None) == "\\N" and copy_text("\\N") == "\\\\N"


def test_json_round_trip(conn: Connection) -> None:
    docs: list[Any] = [
        {"sections": [{"label": "BACKGROUND", "category": None, "text": v} for v in TRICKY]},
        {"mesh": [["D009369", "Neoplasms", True, ["genetics"]]], "keywords": []},
        ["\\", "\\\\", '"', "\n", "\t", "\\N", "\u2028"],
        {"nested": {"deep": [1, 2.5, None, False, {"κ": "日本"}]}},
        "a string",
        None,
    ]
    create_staging(conn, "t", "id integer, doc jsonb, j json")
    lines = [f"{i}\t{copy_json(d)}\t{copy_json(d)}\n" for i, d in enumerate(docs)]
    copy_lines(conn, "t", ("id", "doc", "j"), lines)
    rows = conn.execute(text("SELECT doc::text, j::text FROM t ORDER BY id")).all()
    assert [json.loads(b) for b, _ in rows] == docs
    assert [json.loads(j) for _, j in rows] == docs  # json keeps the text as sent


def test_copy_value_types(conn: Connection) -> None:
    create_staging(conn, "t", "id integer, b boolean, n bigint, f double precision, "
                              "s text, d date, doc jsonb")
    rows = [
        (1, True, 2**40, 0.1, "tab\there", "2021-02-28", {"a": ["\\", "\n"]}),
        (2, False, -1, -1e-300, "", "1976-09-28", [1, "x"]),
        (3, None, None, None, None, None, None),
    ]
    copy_rows(conn, "t", ("id", "b", "n", "f", "s", "d", "doc"), rows)
    back = conn.execute(text("SELECT id, b, n, f, s, d::text, doc FROM t ORDER BY id")).all()
    assert [tuple(r) for r in back] == rows
    assert copy_value(True) == "t" and copy_value(False) == "f" and copy_value(None) == "\\N"
    assert copy_rows(conn, "t", ("id",), []) == 0


def test_random_strings_round_trip(conn: Connection) -> None:
    """Many random strings over an alphabet of the characters COPY treats specially."""
    rng = random.Random(20240501)
    alphabet = ["\\", "\t", "\n", "\r", "N", ".", "a", " ", "κ", "\x0b", '"', "'", "🧬"]
    values = ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(2_000)]
    create_staging(conn, "t", "id integer, v text, doc jsonb")
    copy_rows(conn, "t", ("id", "v", "doc"), [(i, v, {"v": v}) for i, v in enumerate(values)])
    back = conn.execute(text("SELECT v, doc FROM t ORDER BY id")).all()
    assert [r[0] for r in back] == values
    assert [r[1]["v"] for r in back] == values
