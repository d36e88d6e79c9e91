"""Ingest one MeSH subtree's PubMed records for a date window through E-utilities.

The flow per subtree and window:

1. Validate the subtree against the loaded MeSH (an unknown prefix fails before any
   request, naming the closest valid ones).
2. ``esearch`` ``"<descriptor>"[MeSH Terms]`` on the window. PubMed explodes a MeSH term
   to every narrower descriptor (under all tree locations of that descriptor), so one term
   covers the subtree. For a bare category letter (``C``) the top-level descriptors of the
   category are OR-ed.
3. PubMed esearch reaches only the first 9,999 records of a result set, so a window
   holding more is halved recursively until every part fits; a single day that still
   holds more cannot be paged and raises :class:`WindowTooLargeError`.
4. Each part is fetched in batches from the history server (WebEnv/query_key), parsed
   and loaded in one transaction per part.
5. Reconciliation: the PMIDs returned are compared with esearch's id list; the ones
   missing (efetch sometimes omits records) are refetched once by id. The watermark in
   ``ingest_watermark`` advances only when every id arrived, so a scheduled run without
   an explicit window (:func:`next_window`) picks up again from the last window that
   fully reconciled.

Loads are idempotent (the loader merges by PMID and content hash), so re-running a
window, or ingesting overlapping subtrees, never duplicates rows.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, text

from meshdistill.errors import WindowTooLargeError
from meshdistill.mesh.subtree import Subtree, get_subtree
from meshdistill.pubmed.eutils import PUBMED_MAX_IDS, DateType, EutilsClient, SearchResult
from meshdistill.pubmed.load import LoadResult, load_records
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.records import Article, Deletion, Record, Skip

log = logging.getLogger(__name__)

SOURCE = "eutils"
MISSING_CAP = 100


def watermark_source(datetype: DateType) -> str:
    """The ``ingest_watermark.source`` of a date type.

    Entry-date (EDAT) and modification-date (MDAT) windows are separate streams: a
    reconciled MDAT run says nothing about which new entries were fetched, so each keeps
    its own watermark. EDAT, the default, is plain ``'eutils'``.
    """
    return SOURCE if datetype == "edat" else f"{SOURCE}-{datetype}"


def subtree_term(conn: Connection, subtree: Subtree) -> str:
    """The esearch term for a subtree: its root descriptor, exploded by PubMed."""
    if len(subtree.prefix) == 1:
        names = [
            r[0]
            for r in conn.execute(
                text(
                    "SELECT name FROM mesh_tree WHERE tree_number ~ :re ORDER BY tree_number"
                ),
                {"re": f"^{subtree.prefix}[0-9]{{2}}$"},
            )
        ]
    else:
        names = [subtree.name] if subtree.name else []
    if not names:
        raise ValueError(f"MeSH subtree {subtree.prefix!r} has no root descriptor name")
    # MeSH names carry no double quotes; strip any so the phrase stays one phrase.
    return " OR ".join(f'"{n.replace(chr(34), "")}"[MeSH Terms]' for n in names)


@dataclass
class _Part:
    start: date
    end: date
    result: SearchResult


def plan_windows(
    client: EutilsClient,
    term: str,
    start: date,
    end: date,
    *,
    datetype: DateType = "edat",
    max_ids: int = PUBMED_MAX_IDS,
) -> Iterator[_Part]:
    """esearch the window, halving it until each part's count fits in ``max_ids``."""
    result = client.esearch(term, start, end, datetype=datetype, usehistory=True, retmax=max_ids)
    if result.phrases_not_found:
        log.warning(
            "PubMed does not know %s (a MeSH name from another year?)",
            ", ".join(result.phrases_not_found),
        )
    if result.count <= max_ids:
        yield _Part(start, end, result)
        return
    if start >= end:
        raise WindowTooLargeError(
            f"{result.count} records on {start.isoformat()} for {term}: more than the "
            f"{max_ids} one esearch can page through, and a day cannot be split further; "
            "ingest this day from the annual baseline / daily update files instead"
        )
    mid = start + (end - start) // 2
    log.info(
        "%s..%s holds %d records (> %d): splitting at %s",
        start, end, result.count, max_ids, mid,
    )
    yield from plan_windows(client, term, start, mid, datetype=datetype, max_ids=max_ids)
    yield from plan_windows(
        client, term, mid + timedelta(days=1), end, datetype=datetype, max_ids=max_ids
    )


@dataclass
class _Totals:
    fetched: set[str] = field(default_factory=set)
    parsed: int = 0
    loaded: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: int = 0
    partial_batches: int = 0

    def add(self, result: LoadResult) -> None:
        self.parsed += result.parsed
        self.loaded += result.loaded
        self.unchanged += result.unchanged
        self.deleted += result.deleted
        self.skipped += result.skipped
        if result.status != "succeeded":
            self.partial_batches += 1


def _noting_pmids(records: Iterable[Record], seen: set[str]) -> Iterator[Record]:
    """Pass records through, remembering every PMID that arrived (skips included)."""
    for record in records:
        if isinstance(record, (Article, Deletion)):
            seen.add(record.pmid)
        elif isinstance(record, Skip) and record.pmid:
            seen.add(record.pmid.strip())
        yield record


def _load_xml(
    conn: Connection,
    xml: bytes,
    totals: _Totals,
    *,
    item: str,
    subtree: str,
    window: tuple[date, date],
    expected: int,
) -> LoadResult:
    result = load_records(
        conn,
        _noting_pmids(iter_records(io.BytesIO(xml), name=item), totals.fetched),
        source=SOURCE,
        item=item,
        subtree=subtree,
        window=window,
        expected=expected,
    )
    totals.add(result)
    return result


def ingest_subtree(
    db: str | Engine,
    prefix: str,
    start: date,
    end: date,
    *,
    client: EutilsClient,
    batch_size: int = 500,
    datetype: DateType = "edat",
    max_ids: int = PUBMED_MAX_IDS,
    missing_cap: int = MISSING_CAP,
) -> dict[str, Any]:
    """Fetch and load every PubMed record of subtree ``prefix`` in ``[start, end]``.

    ``db`` is a database URL or engine (not a connection: each part commits on its own,
    so a failure late in a long window keeps the parts already loaded). ``max_ids`` is
    the most ids one esearch may return (PubMed's 9,999; a parameter so tests can split
    windows on small data). Returns a summary; ``reconciled`` says whether every esearch
    id arrived, and only then does the watermark move.
    """
    if start > end:
        raise ValueError(f"empty window: {start} is after {end}")
    if batch_size < 1 or max_ids < 1:
        raise ValueError("batch_size and max_ids must be positive")
    from meshdistill.store.db import get_engine

    engine = db if isinstance(db, Engine) else get_engine(db)
    t0 = time.perf_counter()
    requests0 = client.requests
    with engine.connect() as conn:
        subtree = get_subtree(conn, prefix)  # UnknownSubtreeError, with suggestions
        term = subtree_term(conn, subtree)
    prefix = subtree.prefix
    label = f"{prefix} {start.isoformat()}..{end.isoformat()}"
    log.info("%s: esearch %s on %s", label, term, datetype.upper())

    totals = _Totals()
    expected_ids: dict[str, None] = {}
    expected = 0
    parts = 0
    batch_no = 0
    for part in plan_windows(client, term, start, end, datetype=datetype, max_ids=max_ids):
        parts += 1
        count = part.result.count
        expected += count
        expected_ids.update(dict.fromkeys(part.result.ids))
        if len(part.result.ids) < count:
            log.warning(
                "%s..%s: esearch counted %d but listed %d ids",
                part.start, part.end, count, len(part.result.ids),
            )
        if count == 0:
            continue
        window = (part.start, part.end)
        part_label = f"{prefix} {part.start.isoformat()}..{part.end.isoformat()}"
        with engine.begin() as conn:  # one transaction per part
            for retstart in range(0, count, batch_size):
                batch_no += 1
                size = min(batch_size, count - retstart)
                if part.result.webenv and part.result.query_key:
                    xml = client.efetch_history(
                        part.result.webenv, part.result.query_key, retstart, size
                    )
                else:  # no history server answer: fetch the listed ids instead
                    xml = client.efetch_ids(part.result.ids[retstart : retstart + size])
                result = _load_xml(
                    conn, xml, totals, item=f"{part_label} batch {batch_no}",
                    subtree=prefix, window=window, expected=size,
                )
                elapsed = time.perf_counter() - t0
                log.info(
                    "%s batch %d: %d records (%d loaded, %d unchanged, %d deleted, "
                    "%d skipped); %d/%d fetched, %.1f records/s, %.2f requests/s",
                    part_label, batch_no, result.parsed, result.loaded, result.unchanged,
                    result.deleted, result.skipped, len(totals.fetched), expected,
                    len(totals.fetched) / elapsed if elapsed else 0.0,
                    (client.requests - requests0) / elapsed if elapsed else 0.0,
                )

    missing = [pmid for pmid in expected_ids if pmid not in totals.fetched]
    refetched = 0
    if missing:
        log.warning("%s: %d esearch ids not returned; refetching them by id", label, len(missing))
        with engine.begin() as conn:
            for i in range(0, len(missing), batch_size):
                chunk = missing[i : i + batch_size]
                batch_no += 1
                before = len(totals.fetched)
                _load_xml(
                    conn, client.efetch_ids(chunk), totals,
                    item=f"{label} refetch {batch_no}", subtree=prefix,
                    window=(start, end), expected=len(chunk),
                )
                refetched += len(totals.fetched) - before
        missing = [pmid for pmid in missing if pmid not in totals.fetched]
    short = expected - len(expected_ids)  # ids esearch counted but never listed
    reconciled = not missing and short <= 0

    source = watermark_source(datetype)
    with engine.begin() as conn:
        watermark, advanced = _advance_watermark(
            conn, prefix, source, start, end, expected, reconciled
        )
    if reconciled and not advanced:
        log.info(
            "%s: reconciled, watermark stays at %s (window does not continue it)",
            label, watermark,
        )
    elif not reconciled:
        log.warning(
            "%s: NOT reconciled (%d ids missing after refetch, %d never listed); "
            "watermark stays at %s",
            label, len(missing), max(short, 0), watermark,
        )
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "subtree": prefix,
        "window": [start.isoformat(), end.isoformat()],
        "datetype": datetype,
        "term": term,
        "parts": parts,
        "expected": expected,
        "fetched": len(expected_ids.keys() & totals.fetched),
        "loaded": totals.loaded,
        "unchanged": totals.unchanged,
        "deleted": totals.deleted,
        "skipped": totals.skipped,
        "partial_batches": totals.partial_batches,
        "refetched": refetched,
        "missing": missing[:missing_cap],
        "missing_count": len(missing) + max(short, 0),
        "reconciled": reconciled,
        "watermark": watermark.isoformat() if watermark else None,
        "watermark_advanced": advanced,
        "requests": client.requests - requests0,
        "seconds": round(seconds, 3),
    }
    log.info(
        "%s: %d expected, %d fetched, %d loaded, %d unchanged, %d deleted, %d skipped, "
        "reconciled=%s, watermark=%s, %d requests in %.1f s",
        label, expected, summary["fetched"], totals.loaded, totals.unchanged, totals.deleted,
        totals.skipped, reconciled, summary["watermark"], summary["requests"], seconds,
    )
    return summary


def _advance_watermark(
    conn: Connection,
    subtree: str,
    source: str,
    start: date,
    end: date,
    count: int,
    reconciled: bool,
) -> tuple[date | None, bool]:
    """Move the watermark to ``end`` when the run reconciled and continues it.

    "Continues" means the window starts no later than the day after the current
    watermark: a reconciled window after a gap (an earlier window that failed) must not
    jump over the gap, and a backfill of an old window must not move it backwards.
    Returns the watermark afterwards and whether it moved.
    """
    if reconciled:
        row = conn.execute(
            text(
                """
                INSERT INTO ingest_watermark AS w (subtree, source, watermark, last_count)
                VALUES (:subtree, :source, :end, :count)
                ON CONFLICT (subtree, source) DO UPDATE
                    SET watermark = EXCLUDED.watermark, last_count = EXCLUDED.last_count,
                        updated_at = now()
                    WHERE w.watermark < EXCLUDED.watermark AND :start <= w.watermark + 1
                RETURNING watermark
                """
            ),
            {"subtree": subtree, "source": source, "start": start, "end": end, "count": count},
        ).first()
        if row is not None:
            return row[0], True
    current = read_watermark(conn, subtree, source=source)
    return current, False


def read_watermark(conn: Connection, subtree: str, *, source: str = SOURCE) -> date | None:
    """The last day of the last reconciled, contiguous window, or None."""
    value: date | None = conn.execute(
        text("SELECT watermark FROM ingest_watermark WHERE subtree = :s AND source = :src"),
        {"s": subtree, "src": source},
    ).scalar_one_or_none()
    return value


def next_window(
    conn: Connection,
    prefix: str,
    default_start: date,
    end: date,
    *,
    datetype: DateType = "edat",
) -> tuple[date, date] | None:
    """The window a run without an explicit one should ingest, or None when up to date.

    It starts the day after the watermark (where the last reconciled run ended), or at
    ``default_start`` for a subtree never ingested, and ends at ``end``.
    """
    watermark = read_watermark(conn, prefix.strip(), source=watermark_source(datetype))
    start = watermark + timedelta(days=1) if watermark else default_start
    return (start, end) if start <= end else None
