"""The E-utilities client against a local E-utilities server over real HTTP.

The server (tests/fakes/eutils_server.py) serves real PubMed records and answers in
NCBI's formats; faults (429 with Retry-After, 500, slow answers) are injected there, so
retries, backoff and rate limiting run exactly as they would against NCBI.
"""

from __future__ import annotations

import io
import itertools
import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime

import pytest
from meshdistill.errors import EutilsError
from meshdistill.fileio import read_bytes
from meshdistill.httputil import parse_retry_after
from meshdistill.pubmed.eutils import EutilsClient, parse_esearch
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.ratelimit import LocalRateLimiter
from meshdistill.pubmed.records import Article

from tests.fakes.eutils_server import (
    FakeArticle,
    FakeEutils,
    baseline_corpus,
    explode_from_mtrees,
    metapub_corpus,
)
from tests.support import EUTILS_DIR

BIOPYTHON = EUTILS_DIR / "biopython"
API_KEY = "k3y-do-not-leak-0123456789"
MAY_FROM, MAY_TO = date(1977, 5, 2), date(1977, 5, 31)


@pytest.fixture(scope="module")
def corpus() -> tuple[FakeArticle, ...]:
    return baseline_corpus(date(1977, 4, 1), date(1977, 7, 31)) + metapub_corpus()


@pytest.fixture(scope="module")
def explode() -> dict[str, set[str]]:
    return explode_from_mtrees(["Neoplasms"])


@pytest.fixture
def fake(corpus: tuple[FakeArticle, ...], explode: dict[str, set[str]]) -> Iterator[FakeEutils]:
    with FakeEutils(corpus, explode=explode) as server:
        yield server


def make_client(fake: FakeEutils, **kwargs: object) -> EutilsClient:
    options: dict[str, object] = {
        "email": "dev@example.org",
        "tool": "meshdistill-tests",
        "api_key": API_KEY,
        "limiter": LocalRateLimiter(500),
        "backoff_initial": 0.01,
        "max_attempts": 3,
    }
    options.update(kwargs)
    return EutilsClient(fake.base_url, **options)  # type: ignore[arg-type]


def expected_neoplasms(
    corpus: tuple[FakeArticle, ...], explode: dict[str, set[str]], lo: date, hi: date
) -> set[str]:
    names = explode["neoplasms"]
    return {a.pmid for a in corpus if a.entrez and lo <= a.entrez <= hi and a.mesh & names}


# -- esearch ---------------------------------------------------------------------------


def test_esearch_window_with_history(
    fake: FakeEutils, corpus: tuple[FakeArticle, ...], explode: dict[str, set[str]]
) -> None:
    expected = expected_neoplasms(corpus, explode, MAY_FROM, MAY_TO)
    assert len(expected) > 10  # the window has real data to find

    with make_client(fake) as client:
        result = client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)

    assert result.count == len(expected)
    assert set(result.ids) == expected
    assert result.webenv and result.webenv.startswith("MCID_")
    assert result.query_key == "1"
    assert result.query_translation is not None
    assert "1977/05/02:1977/05/31[Date - Entry]" in result.query_translation
    assert result.phrases_not_found == []
    (request,) = fake.requests
    assert request.method == "GET"
    assert request.params["mindate"] == "1977/05/02"
    assert request.params["maxdate"] == "1977/05/31"
    assert request.params["datetype"] == "edat"
    assert request.params["usehistory"] == "y"


def test_esearch_on_modification_date(
    fake: FakeEutils, corpus: tuple[FakeArticle, ...], explode: dict[str, set[str]]
) -> None:
    names = explode["neoplasms"]
    revised = sorted(a.revised for a in corpus if a.revised and a.mesh & names)
    day = revised[len(revised) // 2]
    expected = {a.pmid for a in corpus if a.revised == day and a.mesh & names}
    assert expected

    with make_client(fake) as client:
        result = client.esearch('"Neoplasms"[MeSH Terms]', day, day, datetype="mdat")

    assert fake.requests[-1].params["datetype"] == "mdat"
    assert set(result.ids) == expected
    assert result.query_translation and "[Date - Modification]" in result.query_translation


def test_esearch_rejects_unknown_datetype(fake: FakeEutils) -> None:
    with make_client(fake) as client, pytest.raises(ValueError, match="datetype"):
        client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO, datetype="pdat")
    assert fake.requests == []


def test_esearch_no_hits_unknown_phrase(fake: FakeEutils) -> None:
    with make_client(fake) as client:
        result = client.esearch('"Neoplasmz"[MeSH Terms]', MAY_FROM, MAY_TO)
    assert result.count == 0
    assert result.ids == []
    assert result.phrases_not_found == ["Neoplasmz"]
    assert "No items found." in result.warnings


def test_esearch_no_hits_in_empty_window(fake: FakeEutils) -> None:
    with make_client(fake) as client:
        result = client.esearch('"Neoplasms"[MeSH Terms]', date(1990, 1, 1), date(1990, 1, 2))
    assert (result.count, result.ids, result.phrases_not_found) == (0, [], [])


def test_parse_real_ncbi_answers() -> None:
    hits = parse_esearch(read_bytes(BIOPYTHON / "esearch2.xml.gz"))
    assert hits.count == 42249
    assert len(hits.ids) == 100 and hits.ids[0] == "41297076"
    assert hits.query_key == "1"
    assert hits.webenv == "MCID_6927d6e7fee3e90f880ec190"
    assert hits.query_translation and '"neoplasms"[MeSH Terms]' in hits.query_translation

    none = parse_esearch(read_bytes(BIOPYTHON / "esearch8.xml.gz"))
    assert (none.count, none.ids) == (0, [])
    assert none.phrases_not_found == ["abcXYZ"]
    assert none.warnings == ["No items found."]


def test_error_element_raises() -> None:
    body = b"<eSearchResult><ERROR>Invalid query</ERROR></eSearchResult>"
    with pytest.raises(EutilsError, match="Invalid query"):
        parse_esearch(body)
    field = (
        b"<eSearchResult><Count>0</Count><ErrorList><FieldNotFound>MeSH Termz</FieldNotFound>"
        b"</ErrorList></eSearchResult>"
    )
    with pytest.raises(EutilsError, match="MeSH Termz"):
        parse_esearch(field)
    with pytest.raises(EutilsError, match="unreadable"):
        parse_esearch(b"<html>Bad gateway")


def test_server_error_answer_raises_without_retry(fake: FakeEutils) -> None:
    with make_client(fake) as client, pytest.raises(EutilsError, match="only understands"):
        client.esearch("cancer AND 1977[dp]")
    assert len(fake.requests) == 1  # an answer, not a transient failure: no retry


def test_retstart_past_limit_is_an_error(fake: FakeEutils) -> None:
    with make_client(fake) as client, pytest.raises(EutilsError, match="out of acceptable range"):
        client.esearch('"Neoplasms"[MeSH Terms]', retstart=9_999, retmax=10)


def test_retmax_past_limit_is_cut_back(corpus: tuple[FakeArticle, ...]) -> None:
    small = FakeEutils(corpus, explode=explode_from_mtrees(["Neoplasms"]), max_ids=5)
    with small, make_client(small) as client:
        result = client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO, retmax=100)
    assert result.count > 5
    assert len(result.ids) == 5
    assert any(w.startswith("Restrictions achieved") for w in result.warnings)


# -- efetch ----------------------------------------------------------------------------


def test_efetch_history_returns_pubmed_xml(fake: FakeEutils) -> None:
    with make_client(fake) as client:
        search = client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)
        assert search.webenv and search.query_key
        xml = client.efetch_history(search.webenv, search.query_key, 5, 7)

    assert xml.startswith(b'<?xml version="1.0" ?>\n<!DOCTYPE PubmedArticleSet PUBLIC')
    pmids = [r.pmid for r in iter_records(io.BytesIO(xml)) if isinstance(r, Article)]
    assert pmids == search.ids[5:12]
    fetch = fake.requests[-1]
    assert (fetch.endpoint, fetch.params["retstart"], fetch.params["retmax"]) == (
        "efetch.fcgi", "5", "7",
    )


def test_efetch_history_unknown_webenv(fake: FakeEutils) -> None:
    with make_client(fake) as client, pytest.raises(EutilsError, match="Unable to obtain query"):
        client.efetch_history("MCID_nope", "1", 0, 10)
    assert len(fake.requests) == 1


def test_efetch_ids_get_for_short_list(fake: FakeEutils) -> None:
    ids = [a.pmid for a in metapub_corpus()] + ["1"]  # PMID 1 is not in the corpus
    with make_client(fake) as client:
        xml = client.efetch_ids(ids)
    got = [r.pmid for r in iter_records(io.BytesIO(xml)) if isinstance(r, Article)]
    assert got == ids[:-1]  # in the order asked; the unknown id is simply absent
    assert fake.requests[-1].method == "GET"


def test_efetch_ids_posts_long_list(fake: FakeEutils, corpus: tuple[FakeArticle, ...]) -> None:
    ids = [a.pmid for a in corpus[:250]]
    with make_client(fake) as client:
        xml = client.efetch_ids(ids)
    got = {r.pmid for r in iter_records(io.BytesIO(xml)) if isinstance(r, Article)}
    assert got == set(ids)
    request = fake.requests[-1]
    assert request.method == "POST"
    assert request.params["id"].split(",") == ids
    assert request.params["api_key"] == API_KEY  # the key travels in the form body too


def test_identity_params_on_every_request(fake: FakeEutils) -> None:
    with make_client(fake) as client:
        search = client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)
        assert search.webenv and search.query_key
        client.efetch_history(search.webenv, search.query_key, 0, 2)
        client.efetch_ids(search.ids[:3])
    assert len(fake.requests) == 3
    for request in fake.requests:
        assert request.params["email"] == "dev@example.org"
        assert request.params["tool"] == "meshdistill-tests"
        assert request.params["api_key"] == API_KEY
        assert request.params["db"] == "pubmed"


def test_no_key_means_no_key_param(fake: FakeEutils) -> None:
    with make_client(fake, api_key=None, email=None) as client:
        client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)
    assert "api_key" not in fake.requests[0].params
    assert "email" not in fake.requests[0].params
    assert fake.requests[0].params["tool"] == "meshdistill-tests"


# -- retries ---------------------------------------------------------------------------


def test_429_retried_after_retry_after(fake: FakeEutils) -> None:
    fake.fail_next(2, 429, retry_after=0.4)
    with make_client(fake, backoff_initial=0.001) as client:
        result = client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)
    assert result.count > 0
    statuses = [r.status for r in fake.requests]
    assert statuses == [429, 429, 200]
    gaps = [b.time - a.time for a, b in itertools.pairwise(fake.requests)]
    # Retry-After (0.4 s) wins over the tiny exponential backoff (0.001 s).
    assert min(gaps) >= 0.38


def test_retry_after_as_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    seconds = parse_retry_after(format_datetime(when, usegmt=True))
    assert seconds is not None and 28 <= seconds <= 31
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("garbage") is None


def test_500_retried_then_succeeds(fake: FakeEutils) -> None:
    fake.fail_next(2, 500)
    with make_client(fake) as client:
        assert client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO).count > 0
    assert [r.status for r in fake.requests] == [500, 500, 200]


def test_500_exhausts_bounded_attempts(fake: FakeEutils) -> None:
    fake.fail_next(10, 503)
    with make_client(fake, max_attempts=4) as client, pytest.raises(EutilsError) as info:
        client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)
    assert "after 4 attempts" in str(info.value)
    assert "HTTP 503" in str(info.value)
    assert len(fake.requests) == 4


def test_backoff_grows_exponentially(fake: FakeEutils) -> None:
    fake.fail_next(3, 500)
    with make_client(fake, backoff_initial=0.1, max_attempts=4) as client:
        client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)
    t = [r.time for r in fake.requests]
    gaps = [b - a for a, b in itertools.pairwise(t)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.39


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_api_key_never_in_errors_or_logs(
    fake: FakeEutils, caplog: pytest.LogCaptureFixture
) -> None:
    # httpx logs every request URL at INFO. Listen on its logger directly: whatever
    # logging setup ran before (Airflow's quiets httpx), the redaction must hold there.
    httpx_log = logging.getLogger("httpx")
    collect = _Collect()
    old_level = httpx_log.level
    httpx_log.addHandler(collect)
    httpx_log.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    fake.fail_next(3, 429)  # NCBI's 429 body echoes the key back
    try:
        with make_client(fake) as client, pytest.raises(EutilsError) as info:
            client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)
    finally:
        httpx_log.removeHandler(collect)
        httpx_log.setLevel(old_level)
    assert "429" in str(info.value)
    assert API_KEY not in str(info.value)
    assert API_KEY not in repr(client)
    assert len(collect.lines) == 3 and all("api_key=***" in line for line in collect.lines)
    assert not any(API_KEY in line for line in collect.lines)
    assert API_KEY not in caplog.text  # the retry warnings quote the 429 body, redacted
    assert "retrying" in caplog.text


def test_timeouts_retried_then_error(fake: FakeEutils) -> None:
    fake.latency = 0.5
    with make_client(fake, timeout=0.1, max_attempts=2) as client, pytest.raises(
        EutilsError, match="after 2 attempts"
    ):
        client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)
    assert len(fake.requests) == 2


def test_connection_refused_retried_then_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there
    client = EutilsClient(
        f"http://127.0.0.1:{port}/entrez/eutils", limiter=LocalRateLimiter(500),
        max_attempts=3, backoff_initial=0.01,
    )
    with client, pytest.raises(EutilsError, match="after 3 attempts"):
        client.esearch('"Neoplasms"[MeSH Terms]')
    assert client.requests == 3


# -- rate limiting ---------------------------------------------------------------------


def test_every_request_waits_for_the_limiter(fake: FakeEutils) -> None:
    rate = 20.0
    with make_client(fake, limiter=LocalRateLimiter(rate)) as client:
        started = time.perf_counter()
        for _ in range(6):
            client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO)
        elapsed = time.perf_counter() - started
    assert len(fake.requests) == 6
    # Slots are 1/rate apart and sleeping never ends early: six requests need five gaps.
    assert elapsed >= 5 / rate - 0.005
    assert fake.requests[-1].time - fake.requests[0].time >= 5 / rate - 0.1


def test_server_side_rate_limit_is_survived(fake: FakeEutils) -> None:
    """Too fast for NCBI (here: 2/s): the 429 and its Retry-After are honoured."""
    fake.rate_limit = 2
    with make_client(fake, limiter=LocalRateLimiter(500)) as client:
        counts = [
            client.esearch('"Neoplasms"[MeSH Terms]', MAY_FROM, MAY_TO).count for _ in range(3)
        ]
    assert len(set(counts)) == 1 and counts[0] > 0
    assert [r.status for r in fake.requests] == [200, 200, 429, 200]
    assert fake.requests[3].time - fake.requests[2].time >= 0.95  # Retry-After: 1
    assert fake.requests[0].path == "/entrez/eutils/esearch.fcgi"


def test_default_limiter_follows_ncbi_rates(fake: FakeEutils) -> None:
    assert EutilsClient(fake.base_url).limiter.rate == 3.0
    assert EutilsClient(fake.base_url, api_key=API_KEY).limiter.rate == 10.0
