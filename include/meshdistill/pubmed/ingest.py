"""Ingest one MeSH subtree's PubMed records for a date window through E-utilities.

The subtree is validated against the loaded MeSH first (an unknown prefix fails before
any request, naming the closest valid ones). ``esearch`` on ``"<descriptor>"[MeSH
Terms]`` covers the subtree, since PubMed explodes a MeSH term to every narrower
descriptor (a bare category letter ORs its top-level descriptors). esearch reaches only
the first 9,999 records of a result set, so a larger window is halved until every part
fits (:class:`WindowTooLargeError` for a single day that does not). Each part streams
from the history server through the parser into the loader: one transaction and one
``ingest_batch`` row per part, memory bounded by one batch. The PMIDs received are
reconciled with esearch's ids, the missing ones refetched once; ``ingest_watermark``
advances only when every id arrived and the window continues the previous one, so
:func:`next_window` never skips a gap. Loads merge by PMID and content hash, so reruns
never duplicate rows (docs/architecture.md, Pipeline steps: Ingest).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, text

from meshdistill.errors import PubmedParseError, WindowTooLargeError
from meshdistill.mesh.subtree import Subtree, get_subtree
from meshdistill.pubmed.eutils import DATETYPES, PUBMED_MAX_IDS, EutilsClient, SearchResult
from meshdistill.pubmed.load import LoadResult, load_records
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.records import Article, Deletion, Record, Skip

log = logging.getLogger(__name__)

SOURCE = "eutils"
MISSING_CAP = 100


def watermark_source(datetype: str) -> str:
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
class WindowPart:
    """A sub-window small enough for one esearch, with that esearch's answer."""

    start: date
    end: date
    result: SearchResult


def plan_windows(
    client: EutilsClient,
    term: str,
    start: date,
    end: date,
    *,
    datetype: str = "edat",
    max_ids: int = PUBMED_MAX_IDS,
) -> Iterator[WindowPart]:
    """esearch the window, halving it until each part's count fits in ``max_ids``."""
    result = client.esearch(term, start, end, datetype=datetype, usehistory=True, retmax=max_ids)
    if result.phrases_not_found:
        log.warning(
            "PubMed does not know %s (a MeSH name from another year?)",
            ", ".join(result.phrases_not_found),
        )
    if result.count <= max_ids:
        yield WindowPart(start, end, result)
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


class _Run:
    """Counts and progress of one ``ingest_subtree`` call, and the record stream it loads."""

    def __init__(self, client: EutilsClient, label: str) -> None:
        self.client = client
        self.label = label
        self.t0 = time.perf_counter()
        self.requests0 = client.requests
        self.expected = 0
        self.fetched: set[str] = set()
        self.loaded = self.unchanged = self.deleted = self.skipped = 0
        self.partial_loads = 0
        self.faults: list[str] = []

    def stream(
        self, batches: Iterable[tuple[str, Callable[[], bytes]]], name: str
    ) -> Iterator[Record]:
        """The records of each batch, fetched only when the loader asks for them.

        Memory stays at one batch whatever the part's size. A batch that does not parse
        (a truncated answer) keeps its complete records and does not stop the batches
        after it; at the end the fault is raised as :class:`PubmedParseError`, which the
        loader records as a ``partial`` load with the error, after merging the rest.
        Every PMID that arrives is noted for reconciliation (skips included: they were
        returned, and ``ingest_skip`` says why they were not loaded).
        """
        faults: list[str] = []
        count = 0
        for batch_name, fetch in batches:
            xml = fetch()
            got = 0
            try:
                for record in iter_records(io.BytesIO(xml), name=batch_name):
                    if isinstance(record, (Article, Deletion)):
                        self.fetched.add(record.pmid)
                    elif isinstance(record, Skip) and record.pmid:
                        self.fetched.add(record.pmid.strip())
                    got += 1
                    yield record
            except PubmedParseError as exc:
                log.warning("%s", exc)
                faults.append(f"{batch_name}: {exc.reason} (after {exc.parsed} records)")
            count += got
            elapsed = time.perf_counter() - self.t0
            log.info(
                "%s: %d records; %d/%d fetched, %.1f records/s, %.2f requests/s",
                batch_name, got, len(self.fetched), self.expected,
                len(self.fetched) / elapsed if elapsed else 0.0,
                (self.client.requests - self.requests0) / elapsed if elapsed else 0.0,
            )
        if faults:
            self.faults.extend(faults)
            raise PubmedParseError(name, "; ".join(faults), count)

    def load(
        self,
        conn: Connection,
        records: Iterable[Record],
        *,
        item: str,
        subtree: str,
        window: tuple[date, date],
        expected: int,
    ) -> LoadResult:
        result = load_records(
            conn, records, source=SOURCE, item=item, subtree=subtree, window=window,
            expected=expected,
        )
        self.loaded += result.loaded
        self.unchanged += result.unchanged
        self.deleted += result.deleted
        self.skipped += result.skipped
        if result.status != "succeeded":
            self.partial_loads += 1
        log.info(
            "%s: %d records (%d loaded, %d unchanged, %d deleted, %d skipped) in %.1f s",
            item, result.parsed, result.loaded, result.unchanged, result.deleted,
            result.skipped, result.seconds,
        )
        return result


def ingest_subtree(
    db: str | Engine,
    prefix: str,
    start: date,
    end: date,
    *,
    client: EutilsClient,
    batch_size: int = 500,
    datetype: str = "edat",
    max_ids: int = PUBMED_MAX_IDS,
    missing_cap: int = MISSING_CAP,
) -> dict[str, Any]:
    """Fetch and load every PubMed record of subtree ``prefix`` in ``[start, end]``.

    ``db`` is a database URL or engine (not a connection: each part of the window is
    loaded and committed in its own transaction, one ``ingest_batch`` row per part, so a
    failure late in a long window keeps the parts already loaded; loads are idempotent).
    ``batch_size`` records are fetched per efetch. ``max_ids`` is the most ids one esearch
    may return (PubMed's 9,999; a parameter so tests can split windows on small data).
    Returns a summary; ``reconciled`` says whether every esearch id arrived, and only
    then does the watermark move.
    """
    if start > end:
        raise ValueError(f"empty window: {start} is after {end}")
    if batch_size < 1 or max_ids < 1:
        raise ValueError("batch_size and max_ids must be positive")
    if datetype not in DATETYPES:
        raise ValueError(f"datetype must be one of {DATETYPES}, not {datetype!r}")
    from meshdistill.store.db import get_engine

    engine = db if isinstance(db, Engine) else get_engine(db)
    with engine.connect() as conn:
        subtree = get_subtree(conn, prefix)  # UnknownSubtreeError, with suggestions
        term = subtree_term(conn, subtree)
    prefix = subtree.prefix
    label = f"{prefix} {start.isoformat()}..{end.isoformat()}"
    run = _Run(client, label)
    log.info("%s: esearch %s on %s", label, term, datetype.upper())

    # Plan every part before fetching any: a day too large fails before anything loads.
    parts = list(plan_windows(client, term, start, end, datetype=datetype, max_ids=max_ids))
    expected_ids: dict[str, None] = {}
    for part in parts:
        expected_ids.update(dict.fromkeys(part.result.ids))
        if len(part.result.ids) < part.result.count:
            log.warning(
                "%s..%s: esearch counted %d but listed %d ids",
                part.start, part.end, part.result.count, len(part.result.ids),
            )
    expected = run.expected = sum(p.result.count for p in parts)
    log.info("%s: %d records in %d part(s)", label, expected, len(parts))

    for part in parts:
        count, result = part.result.count, part.result
        if count == 0:
            continue
        name = f"{prefix} {part.start.isoformat()}..{part.end.isoformat()}"
        batches: list[tuple[str, Callable[[], bytes]]] = []
        for n, retstart in enumerate(range(0, count, batch_size), 1):
            size = min(batch_size, count - retstart)
            if result.webenv and result.query_key:
                fetch = partial(
                    client.efetch_history, result.webenv, result.query_key, retstart, size
                )
            else:  # no history server in the answer: fetch the listed ids instead
                fetch = partial(client.efetch_ids, result.ids[retstart : retstart + size])
            batches.append((f"{name} batch {n}", fetch))
        with engine.begin() as conn:  # one transaction per part
            run.load(
                conn, run.stream(batches, name), item=name, subtree=prefix,
                window=(part.start, part.end), expected=count,
            )

    missing = [pmid for pmid in expected_ids if pmid not in run.fetched]
    refetched = 0
    if missing:
        log.warning("%s: %d esearch ids not returned; refetching them by id", label, len(missing))
        name = f"{label} refetch"
        batches = [
            (f"{name} {n}", partial(client.efetch_ids, missing[i : i + batch_size]))
            for n, i in enumerate(range(0, len(missing), batch_size), 1)
        ]
        with engine.begin() as conn:
            run.load(
                conn, run.stream(batches, name), item=name, subtree=prefix,
                window=(start, end), expected=len(missing),
            )
        refetched = sum(1 for pmid in missing if pmid in run.fetched)
        missing = [pmid for pmid in missing if pmid not in run.fetched]
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
    seconds = time.perf_counter() - run.t0
    summary: dict[str, Any] = {
        "subtree": prefix,
        "window": [start.isoformat(), end.isoformat()],
        "datetype": datetype,
        "term": term,
        "parts": len(parts),
        "expected": expected,
        "fetched": len(expected_ids.keys() & run.fetched),
        "loaded": run.loaded,
        "unchanged": run.unchanged,
        "deleted": run.deleted,
        "skipped": run.skipped,
        "partial_loads": run.partial_loads,
        "faults": run.faults[:missing_cap],
        "refetched": refetched,
        "missing": missing[:missing_cap],
        "missing_count": len(missing) + max(short, 0),
        "reconciled": reconciled,
        "watermark": watermark.isoformat() if watermark else None,
        "watermark_advanced": advanced,
        "requests": client.requests - run.requests0,
        "seconds": round(seconds, 3),
    }
    log.info(
        "%s: %d expected, %d fetched, %d loaded, %d unchanged, %d deleted, %d skipped, "
        "reconciled=%s, watermark=%s, %d requests in %.1f s",
        label, expected, summary["fetched"], run.loaded, run.unchanged, run.deleted,
        run.skipped, reconciled, summary["watermark"], summary["requests"], seconds,
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
    watermark: a reconciled window after a gap (a preceding window that failed) must not
    jump over the gap, and a backfill of a past window must not move it backwards.
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
    datetype: str = "edat",
) -> date:
    """Where a run without an explicit window starts: the day after the watermark.

    That is where the last reconciled run ended; a subtree never ingested starts at
    ``default_start``. When the watermark already reaches ``end`` the result is ``end``
    itself: the window is never empty, and re-reading one day is cheap and idempotent
    (records that PubMed added late to that day are picked up).
    """
    watermark = read_watermark(conn, prefix.strip(), source=watermark_source(datetype))
    start = watermark + timedelta(days=1) if watermark else default_start
    return min(start, end)
