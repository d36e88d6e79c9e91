"""PubMedQA-L (``ori_pqal.json``): 1,000 expert-labelled questions with their abstracts.

The calibration benchmark: each record gives a question, the abstract it was written
from (without its conclusion, as PubMedQA defines the context) and that abstract's MeSH
heading names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meshdistill.config import data_dir
from meshdistill.errors import ConfigError


def default_pqal_path() -> Path:
    """``pubmedqa/ori_pqal.json`` under the data directory (``MESHDISTILL_DATA_DIR``)."""
    return data_dir() / "pubmedqa" / "ori_pqal.json"


@dataclass(frozen=True)
class PqalRecord:
    """One PubMedQA-L item: the question, its abstract (without conclusion), MeSH names."""

    pmid: int
    question: str
    abstract: str
    mesh_names: tuple[str, ...]


def load_pqal(path: Path | str | None = None, limit: int | None = None) -> list[PqalRecord]:
    """The records of ``ori_pqal.json``, sorted by PMID; the first ``limit`` if given."""
    path = Path(path) if path is not None else default_pqal_path()
    if not path.is_file():
        raise ConfigError(
            f"PubMedQA-L file not found: {path} (give --pqal PATH or set MESHDISTILL_DATA_DIR)"
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    records = [
        PqalRecord(
            pmid=int(pmid),
            question=r["QUESTION"].strip(),
            abstract=" ".join(c.strip() for c in r["CONTEXTS"]),
            mesh_names=tuple(r["MESHES"]),
        )
        for pmid, r in raw.items()
    ]
    records.sort(key=lambda r: r.pmid)
    return records[:limit] if limit is not None else records
