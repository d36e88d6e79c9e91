"""PubMedQA-L (``ori_pqal.json``): 1,000 expert-labelled questions with their abstracts.

The calibration benchmark: each record gives a question, the abstract it was written
from (without its conclusion, as PubMedQA defines the context) and that abstract's MeSH
heading names. The file is read plain or gzip-compressed, told apart by content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meshdistill.config import data_file
from meshdistill.errors import ConfigError
from meshdistill.fileio import DataFileError, read_text


def default_pqal_path() -> Path:
    """``pubmedqa/ori_pqal.json``, plain or ``.gz``, under the data directory
    (``MESHDISTILL_DATA_DIR``, else the repository's ``data/``)."""
    return data_file("pubmedqa/ori_pqal.json")


@dataclass(frozen=True)
class PqalRecord:
    """One PubMedQA-L item: the question, its abstract (without conclusion), MeSH names."""

    pmid: int
    question: str
    abstract: str
    mesh_names: tuple[str, ...]


def load_pqal(path: Path | str | None = None, limit: int | None = None) -> list[PqalRecord]:
    """The records of ``ori_pqal.json`` (plain or gzip), sorted by PMID; the first ``limit``
    if given.

    A missing, damaged or malformed file is a :class:`ConfigError` naming it.
    """
    path = Path(path) if path is not None else default_pqal_path()
    if not path.is_file():
        raise ConfigError(
            f"PubMedQA-L file not found: {path} (give --pqal PATH or set MESHDISTILL_DATA_DIR)"
        )
    try:
        text = read_text(path)
    except DataFileError as exc:
        raise ConfigError(f"PubMedQA-L file unreadable: {exc}") from exc
    if not text.strip():
        raise ConfigError(f"PubMedQA-L file {path} is empty")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"PubMedQA-L file {path} is not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"PubMedQA-L file {path}: expected an object keyed by PMID")
    try:
        records = [
            PqalRecord(
                pmid=int(pmid),
                question=r["QUESTION"].strip(),
                abstract=" ".join(c.strip() for c in r["CONTEXTS"]),
                mesh_names=tuple(r["MESHES"]),
            )
            for pmid, r in raw.items()
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"PubMedQA-L file {path}: not in ori_pqal.json's shape ({exc!r})"
        ) from exc
    records.sort(key=lambda r: r.pmid)
    return records[:limit] if limit is not None else records
