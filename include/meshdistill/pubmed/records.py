"""What the parser yields.

Plain slotted dataclasses rather than pydantic models: a baseline file holds 30,000
records and validation would cost more than the parse itself; the parser builds them
from already-typed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

_JSONL = orjson.OPT_APPEND_NEWLINE


@dataclass(slots=True)
class Section:
    label: str | None
    category: str | None
    text: str


@dataclass(slots=True)
class MeshHeading:
    ui: str
    name: str
    major: bool
    qualifiers: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Article:
    pmid: str
    title: str
    sections: list[Section]
    journal: str | None
    pub_year: int | None
    languages: list[str]
    publication_types: list[str]
    mesh: list[MeshHeading]
    keywords: list[str]
    doi: str | None
    pmc: str | None
    revised: str | None  # ISO date of DateRevised
    entrez_date: str | None  # ISO date PubMed first listed the record (EDAT)
    status: str  # 'active' or 'retracted'
    retraction_of: list[str] = field(default_factory=list)

    @property
    def abstract(self) -> str:
        return "\n".join(s.text for s in self.sections if s.text)

    def to_json(self) -> dict[str, Any]:
        return {
            "pmid": self.pmid,
            "title": self.title,
            "abstract": self.abstract,
            "sections": [
                {"label": s.label, "category": s.category, "text": s.text} for s in self.sections
            ],
            "journal": self.journal,
            "pub_year": self.pub_year,
            "languages": self.languages,
            "publication_types": self.publication_types,
            "mesh": [
                {"ui": m.ui, "name": m.name, "major": m.major, "qualifiers": m.qualifiers}
                for m in self.mesh
            ],
            "keywords": self.keywords,
            "doi": self.doi,
            "pmc": self.pmc,
            "revised": self.revised,
            "status": self.status,
        }

    def to_jsonl(self) -> bytes:
        """:meth:`to_json` as one UTF-8 JSON line (newline included), for ``pubmed parse``.

        orjson on the dict: ~4x faster than ``json.dumps``, and ~2x faster than handing
        orjson the slotted dataclasses themselves (its dataclass path reads fields one by one).
        """
        return orjson.dumps(self.to_json(), option=_JSONL)


@dataclass(slots=True)
class Deletion:
    pmid: str
    status: str = "deleted"

    def to_json(self) -> dict[str, Any]:
        return {"pmid": self.pmid, "status": self.status}

    def to_jsonl(self) -> bytes:
        """:meth:`to_json` as one UTF-8 JSON line (newline included)."""
        return orjson.dumps(self.to_json(), option=_JSONL)


@dataclass(slots=True)
class Skip:
    """A record the parser could not use (e.g. no PMID), with why."""

    pmid: str | None
    reason: str


Record = Article | Deletion | Skip
