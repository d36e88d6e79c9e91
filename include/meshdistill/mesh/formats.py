"""Readers for NLM's MeSH release formats.

- descriptor XML ``descYYYY.xml`` (plain or gzip): UI, name, tree numbers, scope note,
  entry terms, descriptor class;
- the trees file ``mtreesYYYY.bin``: ``Name;TreeNumber`` lines, no UIs;
- the ``MeshTree.txt`` table: ``Tree Number<TAB>Desc Ui<TAB>Term`` with a header.

Each reader streams its file and yields plain records; joining them is ``combine``'s job.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, cast

from lxml import etree

from meshdistill.errors import MeshSourceError

TREE_NUMBER_RE = re.compile(r"^[A-Z]\d{2}(\.\d{3})*$")
_YEAR_RE = re.compile(r"(19|20)\d{2}")


class MeshFormat(StrEnum):
    DESCRIPTOR_XML = "descriptor-xml"
    MTREES = "mtrees"
    TREE_TABLE = "tree-table"


@dataclass
class Descriptor:
    ui: str
    name: str
    tree_numbers: list[str] = field(default_factory=list)
    scope_note: str | None = None
    descriptor_class: str | None = None
    entry_terms: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TreeEntry:
    tree_number: str
    name: str
    ui: str | None


def year_from_name(path: str | Path) -> int | None:
    match = _YEAR_RE.search(Path(str(path)).name)
    return int(match.group(0)) if match else None


def _open_bytes(path: Path) -> IO[bytes]:
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def sniff_format(path: Path) -> MeshFormat:
    """Recognise a release file by its content, not its name (names vary by mirror)."""
    try:
        with _open_bytes(path) as fh:
            head = fh.read(4096)
    except (OSError, EOFError) as exc:
        raise MeshSourceError(f"{path}: cannot read ({exc})") from exc
    text = head.decode("utf-8-sig", errors="replace").lstrip()
    if text.startswith("<"):
        return MeshFormat.DESCRIPTOR_XML
    first = text.splitlines()[0] if text else ""
    if "\t" in first:
        return MeshFormat.TREE_TABLE
    if ";" in first:
        return MeshFormat.MTREES
    raise MeshSourceError(
        f"{path}: not a MeSH descriptor XML, mtrees .bin or MeshTree.txt file "
        f"(first line: {first[:80]!r})"
    )


def _text(el: etree._Element | None) -> str | None:
    if el is None:
        return None
    value = "".join(el.itertext()).strip()
    return value or None


def read_descriptor_xml(path: Path) -> Iterator[Descriptor]:
    """Stream ``DescriptorRecord`` elements in constant memory."""
    try:
        with _open_bytes(path) as fh:
            context = etree.iterparse(
                fh,
                events=("end",),
                tag="DescriptorRecord",
                load_dtd=False,
                no_network=True,
                resolve_entities=False,
                huge_tree=True,
            )
            for _, rec in context:
                ui = rec.findtext("DescriptorUI")
                name = rec.findtext("DescriptorName/String")
                if ui and name:
                    preferred = rec.find("ConceptList/Concept[@PreferredConceptYN='Y']")
                    scope = _text(preferred.find("ScopeNote")) if preferred is not None else None
                    terms = {
                        t.strip()
                        for t in rec.iterfind("ConceptList/Concept/TermList/Term/String")
                        if t.text
                        for t in [t.text]
                    }
                    terms.discard(name.strip())
                    yield Descriptor(
                        ui=ui.strip(),
                        name=name.strip(),
                        tree_numbers=[
                            t.text.strip()
                            for t in rec.iterfind("TreeNumberList/TreeNumber")
                            if t.text
                        ],
                        scope_note=scope,
                        descriptor_class=rec.get("DescriptorClass"),
                        entry_terms=sorted(terms),
                    )
                rec.clear(keep_tail=True)
                while rec.getprevious() is not None:
                    del rec.getparent()[0]
    except etree.XMLSyntaxError as exc:
        raise MeshSourceError(f"{path}: malformed descriptor XML ({exc})") from exc
    except (EOFError, OSError) as exc:
        raise MeshSourceError(f"{path}: truncated or unreadable ({exc})") from exc


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with _open_bytes(path) as raw:
            for lineno, line in enumerate(raw, start=1):
                yield lineno, line.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
    except (EOFError, OSError, UnicodeDecodeError) as exc:
        raise MeshSourceError(f"{path}: truncated or unreadable ({exc})") from exc


def _check_tree_number(path: Path, lineno: int, tree_number: str) -> None:
    if not TREE_NUMBER_RE.match(tree_number):
        raise MeshSourceError(f"{path}:{lineno}: {tree_number!r} is not a MeSH tree number")


def read_mtrees(path: Path) -> Iterator[TreeEntry]:
    """``Name;TreeNumber`` lines; the name may itself contain ';', the number never does."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        name, sep, tree_number = line.rpartition(";")
        if not sep or not name:
            raise MeshSourceError(f"{path}:{lineno}: expected 'Name;TreeNumber', got {line!r}")
        _check_tree_number(path, lineno, tree_number.strip())
        yield TreeEntry(tree_number.strip(), name.strip(), None)


def read_tree_table(path: Path) -> Iterator[TreeEntry]:
    """``MeshTree.txt``: tab-separated with a header row, UTF-8 (BOM tolerated)."""
    for lineno, line in _lines(path):
        if lineno == 1 and line.lower().startswith("tree number"):
            continue
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise MeshSourceError(f"{path}:{lineno}: expected 3 tab-separated fields")
        tree_number, ui, name = (p.strip() for p in parts[:3])
        _check_tree_number(path, lineno, tree_number)
        yield TreeEntry(tree_number, name, ui or None)
