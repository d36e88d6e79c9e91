"""MEDLINE/PubMed XML files to JSON lines: what ``meshdistill pubmed parse`` does.

One line per :class:`Article` or :class:`Deletion` (``to_json``'s object, UTF-8, no
``\\u`` escapes), in file order, serialised by orjson and written to a binary stream in
batches (``json.dumps`` and per-line text writes cost more than the parse itself).

A file is cut into documents of about 1 MB at record boundaries, parsed by two threads:
lxml builds a tree from memory without the GIL, so one thread's tree building overlaps the
other's record extraction (``iterparse`` holds the GIL throughout). Each thread parses and
reads only its own trees. The lines are those of :func:`iter_records`: whatever the cut
cannot reproduce exactly (a chunk that does not parse, an unexpected layout, a read error)
hands the rest of the file to ``iter_records``, which also reports the file's error, with
the lines of its complete records kept.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lxml import etree

from meshdistill.errors import MeshDistillError
from meshdistill.pubmed.parser import (
    PARSER_OPTIONS,
    RECORD_TAGS,
    deletions,
    iter_records,
    open_source,
    parse_article,
)
from meshdistill.pubmed.records import Record, Skip

log = logging.getLogger(__name__)

_BATCH = 256  # lines per write in the sequential path (~0.5 MB on baseline files)
_CHUNK = 1 << 20  # bytes of XML per parsed document (~170 baseline citations)
_MAX_CHUNK = 64 << 20  # no record boundary in this much XML: leave the file to iter_records
_HEAD = 1 << 20  # the root start tag must come within this many bytes
_ROOT = b"<PubmedArticleSet"
_ROOT_END = b"</PubmedArticleSet>"
_RECORD_ENDS = (b"</PubmedArticle>", b"</PubmedBookArticle>")


@dataclass(slots=True)
class FileResult:
    """One input file: lines written, records skipped, and the error that ended it, if any."""

    path: str
    records: int = 0
    skipped: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class JsonlSummary:
    files: list[FileResult] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    @property
    def skipped(self) -> int:
        return sum(f.skipped for f in self.files)

    @property
    def failed(self) -> list[FileResult]:
        return [f for f in self.files if f.error is not None]

    @property
    def ok(self) -> bool:
        return not self.failed


def write_jsonl(
    paths: Iterable[str | Path], out: BinaryIO, *, threads: int | None = None
) -> JsonlSummary:
    """Write every record of ``paths`` to ``out`` as JSON lines; never raises for a bad file.

    ``threads``: parsing threads per file (default 2, 1 on a single core); 1 parses with
    ``iter_records`` alone. The lines are the same either way.
    """
    if threads is None:
        threads = min(2, os.cpu_count() or 1)
    summary = JsonlSummary()
    t_all = time.perf_counter()
    for path in paths:
        result = FileResult(str(path))
        t0 = time.perf_counter()
        try:
            done = _write_chunked(result, out, threads) if threads > 1 else 0
            if done is not None:
                _write_sequential(result, out, skip=done)
        except MeshDistillError as exc:
            result.error = str(exc)
        result.seconds = time.perf_counter() - t0
        summary.files.append(result)
        if result.error is not None:
            log.error("%s", result.error)
        rate = result.records / result.seconds if result.seconds else 0.0
        log.info(
            "%s: %d records (%d skipped) in %.1fs, %.0f/s%s",
            result.path, result.records, result.skipped, result.seconds, rate,
            " (incomplete: see error)" if result.error else "",
        )
    if len(summary.files) > 1:
        seconds = time.perf_counter() - t_all
        log.info(
            "%d files: %d records (%d skipped), %d failed, in %.1fs, %.0f/s",
            len(summary.files), summary.records, summary.skipped, len(summary.failed),
            seconds, summary.records / seconds if seconds else 0.0,
        )
    return summary


def _skip(result: FileResult, record: Skip) -> None:
    result.skipped += 1
    log.warning("%s: skipped a record (%s): %s", result.path, record.pmid, record.reason)


def _write_sequential(result: FileResult, out: BinaryIO, skip: int) -> None:
    """``iter_records`` from the ``skip``-th record on (the earlier ones are written)."""
    batch: list[bytes] = []
    try:
        for i, record in enumerate(iter_records(result.path)):
            if i < skip:
                continue
            if isinstance(record, Skip):
                _skip(result, record)
                continue
            batch.append(record.to_jsonl())
            result.records += 1
            if len(batch) >= _BATCH:
                out.write(b"".join(batch))
                batch.clear()
    finally:
        if batch:
            out.write(b"".join(batch))


class _Unsupported(Exception):
    """The chunked parse cannot vouch for the rest of the file: ``iter_records`` takes over."""


@dataclass(slots=True)
class _Chunk:
    lines: bytes
    written: int
    records: int  # written + skips, as iter_records counts them
    skips: list[Skip]


def _write_chunked(result: FileResult, out: BinaryIO, threads: int) -> int | None:
    """Write the file chunk by chunk; None when done, else the records written so far."""
    done = 0
    try:
        for chunk in _parsed_chunks(result.path, threads):
            for record in chunk.skips:
                _skip(result, record)
            out.write(chunk.lines)
            result.records += chunk.written
            done += chunk.records
    except _Unsupported as exc:
        cause = exc.__cause__
        log.debug("%s: iter_records takes over from record %d (%r)", result.path, done, cause)
        return done
    return None


def _parsed_chunks(path: str, threads: int) -> Iterator[_Chunk]:
    """Chunks in file order, at most ``threads + 1`` of them parsed ahead."""
    pending: deque[Future[_Chunk]] = deque()
    turn = threading.Lock()
    with ThreadPoolExecutor(threads, thread_name_prefix="jsonl") as pool:
        try:
            for doc in _documents(path):
                pending.append(pool.submit(_parse_chunk, doc, turn))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _documents(path: str) -> Iterator[bytes]:
    """The file as standalone documents, each the root element around whole records."""
    try:
        fh = open_source(Path(path))
    except Exception as exc:
        raise _Unsupported from exc
    try:
        buf = bytearray()
        while len(buf) < _HEAD and (data := fh.read(_CHUNK)):
            buf += data
            at = buf.find(_ROOT)
            if at >= 0 and buf.find(b">", at) >= 0:
                break
        root_start, body_at = _root_start(bytes(buf[:_HEAD]))
        del buf[:body_at]
        eof = False
        want = _CHUNK
        while True:
            while not eof and len(buf) < want:
                data = fh.read(_CHUNK)
                eof = not data
                buf += data
            if eof:
                yield root_start + buf  # holds the root's end tag: parsed as it stands
                return
            cut = max(buf.rfind(end) + len(end) if end in buf else 0 for end in _RECORD_ENDS)
            if not cut:
                if len(buf) > _MAX_CHUNK:
                    raise _Unsupported
                want = len(buf) + _CHUNK
                continue
            yield root_start + buf[:cut] + _ROOT_END
            del buf[:cut]
            want = _CHUNK
    except _Unsupported:
        raise
    except Exception as exc:  # a read error: iter_records reports it as it does
        raise _Unsupported from exc
    finally:
        fh.close()


def _root_start(head: bytes) -> tuple[bytes, int]:
    """The root start tag and where the body after it begins; the prolog must parse."""
    at = head.find(_ROOT)
    if at < 0 or head[at + len(_ROOT) : at + len(_ROOT) + 1] not in (b">", b" ", b"\n", b"\t"):
        raise _Unsupported
    end = head.find(b">", at)
    if end < 0 or head[end - 1 : end] == b"/":
        raise _Unsupported
    prolog = head[:at]
    decl = prolog.lower()
    if b"encoding=" in decl and b'encoding="utf-8"' not in decl and b"encoding='utf-8'" not in decl:
        raise _Unsupported
    root_start = head[at : end + 1]
    try:  # the prolog as iter_records reads it: a broken one is its error to report
        for _ in etree.iterparse(io.BytesIO(prolog + root_start + _ROOT_END), **PARSER_OPTIONS):
            pass
    except etree.XMLSyntaxError as exc:
        raise _Unsupported from exc
    return root_start, end + 1


def _parse_chunk(doc: bytes, turn: threading.Lock) -> _Chunk:
    """One document to JSON lines, in the calling thread only (its trees stay in it).

    The tree is built without the GIL; extraction takes ``turn`` so that one thread
    extracts while the other builds its next tree, instead of both slicing the GIL.
    """
    try:
        root = etree.fromstring(doc, etree.XMLParser(**PARSER_OPTIONS))
        with turn:
            chunk, tops = _extract(root)
            del root  # the tree is freed under ``turn`` too
    except Exception as exc:  # malformed, or anything iter_records may word differently
        raise _Unsupported from exc
    if tops != _record_tags(doc):
        raise _Unsupported("a record element below the root level")
    return chunk


def _extract(root: etree._Element) -> tuple[_Chunk, int]:
    """The records of the root's children, as ``iter_records`` yields them, and how many
    of those children are record elements."""
    lines: list[bytes] = []
    skips: list[Skip] = []
    tops = records = 0
    for elem in root:
        tag = elem.tag
        if tag == "PubmedArticle" or tag == "PubmedBookArticle":
            found: Iterable[Record] = (parse_article(elem),)
        elif tag == "DeleteCitation":
            found = deletions(elem)
        else:
            continue
        tops += 1
        for record in found:
            records += 1
            if isinstance(record, Skip):
                skips.append(record)
            else:
                lines.append(record.to_jsonl())
    return _Chunk(b"".join(lines), len(lines), records, skips), tops


def _record_tags(doc: bytes) -> int:
    """At least the record start tags in ``doc`` (``<PubmedArticleSet`` aside).

    ``iter_records`` yields records at any depth, :func:`_extract` the root's children
    only: when this equals the record elements among them, there are no others.
    """
    return sum(doc.count(b"<" + tag.encode()) for tag in RECORD_TAGS) - doc.count(_ROOT)
