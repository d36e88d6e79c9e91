"""A small NCBI E-utilities client: esearch and efetch for PubMed.

Why not ``Bio.Entrez``: its URLs are hard-coded to eutils.ncbi.nlm.nih.gov (the tests and
any mirror or proxy need a configurable base URL), and its rate limiter is a per-process
sleep, which lets every mapped Airflow task send the full rate at once. Here every request
goes through one :class:`~meshdistill.pubmed.ratelimit.RateLimiter` (in the pipeline, the
Postgres-backed one shared by all workers) and uses ``httpx`` directly.

Transient failures (HTTP 429 and 5xx, timeouts, dropped connections) are retried with
exponential backoff, honouring ``Retry-After`` on 429, up to a bounded number of
attempts; then :class:`~meshdistill.errors.EutilsError` says what kept failing. The NCBI
API key is a secret: it never appears in an exception message or a log line (httpx logs
request URLs at INFO, so a redacting filter is installed on its logger).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import httpx
from lxml import etree
from sqlalchemy import Engine
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
)

from meshdistill.config import DATETYPES, Settings
from meshdistill.errors import EutilsError
from meshdistill.httputil import parse_retry_after
from meshdistill.pubmed.ratelimit import (
    DEFAULT_NAME,
    LocalRateLimiter,
    PostgresRateLimiter,
    RateLimiter,
    ncbi_rate,
)

log = logging.getLogger(__name__)

#: The date types a window can be on: entry date (new records) or modification date.
#: PubMed esearch reaches only the first 9,999 records of a result set.
PUBMED_MAX_IDS = 9_999
#: Above this many ids efetch is sent as a form POST (NCBI's advice for > ~200 ids).
POST_THRESHOLD = 200

_XML_PARSER = etree.XMLParser(
    load_dtd=False, no_network=True, resolve_entities=False, huge_tree=True
)
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Transport failures worth another try; an unsupported scheme or bad URL is not one.
_TRANSIENT_TRANSPORT: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
_API_KEY_RE = re.compile(r"(api_key=)[^&\s\"']+|(\"api-key\"\s*:\s*\")[^\"]*")


def _redact(message: str, secret: str | None = None) -> str:
    """The message with any API key hidden (NCBI even echoes the key in 429 bodies)."""
    message = _API_KEY_RE.sub(lambda m: (m.group(1) or m.group(2)) + "***", message)
    if secret:
        message = message.replace(secret, "***")
    return message


class _RedactApiKey(logging.Filter):
    """Hide ``api_key=...`` in httpx's request log lines (they carry the full URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem, not ours
            return True
        if "api_key" in message or "api-key" in message:
            record.msg = _redact(message)
            record.args = ()
        return True


def _install_log_redaction() -> None:
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactApiKey) for f in logger.filters):
            logger.addFilter(_RedactApiKey())


_install_log_redaction()


@dataclass(frozen=True)
class SearchResult:
    """One esearch answer.

    ``count`` is the full size of the result set, which may exceed ``len(ids)`` (PubMed
    returns at most 9,999 ids). ``phrases_not_found`` lists query phrases PubMed did not
    know (``ErrorList/PhraseNotFound``): with a MeSH term that usually means the name is
    from another MeSH year.
    """

    count: int
    ids: list[str]
    webenv: str | None
    query_key: str | None
    query_translation: str | None
    retstart: int = 0
    phrases_not_found: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Retryable(Exception):
    """An HTTP answer worth retrying; ``retry_after`` in seconds when the server said."""

    def __init__(self, status: int, detail: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {detail}" if detail else f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


_TRANSIENT: tuple[type[BaseException], ...] = (_Retryable, *_TRANSIENT_TRANSPORT)



def _fmt(d: date) -> str:
    return d.strftime("%Y/%m/%d")


def _xml_error(content: bytes) -> str | None:
    """The text of ``<ERROR>`` elements in an E-utilities XML answer, if any."""
    try:
        root = etree.fromstring(content, _XML_PARSER)
    except etree.XMLSyntaxError:
        return None
    errors = [" ".join((e.text or "").split()) for e in root.iter("ERROR")]
    errors = [e for e in errors if e]
    return "; ".join(errors) if errors else None


class EutilsClient:
    """esearch/efetch against ``base_url`` (NCBI's by default), rate limited and retried.

    ``limiter`` defaults to a process-local one at NCBI's rate for the key; in the
    pipeline use :meth:`from_settings` with an engine so all workers share one rate.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        email: str | None = None,
        tool: str | None = "meshdistill",
        api_key: str | None = None,
        limiter: RateLimiter | None = None,
        max_attempts: int = 5,
        timeout: float = 60.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        retry_after_max: float = 120.0,
        post_threshold: int = POST_THRESHOLD,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        base = base_url or Settings.from_env().eutils_url
        self.base_url = base if base.endswith("/") else base + "/"
        self.email = email
        self.tool = tool
        self._api_key = api_key
        self.limiter: RateLimiter = limiter or LocalRateLimiter(ncbi_rate(api_key))
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self.post_threshold = post_threshold
        self.requests = 0  # HTTP requests sent, retries included
        self._http = httpx.Client(
            timeout=timeout,
            headers={"User-Agent": f"{tool or 'meshdistill'} (httpx)"},
            follow_redirects=True,
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings | None = None,
        *,
        base_url: str | None = None,
        email: str | None = None,
        api_key: str | None = None,
        database_url: str | None = None,
        engine: Engine | None = None,
        shared_limiter: bool = True,
        limiter_name: str = DEFAULT_NAME,
        **kwargs: Any,
    ) -> EutilsClient:
        """A client configured from the environment, with the limiter all workers share.

        Explicit ``base_url``/``email``/``api_key`` override the settings (the DAG passes
        them from an Airflow connection). The rate limiter lives in the pipeline database
        (``engine``, else ``database_url``, else the default one); ``shared_limiter=False``
        gives a process-local limiter instead, for a machine without the database.
        """
        settings = settings or Settings.from_env()
        api_key = api_key or settings.ncbi_api_key
        limiter: RateLimiter | None = kwargs.pop("limiter", None)
        if limiter is None and shared_limiter:
            if engine is None:
                from meshdistill.store.db import get_engine

                engine = get_engine(database_url)
            limiter = PostgresRateLimiter(engine, ncbi_rate(api_key), name=limiter_name)
        return cls(
            base_url or settings.eutils_url,
            email=email or settings.ncbi_email,
            tool=kwargs.pop("tool", settings.ncbi_tool),
            api_key=api_key,
            limiter=limiter,
            **kwargs,
        )

    def __repr__(self) -> str:  # never show the key
        return f"EutilsClient({self.base_url!r}, api_key={'***' if self._api_key else None})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EutilsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------

    def _params(self, params: Mapping[str, Any]) -> dict[str, str]:
        out = {k: str(v) for k, v in params.items() if v is not None}
        if self.tool:
            out["tool"] = self.tool
        if self.email:
            out["email"] = self.email
        if self._api_key:
            out["api_key"] = self._api_key
        return out

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff; a 429's ``Retry-After`` wins when the server sent one."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry_after_max)
        return float(
            min(self.backoff_max, self.backoff_initial * 2 ** (state.attempt_number - 1))
        )

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "E-utilities attempt %d/%d failed (%s); retrying in %.1f s",
            state.attempt_number, self.max_attempts,
            _redact(str(exc) or type(exc).__name__, self._api_key), sleep,
        )

    def _send_once(self, endpoint: str, params: dict[str, str], post: bool) -> httpx.Response:
        self.limiter.acquire()
        self.requests += 1
        url = self.base_url + endpoint
        response = (
            self._http.post(url, data=params) if post else self._http.get(url, params=params)
        )
        if response.status_code in _RETRYABLE_STATUS:
            detail = _redact(" ".join(response.text.split())[:200], self._api_key)
            retry_after = (
                parse_retry_after(response.headers.get("Retry-After"))
                if response.status_code == 429
                else None
            )
            raise _Retryable(response.status_code, detail, retry_after)
        return response

    def _request(
        self, endpoint: str, params: Mapping[str, Any], *, post: bool = False
    ) -> bytes:
        """One E-utilities call through the limiter, retried; the response body."""
        full = self._params(params)
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_TRANSIENT),
            before_sleep=self._before_sleep,
            reraise=False,
        )
        try:
            response: httpx.Response = retrying(self._send_once, endpoint, full, post)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            reason = _redact(str(last) or type(last).__name__, self._api_key)
            raise EutilsError(
                f"{endpoint} failed after {self.max_attempts} attempts; last error: {reason}"
            ) from None
        except httpx.HTTPError as exc:  # not retryable (e.g. an invalid URL)
            raise EutilsError(
                f"{endpoint}: {_redact(str(exc), self._api_key)}"
            ) from None
        if response.status_code >= 400:
            detail = _xml_error(response.content) or " ".join(response.text.split())[:200]
            raise EutilsError(
                f"{endpoint} answered HTTP {response.status_code}: "
                f"{_redact(detail, self._api_key)}"
            )
        return response.content

    # -- esearch -------------------------------------------------------------------------

    def esearch(
        self,
        term: str,
        mindate: date | None = None,
        maxdate: date | None = None,
        *,
        datetype: str = "edat",
        usehistory: bool = True,
        retmax: int = 10_000,
        retstart: int = 0,
    ) -> SearchResult:
        """Search PubMed; dates are inclusive days on EDAT (entry) or MDAT (modified)."""
        if datetype not in DATETYPES:
            raise ValueError(f"datetype must be 'edat' or 'mdat', not {datetype!r}")
        if (mindate is None) != (maxdate is None):
            raise ValueError("give both mindate and maxdate, or neither")
        params: dict[str, Any] = {
            "db": "pubmed",
            "term": term,
            "retmax": retmax,
            "retstart": retstart,
        }
        if mindate is not None and maxdate is not None:
            params.update(datetype=datetype, mindate=_fmt(mindate), maxdate=_fmt(maxdate))
        if usehistory:
            params["usehistory"] = "y"
        return parse_esearch(self._request("esearch.fcgi", params))

    # -- efetch --------------------------------------------------------------------------

    def efetch_history(self, webenv: str, query_key: str, retstart: int, retmax: int) -> bytes:
        """PubMed XML for ``retmax`` records of a history-server result set."""
        content = self._request(
            "efetch.fcgi",
            {
                "db": "pubmed",
                "WebEnv": webenv,
                "query_key": query_key,
                "retstart": retstart,
                "retmax": retmax,
                "retmode": "xml",
            },
        )
        return _check_efetch(content)

    def efetch_ids(self, ids: Sequence[str]) -> bytes:
        """PubMed XML for the given PMIDs (unknown ones are simply absent).

        Long lists go as a form POST: a GET URL with thousands of ids is too long for
        NCBI's front end.
        """
        if not ids:
            return b'<?xml version="1.0" ?>\n<PubmedArticleSet>\n</PubmedArticleSet>\n'
        params = {"db": "pubmed", "id": ",".join(str(i) for i in ids), "retmode": "xml"}
        content = self._request("efetch.fcgi", params, post=len(ids) > self.post_threshold)
        return _check_efetch(content)


def _check_efetch(content: bytes) -> bytes:
    """Reject an answer that is not a PubmedArticleSet (efetch errors come back as XML)."""
    head = content[:4096]
    if b"<PubmedArticleSet" in head:
        return content
    detail = _xml_error(content) or " ".join(head.decode(errors="replace").split())[:200]
    raise EutilsError(f"efetch returned no PubmedArticleSet: {_redact(detail)}")


def parse_esearch(content: bytes) -> SearchResult:
    """Parse an ``eSearchResult`` document.

    ``<ERROR>`` (bad query, position out of range, unknown WebEnv) and an unknown search
    field raise :class:`EutilsError`; a phrase PubMed does not know is not an error but a
    result with ``count`` 0 (or the hits of the other OR-ed phrases), listed in
    ``phrases_not_found``.
    """
    try:
        root = etree.fromstring(content, _XML_PARSER)
    except etree.XMLSyntaxError as exc:
        snippet = " ".join(content[:200].decode(errors="replace").split())
        raise EutilsError(f"esearch returned unreadable XML ({exc.msg}): {snippet}") from None
    if root.tag != "eSearchResult":
        raise EutilsError(f"esearch returned <{root.tag}>, not <eSearchResult>")
    errors = [" ".join((e.text or "").split()) for e in root.findall("ERROR")]
    if errors:
        raise EutilsError(f"esearch error: {'; '.join(e for e in errors if e) or 'unknown'}")
    error_list = root.find("ErrorList")
    phrases: list[str] = []
    if error_list is not None:
        fields = [e.text or "" for e in error_list.findall("FieldNotFound")]
        if fields:
            raise EutilsError(f"esearch: unknown search field(s): {', '.join(fields)}")
        phrases = [e.text or "" for e in error_list.findall("PhraseNotFound")]
    warnings = [
        " ".join((e.text or "").split())
        for e in root.iterfind("WarningList/*")
        if (e.text or "").strip()
    ]
    count_text = root.findtext("Count")
    if count_text is None or not count_text.strip().isdigit():
        raise EutilsError("esearch answer has no Count")
    return SearchResult(
        count=int(count_text),
        ids=[i.text.strip() for i in root.iterfind("IdList/Id") if i.text],
        webenv=root.findtext("WebEnv"),
        query_key=root.findtext("QueryKey"),
        query_translation=root.findtext("QueryTranslation"),
        retstart=int(root.findtext("RetStart") or 0),
        phrases_not_found=phrases,
        warnings=warnings,
    )

