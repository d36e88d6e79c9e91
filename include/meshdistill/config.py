"""Settings from the environment.

Secrets (database passwords, the NCBI API key) only ever come from here or from Airflow
connections resolved by the DAG files; they are never logged (``repr`` hides them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_EUTILS_URL = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils/"
DATETYPES = ("edat", "mdat")
"""E-utilities date fields a window can be on: Entrez date (new records), modification."""
REPO = Path(__file__).resolve().parents[2]

# Airflow pools the DAGs use (created by `make demo`, the tests and docker-compose's
# airflow-init; plain data here so the demo needs no Airflow import). A slot is
# one running task: `ncbi` caps concurrent pubmed_ingest tasks (the request rate is
# limited separately, in Postgres); `llm` caps concurrent distill tasks, each of which
# keeps at most `max_concurrency` (default 32) HTTP requests in flight itself.
NCBI_POOL = "ncbi"
LLM_POOL = "llm"
POOLS = {
    NCBI_POOL: (2, "NCBI E-utilities: concurrent pubmed_ingest tasks "
                   "(the request rate is limited separately)"),
    LLM_POOL: (4, "concurrent distill tasks; each caps its own HTTP requests "
                   "(max_concurrency, default 32)"),
}


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    """Everything configurable, read once from the environment."""

    home: Path
    database_url: str | None = field(default=None, repr=False)
    ncbi_email: str | None = None
    ncbi_tool: str = "meshdistill"
    ncbi_api_key: str | None = field(default=None, repr=False)
    eutils_url: str = DEFAULT_EUTILS_URL
    mesh_cache: Path | None = None

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(_env("MESHDISTILL_HOME", ".meshdistill") or ".meshdistill").resolve()
        return cls(
            home=home,
            database_url=_env("MESHDISTILL_DATABASE_URL") or _env("AIRFLOW_CONN_MESHDISTILL_DB"),
            ncbi_email=_env("NCBI_EMAIL"),
            ncbi_tool=_env("NCBI_TOOL", "meshdistill") or "meshdistill",
            ncbi_api_key=_env("NCBI_API_KEY"),
            eutils_url=_env("MESHDISTILL_EUTILS_URL", DEFAULT_EUTILS_URL) or DEFAULT_EUTILS_URL,
            mesh_cache=Path(p) if (p := _env("MESHDISTILL_MESH_CACHE")) else None,
        )

    @property
    def mesh_cache_dir(self) -> Path:
        return self.mesh_cache or self.home / "mesh"


def data_dir() -> Path:
    """Local MeSH and PubMedQA files (the demo, calibration): ``MESHDISTILL_DATA_DIR``,
    else the repository's own ``data/`` folder, which ships them gzip-compressed
    (``data/SOURCES.md`` says where each comes from)."""
    return Path(_env("MESHDISTILL_DATA_DIR") or REPO / "data")


def data_file(name: str) -> Path:
    """``name`` (e.g. ``mesh/mtrees2023.bin``) under :func:`data_dir`, plain or with
    ``.gz``, whichever exists (the readers tell the two apart by content); the ``.gz``
    path when neither does, for the error message."""
    plain = data_dir() / name
    return plain if plain.is_file() else plain.with_name(plain.name + ".gz")
