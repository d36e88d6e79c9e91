"""Readers for NLM's MeSH release formats, and the join of a trees-only file with UIs.

Counts come from ``data/SOURCES.md`` and are re-derived here from the raw files with
plain Python (``gzip`` and string splitting, no reader code), so that a reader which
drops or invents lines fails.
"""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest
from meshdistill.errors import MeshSourceError
from meshdistill.mesh.combine import MeshRelease, combine
from meshdistill.mesh.formats import (
    Descriptor,
    MeshFormat,
    TreeEntry,
    format_from_name,
    read_descriptor_xml,
    read_mtrees,
    read_tree_table,
    sniff_format,
    year_from_name,
)
from meshdistill.mesh.sources import resolve

from tests.support import DESC_SAMPLES, MESH_TREE_2017, MTREES_2023


def raw_text(path: Path, encoding: str = "utf-8") -> str:
    """A gzip data file's text, decompressed with the standard library alone."""
    return gzip.decompress(path.read_bytes()).decode(encoding)


@pytest.fixture(scope="module")
def mtrees() -> list[TreeEntry]:
    return list(read_mtrees(MTREES_2023))


@pytest.fixture(scope="module")
def table() -> list[TreeEntry]:
    return list(read_tree_table(MESH_TREE_2017))


@pytest.fixture(scope="module")
def descriptors() -> list[Descriptor]:
    return list(read_descriptor_xml(DESC_SAMPLES))


@pytest.fixture(scope="module")
def release() -> MeshRelease:
    return combine([MTREES_2023, MESH_TREE_2017, DESC_SAMPLES])


# --- descriptor XML -------------------------------------------------------------------------


def test_descriptor_xml(descriptors: list[Descriptor]) -> None:
    assert len(descriptors) == 43
    first = descriptors[0]
    assert (first.ui, first.name, first.descriptor_class) == ("D000001", "Calcimycin", "1")
    assert first.tree_numbers == ["D03.438.221.173"]
    assert first.scope_note is not None
    assert first.scope_note.startswith("An ionophorous, polyether antibiotic")
    assert first.entry_terms == ["A 23187", "A-23187", "A23187", "A23187, Antibiotic",
                                 "Antibiotic A23187"]
    assert "Calcimycin" not in first.entry_terms  # the preferred term is the name
    assert sum(1 for d in descriptors if d.tree_numbers) == 42
    assert sum(1 for d in descriptors if d.scope_note) == 41
    assert Counter(d.descriptor_class for d in descriptors) == {"1": 34, "2": 6, "3": 1, "4": 2}
    by_ui = {d.ui: d for d in descriptors}
    assert by_ui["D005260"].name == "Female" and by_ui["D005260"].tree_numbers == []  # check tag
    assert by_ui["D005858"].tree_numbers == ["Z01.542.315", "Z01.586.315"]  # Germany


def test_descriptor_xml_gzip(tmp_path: Path, descriptors: list[Descriptor]) -> None:
    """NLM ships ``descYYYY.gz``: the same reader, recognised by content."""
    gz = tmp_path / "desc2016.gz"
    gz.write_bytes(DESC_SAMPLES.read_bytes())
    assert sniff_format(gz) is MeshFormat.DESCRIPTOR_XML
    assert list(read_descriptor_xml(gz)) == descriptors
    plain = tmp_path / "desc2016.xml"
    plain.write_bytes(gzip.decompress(DESC_SAMPLES.read_bytes()))
    assert sniff_format(plain) is MeshFormat.DESCRIPTOR_XML
    assert list(read_descriptor_xml(plain)) == descriptors


# --- mtrees ---------------------------------------------------------------------------------


def test_mtrees(mtrees: list[TreeEntry]) -> None:
    raw = raw_text(MTREES_2023, "ascii").splitlines()
    assert len(raw) == len(mtrees) == 63_056
    assert [f"{t.name};{t.tree_number}" for t in mtrees] == raw
    assert len({t.tree_number for t in mtrees}) == 63_056
    assert len({t.name for t in mtrees}) == 30_452
    assert all(t.ui is None for t in mtrees)  # the file has no UIs
    assert TreeEntry("C04", "Neoplasms", None) in mtrees
    assert TreeEntry("B01.050.150.900.649.313.988.400.112.400.400", "Humans", None) in mtrees
    assert sum(1 for t in mtrees if t.name == "COVID-19") == 5
    assert sum(1 for t in mtrees if "." not in t.tree_number) == 115
    assert Counter(t.tree_number[0] for t in mtrees)["C"] == 12_950


def test_mtrees_name_with_semicolon(tmp_path: Path) -> None:
    """Only the last ';' separates: descriptor names may contain one."""
    path = tmp_path / "mtrees2099.bin"
    path.write_text("Odd; Name;C04.001\nNeoplasms;C04\n")
    assert list(read_mtrees(path)) == [
        TreeEntry("C04.001", "Odd; Name", None), TreeEntry("C04", "Neoplasms", None)
    ]


# --- MeshTree.txt ---------------------------------------------------------------------------


def test_tree_table(table: list[TreeEntry]) -> None:
    assert gzip.decompress(MESH_TREE_2017.read_bytes())[:3] == b"\xef\xbb\xbf"  # a BOM ...
    assert len(table) == 57_840  # ... and neither it nor the header became a row
    assert table[0] == TreeEntry("A01", "Body Regions", "D001829")
    assert not any(t.name.startswith("\ufeff") or t.tree_number.startswith("\ufeff")
                   for t in table)
    assert len({t.ui for t in table}) == len({t.name for t in table}) == 28_470
    assert Counter(t.tree_number[0] for t in table)["C"] == 11_480
    assert TreeEntry("C04", "Neoplasms", "D009369") in table


def test_sniff_format() -> None:
    assert sniff_format(DESC_SAMPLES) is MeshFormat.DESCRIPTOR_XML
    assert sniff_format(MTREES_2023) is MeshFormat.MTREES
    assert sniff_format(MESH_TREE_2017) is MeshFormat.TREE_TABLE


def test_year_from_name() -> None:
    assert year_from_name(MTREES_2023) == 2023  # mtrees2023.bin.gz
    assert year_from_name(MESH_TREE_2017) == 2017  # 2017MeshTree.txt.gz
    assert year_from_name("desc2026.gz") == 2026
    assert year_from_name("desc2023.xml.gz") == 2023
    assert year_from_name("/cache/2024/mtrees2023.bin") == 2023  # the name, not the folder
    assert year_from_name(DESC_SAMPLES) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mtrees2023.bin", MeshFormat.MTREES),
        ("mtrees2023.bin.gz", MeshFormat.MTREES),
        ("2017MeshTree.txt", MeshFormat.TREE_TABLE),
        ("2017MeshTree.txt.gz", MeshFormat.TREE_TABLE),
        ("desc2023.xml", MeshFormat.DESCRIPTOR_XML),
        ("desc2023.xml.gz", MeshFormat.DESCRIPTOR_XML),
        ("desc2023.gz", MeshFormat.DESCRIPTOR_XML),
        ("desc-samples.xml.gz", MeshFormat.DESCRIPTOR_XML),
        ("qual2023.xml", None),
        ("mesh.dat", None),
        (".gz", None),
    ],
)
def test_format_from_name(name: str, expected: MeshFormat | None) -> None:
    assert format_from_name(name) is expected


def test_content_decides_over_name(tmp_path: Path) -> None:
    """A tree table saved as ``mtrees2023.bin.gz`` (and not compressed) is a tree table."""
    path = tmp_path / "mtrees2023.bin.gz"
    path.write_bytes(gzip.decompress(MESH_TREE_2017.read_bytes()))
    assert sniff_format(path) is MeshFormat.TREE_TABLE


def test_unrecognised_file_names_the_format_its_name_suggests(tmp_path: Path) -> None:
    path = tmp_path / "mtrees2023.bin.gz"
    path.write_bytes(gzip.compress(b"Service Unavailable\n"))
    with pytest.raises(MeshSourceError, match="the name suggests mtrees"):
        sniff_format(path)


# --- bad files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a MeSH descriptor XML"),
        (b"tree,ui,name\nC04,D009369,Neoplasms\n", "not a MeSH descriptor XML"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not a MeSH descriptor XML"),
    ],
)
def test_unrecognised_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "mesh.dat"
    path.write_bytes(content)
    with pytest.raises(MeshSourceError, match=message):
        sniff_format(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MeshSourceError, match="cannot read"):
        sniff_format(tmp_path / "nope.bin")
    with pytest.raises(MeshSourceError, match="is not a file or URL"):
        resolve(str(tmp_path / "nope.bin"), tmp_path)


def test_bad_mtrees_lines(tmp_path: Path) -> None:
    path = tmp_path / "mtrees2023.bin"
    path.write_text("Neoplasms;C04\nNo separator here\n")
    with pytest.raises(MeshSourceError, match=r"mtrees2023.bin:2: expected 'Name;TreeNumber'"):
        list(read_mtrees(path))
    path.write_text("Neoplasms;C04\nNeoplasm;C4\n")
    with pytest.raises(MeshSourceError, match=r":2: 'C4' is not a MeSH tree number"):
        list(read_mtrees(path))
    path.write_bytes(b"Neoplasms;C04\nN\xe9oplasmes;C04.001\n")  # Latin-1, not UTF-8
    with pytest.raises(MeshSourceError, match="not UTF-8 text"):
        list(read_mtrees(path))


def test_bad_tree_table(tmp_path: Path) -> None:
    path = tmp_path / "MeshTree.txt"
    path.write_text("Tree Number\tDesc Ui\tTerm\nC04\tD009369\n")
    with pytest.raises(MeshSourceError, match=":2: expected 3 tab-separated fields"):
        list(read_tree_table(path))


def test_bad_descriptor_xml(tmp_path: Path) -> None:
    data = gzip.decompress(DESC_SAMPLES.read_bytes())
    truncated = tmp_path / "desc-truncated.xml"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MeshSourceError, match="malformed descriptor XML"):
        list(read_descriptor_xml(truncated))
    truncated_gz = tmp_path / "desc2016.gz"
    truncated_gz.write_bytes(gzip.compress(data)[:5_000])
    with pytest.raises(MeshSourceError, match="truncated or corrupt gzip"):
        list(read_descriptor_xml(truncated_gz))


# --- combine: UIs for the 2023 tree numbers, joined on the name -----------------------------


def _independent_join() -> tuple[int, int, int, int]:
    """Exact-name matches, casefold matches, and the tree numbers they cover, computed from
    the raw files with nothing but string splitting."""
    names_2017 = {}
    for line in raw_text(MESH_TREE_2017, "utf-8-sig").splitlines()[1:]:
        _, ui, name = line.split("\t")
        names_2017[name] = ui
    folded_2017 = {n.casefold() for n in names_2017}
    pairs = [line.rsplit(";", 1) for line in raw_text(MTREES_2023).splitlines()]
    names_2023 = {name for name, _ in pairs}
    exact = len(names_2023 & set(names_2017))
    folded = sum(1 for n in names_2023 if n in names_2017 or n.casefold() in folded_2017)
    trees_joined = sum(1 for n, _ in pairs if n in names_2017 or n.casefold() in folded_2017)
    return exact, folded, trees_joined, len(pairs)


def test_combine_join_report(release: MeshRelease) -> None:
    exact, folded, trees_joined, trees = _independent_join()
    assert exact == 28_082  # SOURCES.md: by exact name, 28,082 of the 30,452 names
    assert folded == 28_083  # one more differs from its 2017 spelling only in case
    report = release.report
    assert report["year"] == 2023 and release.year == 2023
    assert report["tree_source"] == str(MTREES_2023)  # the newest source gives tree numbers
    assert report["tree_numbers"] == trees == 63_056
    assert report["tree_numbers_joined"] == trees_joined == 58_027
    assert report["tree_numbers_unjoined"] == trees - trees_joined == len(release.unjoined)
    assert report["names_unjoined"] == 30_452 - folded == 2_369
    assert report["names_unjoined_sample"][:2] == ["12E7 Antigen",
                                                   "17 alpha-Hydroxyprogesterone Caproate"]
    assert [s["format"] for s in report["sources"]] == ["mtrees", "tree-table", "descriptor-xml"]


def test_combine_contents(release: MeshRelease) -> None:
    trees = release.trees
    assert trees["C04"] == TreeEntry("C04", "Neoplasms", "D009369")
    # Every joined UI is the one the 2017 table gives that name.
    ui_by_name = {t.name: t.ui for t in read_tree_table(MESH_TREE_2017)}
    exact = [t for t in trees.values() if t.name in ui_by_name]
    assert exact and all(t.ui == ui_by_name[t.name] for t in exact)
    # Unjoined tree numbers are kept with no UI, not dropped.
    assert all(t.ui is None for t in release.unjoined)
    assert "COVID-19" in {t.name for t in release.unjoined}  # new since 2017
    neoplasms = release.descriptors["D009369"]
    assert "C04" in neoplasms.tree_numbers
    assert all(trees[t].ui == "D009369" for t in neoplasms.tree_numbers)
    # Descriptor XML contributes scope notes and entry terms; names from the newest trees.
    calcimycin = release.descriptors["D000001"]
    assert calcimycin.scope_note and "A23187" in calcimycin.entry_terms
    assert calcimycin.tree_numbers == [t.tree_number for t in trees.values()
                                       if t.ui == "D000001"]
    # 28,470 UIs from the 2017 table plus one desc2016 record it does not have.
    assert len(release.descriptors) == 28_471


def test_combine_without_xml_and_empty() -> None:
    release = combine([MESH_TREE_2017, MTREES_2023])  # order does not matter
    assert release.report["tree_source"] == str(MTREES_2023)
    assert release.report["tree_numbers_joined"] == 58_027
    with pytest.raises(ValueError, match="no MeSH sources"):
        combine([])
