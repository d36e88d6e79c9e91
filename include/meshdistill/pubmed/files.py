"""Bulk ingestion from MEDLINE/PubMed XML files (annual baseline, daily updates, efetch)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from meshdistill.pubmed.load import LoadResult, load_records
from meshdistill.pubmed.parser import iter_records
from meshdistill.store.db import get_engine

log = logging.getLogger(__name__)


def load_files(paths: Sequence[str | Path], database_url: str | None = None) -> list[LoadResult]:
    """Load each file in its own transaction, in the order given.

    Order matters for update files (a later file's version or deletion wins), so give
    them in NLM's sequence. A missing, truncated or malformed file is recorded in its
    ``LoadResult`` (``partial``/``failed``) and does not stop the others.
    """
    engine = get_engine(database_url)
    results = []
    for path in paths:
        path = Path(path)
        with engine.begin() as conn:
            result = load_records(
                conn, iter_records(path), source="files", item=str(path)
            )
        if result.parsed == 0 and result.error:
            result.status = "failed"
        log.info(
            "%s: %s — %d parsed, %d loaded, %d unchanged, %d deleted, %d skipped "
            "(%d without abstract, %d without MeSH) in %.1fs",
            path.name, result.status, result.parsed, result.loaded, result.unchanged,
            result.deleted, result.skipped, result.without_abstract, result.without_mesh,
            result.seconds,
        )
        results.append(result)
    return results
