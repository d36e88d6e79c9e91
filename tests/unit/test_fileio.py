"""Plain and gzip data files read alike, told apart by content rather than name.

The repository ships its data gzip-compressed; here each reader is given the same content
four ways (plain under a plain name, the in-repo gzip, gzip under a plain name, plain
under a ``.gz`` name) and must give identical records. Damaged gzip files (empty,
header only, cut in half, corrupt) must give the reader's own error naming the file.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from meshdistill.errors import ConfigError, MeshDistillError, MeshSourceError, PubmedParseError
from meshdistill.evaluate.pubmedqa import load_pqal
from meshdistill.fileio import (
    GZIP_MAGIC,
    DataFileError,
    is_gzip,
    open_bytes,
    open_text,
    read_bytes,
    read_text,
)
from meshdistill.mesh.combine import combine
from meshdistill.mesh.formats import (
    MeshFormat,
    read_descriptor_xml,
    read_mtrees,
    read_tree_table,
    sniff_format,
)
from meshdistill.pubmed.parser import iter_records

from tests.support import DESC_SAMPLES, EUTILS_DIR, MESH_TREE_2017, MTREES_2023, PQAL

PUBMED4 = EUTILS_DIR / "biopython" / "pubmed4.xml.gz"
METAPUB = EUTILS_DIR / "metapub" / "pmid_38747095.xml.gz"

Reader = Callable[[Path], Any]

# Each reader and the in-repo gzip file it reads; the records must compare equal.
READERS: dict[str, tuple[Path, Reader]] = {
    "mtrees": (MTREES_2023, lambda p: list(read_mtrees(p))),
    "tree-table": (MESH_TREE_2017, lambda p: list(read_tree_table(p))),
    "descriptor-xml": (DESC_SAMPLES, lambda p: list(read_descriptor_xml(p))),
    "pqal": (PQAL, load_pqal),
    "pubmed-xml": (PUBMED4, lambda p: list(iter_records(p))),
}

# The error each reader raises for a damaged file (all are MeshDistillError).
ERRORS: dict[str, type[MeshDistillError]] = {
    "mtrees": MeshSourceError,
    "tree-table": MeshSourceError,
    "descriptor-xml": MeshSourceError,
    "pqal": ConfigError,
    "pubmed-xml": PubmedParseError,
}


def plain_name(gz: Path) -> str:
    return gz.name.removesuffix(".gz")


# --- the data as shipped ---------------------------------------------------------------------


def test_the_shipped_data_is_gzip() -> None:
    for path in (MTREES_2023, MESH_TREE_2017, DESC_SAMPLES, PQAL, PUBMED4, METAPUB):
        assert path.read_bytes()[:2] == GZIP_MAGIC and is_gzip(path), path
        header = path.read_bytes()[:10]
        assert header[4:8] == b"\0\0\0\0", f"{path}: gzip -n stores no time stamp"
        assert header[3] & 0x08 == 0, f"{path}: gzip -n stores no file name"


# --- the helper ------------------------------------------------------------------------------


def test_helper_reads_by_content_not_name(tmp_path: Path) -> None:
    data = gzip.decompress(METAPUB.read_bytes())
    plain = tmp_path / "efetch.xml"
    plain.write_bytes(data)
    gz_plain_name = tmp_path / "efetch-gzip.xml"  # gzip under a plain name
    shutil.copyfile(METAPUB, gz_plain_name)
    plain_gz_name = tmp_path / "efetch-plain.xml.gz"  # plain under a .gz name
    plain_gz_name.write_bytes(data)
    for path in (plain, METAPUB, gz_plain_name, plain_gz_name):
        assert read_bytes(path) == data, path
        assert read_text(path) == data.decode("utf-8"), path
        with open_bytes(path) as fh:
            assert fh.read() == data, path
        with open_text(path) as fh:
            assert fh.read() == data.decode("utf-8"), path
    assert [is_gzip(p) for p in (plain, METAPUB, gz_plain_name, plain_gz_name)] == [
        False, True, True, False
    ]


def test_helper_drops_the_bom_when_asked() -> None:
    with open_text(MESH_TREE_2017, encoding="utf-8-sig") as fh:
        assert fh.readline() == "Tree Number\tDesc Ui\tTerm\n"
    with open_text(MESH_TREE_2017) as fh:
        assert fh.readline().startswith("\ufeffTree Number")


def test_helper_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="cannot read"):
        read_bytes(tmp_path / "missing.json.gz")
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(PQAL.read_bytes()[:1000])
    with pytest.raises(DataFileError, match=r"cut\.json\.gz: truncated or corrupt gzip"):
        read_bytes(cut)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(gzip.compress(b"N\xe9oplasmes"))
    with pytest.raises(DataFileError, match="not utf-8 text"):
        read_text(latin)
    empty = tmp_path / "empty.gz"
    empty.write_bytes(b"")
    assert not is_gzip(empty) and read_bytes(empty) == b""  # the readers judge emptiness


# --- every reader: plain, gzip, and each under the other's name ------------------------------


@pytest.mark.parametrize("reader", list(READERS))
def test_reader_gives_the_same_records_plain_and_gzip(reader: str, tmp_path: Path) -> None:
    gz, read = READERS[reader]
    data = gzip.decompress(gz.read_bytes())
    plain = tmp_path / plain_name(gz)
    plain.write_bytes(data)
    gz_plain_name = tmp_path / "gzip" / plain_name(gz)
    gz_plain_name.parent.mkdir()
    shutil.copyfile(gz, gz_plain_name)
    plain_gz_name = tmp_path / "plain" / gz.name
    plain_gz_name.parent.mkdir()
    plain_gz_name.write_bytes(data)

    expected = read(plain)
    assert expected, "the reader found no records at all"
    assert read(gz) == expected
    assert read(gz_plain_name) == expected
    assert read(plain_gz_name) == expected


def test_sniff_and_combine_by_content(tmp_path: Path) -> None:
    """Format detection and the join see through gzip and through misleading names."""
    renamed = {
        MTREES_2023: tmp_path / "mtrees2023.bin",  # gzip, plain name
        MESH_TREE_2017: tmp_path / "2017MeshTree.txt",
        DESC_SAMPLES: tmp_path / "desc-samples.xml",
    }
    for gz, path in renamed.items():
        shutil.copyfile(gz, path)
    assert [sniff_format(p) for p in renamed.values()] == [
        MeshFormat.MTREES, MeshFormat.TREE_TABLE, MeshFormat.DESCRIPTOR_XML
    ]
    shipped = combine(list(renamed))
    again = combine(list(renamed.values()))
    assert again.year == shipped.year == 2023
    assert again.trees == shipped.trees
    assert again.descriptors == shipped.descriptors


# --- damaged gzip: the reader's own error, naming the file -----------------------------------


def _damaged(kind: str, gz: bytes) -> bytes:
    if kind == "empty-file":
        return b""
    if kind == "empty-gzip":
        return gzip.compress(b"")
    if kind == "header-only":
        return gz[:10]
    if kind == "cut-in-half":
        return gz[: len(gz) // 2]
    assert kind == "corrupt"
    return gz[:10] + b"\0" * 64 + gz[74:]


@pytest.mark.parametrize("kind", ["empty-file", "empty-gzip", "header-only", "cut-in-half",
                                  "corrupt"])
@pytest.mark.parametrize("reader", list(READERS))
def test_damaged_gzip_gives_a_clear_error(reader: str, kind: str, tmp_path: Path) -> None:
    gz, read = READERS[reader]
    path = tmp_path / gz.name
    path.write_bytes(_damaged(kind, gz.read_bytes()))
    with pytest.raises(ERRORS[reader]) as info:
        read(path)
    message = str(info.value)
    assert str(path) in message
    if kind in ("header-only", "cut-in-half", "corrupt"):
        assert "truncated or corrupt gzip" in message


@pytest.mark.parametrize("kind", ["empty-file", "empty-gzip", "header-only", "corrupt"])
def test_damaged_source_is_refused_before_reading(kind: str, tmp_path: Path) -> None:
    path = tmp_path / MTREES_2023.name
    path.write_bytes(_damaged(kind, MTREES_2023.read_bytes()))
    with pytest.raises(MeshSourceError, match=r"empty|truncated or corrupt gzip"):
        combine([path])
