"""What one ``mesh_refresh`` run loads: the DAG's form and the run's validation."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

RELEASE = "MeSH release"


class MeshRefreshRequest(BaseModel):
    """The release files to load, their year, and whether tree numbers absent from them go."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FORM: ClassVar[tuple[str, ...]] = ("sources", "year", "replace")
    """The fields the DAG's Params form offers, in its order."""

    sources: tuple[str, ...] = Field(
        default=(), title="Release files",
        description="paths or URLs of NLM MeSH files, one per line: descriptors "
        "(descYYYY.xml or .gz), trees (mtreesYYYY.bin) and/or MeshTree.txt; they combine "
        "(UIs from one, trees from another). Empty: NLM's descriptor file of the year, "
        "downloaded once and cached under MESHDISTILL_HOME/mesh",
        json_schema_extra={"section": RELEASE})
    year: int | None = Field(
        default=None, ge=1960, le=2100, title="MeSH year",
        description="empty: from the file names, else the current year",
        json_schema_extra={"section": RELEASE})
    replace: bool = Field(
        default=True, title="Remove tree numbers not in this release",
        description="tree numbers move between MeSH years; turn off only when loading a "
        "partial file", json_schema_extra={"section": RELEASE})
