"""Readers for NLM's MeSH release formats.

- descriptor XML ``descYYYY.xml``: UI, name, tree numbers, scope note, entry terms,
  descriptor class;
- the trees file ``mtreesYYYY.bin``: ``Name;TreeNumber`` lines, no UIs;
- the ``MeshTree.txt`` table: ``Tree Number<TAB>Desc Ui<TAB>Term`` with a header.

Every reader takes its file plain or gzip-compressed, told apart by content
(:mod:`meshdistill.fileio`), so ``descYYYY.gz``, ``mtreesYYYY.bin.gz`` and a gzip under a
plain name all read alike. Each reader streams its file and yields plain records; joining
them is ``combine``'s job.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from lxml import etree

from meshdistill.errors import MeshSourceError
from meshdistill.fileio import GZIP_ERRORS, READ_ERRORS, open_bytes

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


def _base_name(path: str | Path) -> str:
    """The file name without its ``.gz`` ending(s): ``mtrees2023.bin.gz`` -> ``mtrees2023.bin``."""
    name = Path(str(path)).name
    while name.lower().endswith(".gz") and len(name) > 3:
        name = name[:-3]
    return name


def year_from_name(path: str | Path) -> int | None:
    """The MeSH year NLM puts in its file names (``desc2026.gz``, ``mtrees2023.bin.gz``,
    ``2017MeshTree.txt``), or None."""
    match = _YEAR_RE.search(_base_name(path))
    return int(match.group(0)) if match else None


def format_from_name(path: str | Path) -> MeshFormat | None:
    """The format a file's name suggests, with or without ``.gz``, or None.

    ``desc*.xml`` and NLM's ``descYYYY.gz`` are descriptor XML, ``*.bin`` a trees file,
    ``*MeshTree.txt`` the tree table. Only a hint: :func:`sniff_format` decides by
    content, and uses the name to explain a file whose content it does not recognise.
    """
    name = _base_name(path).lower()
    if name.startswith("desc") and (name.endswith(".xml") or re.fullmatch(r"desc\d{4}", name)):
        return MeshFormat.DESCRIPTOR_XML
    if name.endswith(".bin"):
        return MeshFormat.MTREES
    if name.endswith("meshtree.txt"):
        return MeshFormat.TREE_TABLE
    return None


def _read_error(path: Path, exc: Exception) -> MeshSourceError:
    """The file and the kind of failure: a damaged gzip, text that is not UTF-8, or an
    OS-level error (missing file, permissions)."""
    if isinstance(exc, GZIP_ERRORS):
        reason = "truncated or corrupt gzip"
    elif isinstance(exc, UnicodeDecodeError):
        reason = "not UTF-8 text"
    else:
        reason = "cannot read"
    return MeshSourceError(f"{path}: {reason} ({exc})")


def sniff_format(path: Path) -> MeshFormat:
    """Recognise a release file by its content, not its name (names vary by mirror).

    The content is read through gzip when it starts with the gzip magic bytes.
    """
    try:
        with open_bytes(path) as fh:
            head = fh.read(4096)
    except READ_ERRORS as exc:
        raise _read_error(path, exc) from exc
    text = head.decode("utf-8-sig", errors="replace").lstrip()
    if text.startswith("<"):
        return MeshFormat.DESCRIPTOR_XML
    first = text.splitlines()[0] if text else ""
    if "\t" in first:
        return MeshFormat.TREE_TABLE
    if ";" in first:
        return MeshFormat.MTREES
    what = "it is empty" if not text else f"first line: {first[:80]!r}"
    hinted = format_from_name(path)
    if hinted is not None:
        what += f"; the name suggests {hinted.value}: is the file damaged or an error page?"
    raise MeshSourceError(
        f"{path}: not a MeSH descriptor XML, mtrees .bin or MeshTree.txt file ({what})"
    )


def _text(el: etree._Element | None) -> str | None:
    if el is None:
        return None
    value = "".join(el.itertext()).strip()
    return value or None


def read_descriptor_xml(path: Path) -> Iterator[Descriptor]:
    """Stream ``DescriptorRecord`` elements in constant memory (plain or gzip file)."""
    try:
        with open_bytes(path) as fh:
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
    except READ_ERRORS as exc:
        raise _read_error(path, exc) from exc


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines of a UTF-8 text file, plain or gzip; a BOM on line 1 is dropped."""
    try:
        with open_bytes(path) as raw:
            for lineno, line in enumerate(raw, start=1):
                yield lineno, line.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
    except (*READ_ERRORS, UnicodeDecodeError) as exc:
        raise _read_error(path, exc) from exc


def _no_rows(path: Path) -> MeshSourceError:
    return MeshSourceError(f"{path}: no tree numbers (the file is empty or a header alone)")


def _check_tree_number(path: Path, lineno: int, tree_number: str) -> None:
    if not TREE_NUMBER_RE.match(tree_number):
        raise MeshSourceError(f"{path}:{lineno}: {tree_number!r} is not a MeSH tree number")


def read_mtrees(path: Path) -> Iterator[TreeEntry]:
    """``Name;TreeNumber`` lines; the name may itself contain ';', the number never does.

    A file without a single line is an error: loading it would replace a release with
    nothing.
    """
    rows = 0
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        name, sep, tree_number = line.rpartition(";")
        if not sep or not name:
            raise MeshSourceError(f"{path}:{lineno}: expected 'Name;TreeNumber', got {line!r}")
        _check_tree_number(path, lineno, tree_number.strip())
        rows += 1
        yield TreeEntry(tree_number.strip(), name.strip(), None)
    if not rows:
        raise _no_rows(path)


def read_tree_table(path: Path) -> Iterator[TreeEntry]:
    """``MeshTree.txt``: tab-separated with a header row, UTF-8 (BOM tolerated).

    A file with no row below the header is an error, as for :func:`read_mtrees`.
    """
    rows = 0
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
        rows += 1
        yield TreeEntry(tree_number, name, ui or None)
    if not rows:
        raise _no_rows(path)
