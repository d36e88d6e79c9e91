"""What one ``pubmed_ingest`` run fetches: the DAG's form and the run's validation.

The form (``meshdistill_airflow.params``) is generated from :class:`IngestRequest`, so it
offers exactly what the run accepts; ``section`` groups the fields in the form.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meshdistill.mesh.tree import SUBTREES_HELP, SubtreePrefix

WHAT, SOURCE = "What to ingest", "Source"


class IngestRequest(BaseModel):
    """Subtrees, and where their records come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FORM: ClassVar[tuple[str, ...]] = ("subtrees", "datetype", "source", "files")
    """The fields the DAG's Params form offers, in its order."""

    subtrees: tuple[SubtreePrefix, ...] = Field(
        default=("C04",), min_length=1, title="MeSH subtrees",
        description=f"{SUBTREES_HELP}; each fetches what PubMed indexed under it",
        json_schema_extra={"section": WHAT})
    datetype: Literal["edat", "mdat"] = Field(
        default="edat", title="Date window on",
        description="edat: the Entrez date (records new to PubMed); mdat: the modification "
        "date (records revised since, such as retractions and corrected MeSH headings)",
        json_schema_extra={"section": WHAT})
    source: Literal["eutils", "files"] = Field(
        default="eutils", title="Source",
        description="eutils: NCBI E-utilities over the run's date window (backfills give "
        "each run its own window); files: local MEDLINE baseline/update XML files",
        json_schema_extra={"section": SOURCE})
    files: tuple[str, ...] = Field(
        default=(), title="MEDLINE files",
        description="with source = files: paths or URLs of baseline/update files, one per "
        "line, in release order (update files carry deletions)",
        json_schema_extra={"section": SOURCE})

    @model_validator(mode="after")
    def _files_with_their_source(self) -> IngestRequest:
        if self.source == "files" and not self.files:
            raise ValueError("source = files needs at least one file")
        if self.source == "eutils" and self.files:
            raise ValueError("files are only read with source = files")
        return self
