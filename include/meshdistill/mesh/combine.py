"""Join MeSH sources into one release.

``mtreesYYYY.bin`` has names but no UIs; ``MeshTree.txt`` and the descriptor XML have
UIs. Tree numbers come from the newest source that has them (tree numbers move between
MeSH years); UIs come from any source, joined on the descriptor name. What did not join
is reported, never silently dropped: such tree numbers are kept with a NULL UI until a
later source (or the UI+name pairs in article headings) supplies one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshdistill.mesh.formats import (
    Descriptor,
    MeshFormat,
    TreeEntry,
    read_descriptor_xml,
    read_mtrees,
    read_tree_table,
    sniff_format,
    year_from_name,
)


@dataclass
class MeshRelease:
    year: int | None
    descriptors: dict[str, Descriptor]
    trees: dict[str, TreeEntry]
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def unjoined(self) -> list[TreeEntry]:
        return [t for t in self.trees.values() if t.ui is None]


@dataclass
class _Source:
    path: Path
    fmt: MeshFormat
    year: int | None
    descriptors: list[Descriptor]
    trees: list[TreeEntry]


def _read(path: Path) -> _Source:
    fmt = sniff_format(path)
    descriptors: list[Descriptor] = []
    trees: list[TreeEntry] = []
    if fmt is MeshFormat.DESCRIPTOR_XML:
        descriptors = list(read_descriptor_xml(path))
        trees = [TreeEntry(t, d.name, d.ui) for d in descriptors for t in d.tree_numbers]
    elif fmt is MeshFormat.MTREES:
        trees = list(read_mtrees(path))
    else:
        trees = list(read_tree_table(path))
    return _Source(path, fmt, year_from_name(path), descriptors, trees)


def combine(paths: Iterable[Path], year: int | None = None) -> MeshRelease:
    sources = [_read(Path(p)) for p in paths]
    if not sources:
        raise ValueError("no MeSH sources given")

    # UI <- name, from every source that pairs them; exact names first, then casefolded.
    by_name: dict[str, str] = {}
    by_folded: dict[str, str] = {}
    descriptors: dict[str, Descriptor] = {}
    from_xml: set[str] = set()
    for src in sources:
        for d in src.descriptors:
            descriptors[d.ui] = d
            from_xml.add(d.ui)
        for t in src.trees:
            if t.ui:
                by_name.setdefault(t.name, t.ui)
                by_folded.setdefault(t.name.casefold(), t.ui)
                descriptors.setdefault(t.ui, Descriptor(ui=t.ui, name=t.name))
        for d in src.descriptors:
            by_name[d.name] = d.ui
            by_folded[d.name.casefold()] = d.ui

    tree_sources = [s for s in sources if s.trees]
    tree_source = max(tree_sources, key=lambda s: s.year or 0) if tree_sources else None
    trees: dict[str, TreeEntry] = {}
    if tree_source is not None:
        for t in tree_source.trees:
            ui = t.ui or by_name.get(t.name) or by_folded.get(t.name.casefold())
            trees[t.tree_number] = TreeEntry(t.tree_number, t.name, ui)
            if ui is not None:
                known = descriptors.get(ui)
                if known is None:
                    descriptors[ui] = Descriptor(ui=ui, name=t.name)
                elif ui not in from_xml:
                    known.name = t.name  # the tree source is the newest: its spelling wins

    for d in descriptors.values():
        d.tree_numbers = []
    for t in trees.values():
        if t.ui is not None:
            descriptors[t.ui].tree_numbers.append(t.tree_number)

    unjoined = sorted({t.name for t in trees.values() if t.ui is None})
    release_year = year or (tree_source.year if tree_source else None)
    report: dict[str, Any] = {
        "year": release_year,
        "sources": [
            {"path": str(s.path), "format": s.fmt.value, "year": s.year,
             "descriptors": len(s.descriptors) or len({t.ui for t in s.trees if t.ui}),
             "tree_numbers": len(s.trees)}
            for s in sources
        ],
        "tree_source": str(tree_source.path) if tree_source else None,
        "tree_numbers": len(trees),
        "tree_numbers_joined": sum(1 for t in trees.values() if t.ui),
        "tree_numbers_unjoined": sum(1 for t in trees.values() if t.ui is None),
        "names_unjoined": len(unjoined),
        "names_unjoined_sample": unjoined[:20],
        "descriptors": len(descriptors),
    }
    return MeshRelease(release_year, descriptors, trees, report)
