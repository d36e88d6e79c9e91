"""A streaming MEDLINE/PubMed XML parser (efetch output, baseline and update files).

lxml ``iterparse`` over ``PubmedArticle``/``PubmedBookArticle``/``DeleteCitation``
elements, each cleared as soon as it is read, so memory stays flat whatever the file
size. Files are read plain or gzip-compressed, told apart by content. No DTD is ever
loaded or fetched (``Bio.Entrez.parse`` tries to download NLM's DTD and fails offline).
Inline markup in titles and abstracts (``<i>``, ``<sup>``, MathML) is flattened to its
text.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import IO

from lxml import etree

from meshdistill.errors import PubmedParseError
from meshdistill.fileio import GZIP_ERRORS, is_gzip
from meshdistill.pubmed.gunzip import ThreadedGunzip
from meshdistill.pubmed.records import Article, Deletion, MeshHeading, Record, Section, Skip

RECORD_TAGS = ("PubmedArticle", "PubmedBookArticle", "DeleteCitation")
PARSER_OPTIONS = {
    "load_dtd": False,
    "no_network": True,
    "resolve_entities": False,
    "huge_tree": True,
    "remove_comments": True,
    "collect_ids": False,
}
"""lxml options of every parse: no DTD, no network, no entity expansion."""
_RETRACTED_TYPES = frozenset({"Retracted Publication"})


def _flat(el: etree._Element | None) -> str:
    """All text under ``el`` (markup flattened), with runs of white space folded."""
    if el is None:
        return ""
    text = el.text or "" if len(el) == 0 else "".join(el.itertext())
    return " ".join(text.split())


def _date(el: etree._Element | None) -> str | None:
    if el is None:
        return None
    year = month = day = None
    for child in el:
        tag = child.tag
        if tag == "Year":
            year = child.text
        elif tag == "Month":
            month = child.text
        elif tag == "Day":
            day = child.text
    if not year:
        return None
    month = month or "1"
    if not month.isdigit():
        month = str(_MONTHS.get(month[:3].lower(), 1))
    try:
        # date() rejects impossible dates ('2021-02-30'), which would otherwise fail the
        # COPY into a ``date`` column and with it the whole file's load.
        return date(int(year), int(month), int(day or 1)).isoformat()
    except ValueError:
        return None


_MONTHS = {
    m: i
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}


def _first_year(text: str | None) -> int | None:
    """The first four-digit run: 'Year' is plain, 'MedlineDate' reads like '1998 Dec-1999 Jan'."""
    if not text:
        return None
    for i in range(len(text) - 3):
        chunk = text[i : i + 4]
        if chunk.isdigit():
            return int(chunk)
    return None


def _journal(journal: etree._Element) -> tuple[str | None, int | None]:
    title = None
    year = None
    for child in journal:
        tag = child.tag
        if tag == "Title":
            title = child.text
        elif tag == "JournalIssue":
            for part in child:
                if part.tag == "PubDate":
                    for d in part:
                        if d.tag in ("Year", "MedlineDate"):
                            year = _first_year(d.text)
                            break
    return title, year


def _sections(abstract: etree._Element) -> list[Section]:
    out = []
    for part in abstract:
        if part.tag == "AbstractText":
            text = _flat(part)
            label = part.get("Label")
            # A labelled section may be empty ('LEVEL OF EVIDENCE: 4'): the label is content.
            if text or label:
                out.append(Section(label, part.get("NlmCategory"), text))
    return out


def _mesh(heading_list: etree._Element) -> list[MeshHeading]:
    """Headings in order, one per descriptor (a repeated descriptor is merged).

    The hottest loop of the parser (≈11 headings per article): a single C-level
    ``iter()`` over DescriptorName/QualifierName, relying on the DTD's order
    (``MeshHeading: DescriptorName, QualifierName*``), and ``.text`` instead of
    ``itertext()`` since these names carry no markup.
    """
    headings: dict[str, MeshHeading] = {}
    current: MeshHeading | None = None
    for el in heading_list.iter("DescriptorName", "QualifierName"):
        if el.tag == "DescriptorName":
            ui = el.get("UI")
            name = el.text
            if not ui or not name:
                current = None
                continue
            major = el.get("MajorTopicYN") == "Y"
            current = headings.get(ui)
            if current is None:
                current = headings[ui] = MeshHeading(ui, name.strip(), major, [])
            elif major:
                current.major = True
        elif current is not None:
            qualifier = el.text
            if qualifier and qualifier not in current.qualifiers:
                current.qualifiers.append(qualifier)
            if el.get("MajorTopicYN") == "Y":
                current.major = True
    return list(headings.values())


def _texts(parent: etree._Element, tag: str) -> list[str]:
    return [t for t in (_flat(el) for el in parent if el.tag == tag) if t]


class _PubmedData:
    """What PubmedData adds: article ids and the Entrez date."""

    __slots__ = ("entrez_date", "ids")

    def __init__(self, data: etree._Element | None) -> None:
        self.ids: dict[str, str] = {}
        self.entrez_date: str | None = None
        if data is None:
            return
        for child in data:
            tag = child.tag
            if tag == "ArticleIdList":
                for el in child:
                    if el.text:
                        self.ids.setdefault(el.get("IdType", ""), el.text.strip())
            elif tag == "History":
                for el in child:
                    if el.get("PubStatus") == "entrez":
                        self.entrez_date = _date(el)


def parse_article(elem: etree._Element) -> Article | Skip:
    """One ``PubmedArticle`` (or ``PubmedBookArticle``) element to a record.

    Written as one pass over each element's children with a dispatch on the tag:
    lxml's ``find()`` with a path runs ElementPath in Python (~4 µs a call), which would
    make path lookups most of the parse time.
    """
    if elem.tag == "PubmedBookArticle":
        return _parse_book(elem)
    citation = data = None
    for child in elem:
        if child.tag == "MedlineCitation":
            citation = child
        elif child.tag == "PubmedData":
            data = child
    if citation is None:
        return Skip(None, "no MedlineCitation")
    pmid = None
    art = heading_list = None
    revised = None
    keywords: list[str] = []
    retraction_of: list[str] = []
    retracted = False
    for child in citation:
        tag = child.tag
        if tag == "PMID":
            pmid = child.text
        elif tag == "Article":
            art = child
        elif tag == "MeshHeadingList":
            heading_list = child
        elif tag == "DateRevised":
            revised = _date(child)
        elif tag == "KeywordList":
            keywords.extend(_texts(child, "Keyword"))
        elif tag == "CommentsCorrectionsList":
            for cc in child:
                ref = cc.get("RefType")
                if ref == "RetractionOf":
                    for el in cc:
                        if el.tag == "PMID" and el.text and el.text.strip().isdigit():
                            retraction_of.append(el.text.strip())
                elif ref == "RetractionIn":
                    retracted = True
    if not pmid or not pmid.strip().isdigit():
        return Skip(pmid, "no valid PMID in MedlineCitation")
    pmid = pmid.strip()
    if art is None:
        return Skip(pmid, "no Article element")
    title = ""
    sections: list[Section] = []
    journal = None
    pub_year = None
    languages: list[str] = []
    publication_types: list[str] = []
    eloc_doi = None
    for child in art:
        tag = child.tag
        if tag == "ArticleTitle":
            title = _flat(child)
        elif tag == "Abstract":
            sections = _sections(child)
        elif tag == "Journal":
            journal, pub_year = _journal(child)
        elif tag == "Language":
            if child.text:
                languages.append(child.text)
        elif tag == "PublicationTypeList":
            publication_types = [t.text for t in child if t.text]
        elif (
            tag == "ELocationID"
            and child.get("EIdType") == "doi"
            and child.text
            and eloc_doi is None
        ):
            eloc_doi = child.text.strip()
    pubmed_data = _PubmedData(data)
    retracted = retracted or not _RETRACTED_TYPES.isdisjoint(publication_types)
    return Article(
        pmid=pmid,
        title=title,
        sections=sections,
        journal=journal,
        pub_year=pub_year,
        languages=languages,
        publication_types=publication_types,
        mesh=_mesh(heading_list) if heading_list is not None else [],
        keywords=keywords,
        doi=pubmed_data.ids.get("doi") or eloc_doi,
        pmc=pubmed_data.ids.get("pmc"),
        revised=revised,
        entrez_date=pubmed_data.entrez_date,
        status="retracted" if retracted else "active",
        retraction_of=retraction_of,
    )


def _parse_book(elem: etree._Element) -> Article | Skip:
    # Book records are rare in PubMed files and not on the hot path: plain find() is fine.
    doc = elem.find("BookDocument")
    pmid = doc.findtext("PMID") if doc is not None else None
    if doc is None or not pmid or not pmid.strip().isdigit():
        return Skip(pmid, "no valid PMID in BookDocument")
    pubmed_data = _PubmedData(elem.find("PubmedBookData"))
    abstract = doc.find("Abstract")
    book_date = doc.find("Book/PubDate")
    return Article(
        pmid=pmid.strip(),
        title=_flat(doc.find("ArticleTitle")) or _flat(doc.find("Book/BookTitle")),
        sections=_sections(abstract) if abstract is not None else [],
        journal=None,
        pub_year=_first_year(book_date.findtext("Year")) if book_date is not None else None,
        languages=_texts(doc, "Language"),
        publication_types=_texts(doc, "PublicationType"),
        mesh=[],
        keywords=[k for kl in doc.iterfind("KeywordList") for k in _texts(kl, "Keyword")],
        doi=pubmed_data.ids.get("doi"),
        pmc=pubmed_data.ids.get("pmc"),
        revised=None,
        entrez_date=pubmed_data.entrez_date,
        status="active",
    )


def deletions(elem: etree._Element) -> Iterator[Deletion]:
    """The PMIDs a ``DeleteCitation`` element withdraws (non-numeric ones ignored)."""
    for pmid_el in elem.iterfind("PMID"):
        if pmid_el.text and pmid_el.text.strip().isdigit():
            yield Deletion(pmid_el.text.strip())


def open_source(source: Path | IO[bytes]) -> IO[bytes] | ThreadedGunzip:
    """A file's bytes, through the threaded gunzip when its content is gzip (magic bytes,
    not the name: ``.xml.gz`` files that hold plain XML and gzip under ``.xml`` both
    occur); a stream is read as given."""
    if not isinstance(source, Path):
        return source
    if is_gzip(source):
        return ThreadedGunzip(source)
    return open(source, "rb")


def iter_records(source: str | Path | IO[bytes], name: str | None = None) -> Iterator[Record]:
    """Yield every record of a MEDLINE/PubMed XML file or stream, in file order.

    A truncated or malformed file raises :class:`PubmedParseError` after the complete
    records before the fault have been yielded.
    """
    src: Path | IO[bytes] = Path(source) if isinstance(source, str) else source
    if name:
        label = name
    elif isinstance(src, Path):
        label = str(src)
    else:
        label = str(getattr(src, "name", "<stream>"))
    parsed = 0
    try:
        fh = open_source(src)
    except OSError as exc:
        raise PubmedParseError(label, f"cannot open ({exc.strerror or exc})", 0) from exc
    try:
        context = etree.iterparse(
            fh,
            events=("end",),
            tag=RECORD_TAGS,
            **PARSER_OPTIONS,
        )
        for _, elem in context:
            if elem.tag == "DeleteCitation":
                for deletion in deletions(elem):
                    yield deletion
                    parsed += 1
            else:
                yield parse_article(elem)
                parsed += 1
            elem.clear(keep_tail=True)
            parent = elem.getparent()
            if parent is not None:
                while elem.getprevious() is not None:
                    del parent[0]
    except etree.XMLSyntaxError as exc:
        reason = f"malformed XML at line {exc.lineno}: {exc.msg}"
        raise PubmedParseError(label, reason, parsed) from exc
    except GZIP_ERRORS as exc:
        raise PubmedParseError(label, f"truncated or corrupt gzip ({exc})", parsed) from exc
    except OSError as exc:
        raise PubmedParseError(label, f"read error ({exc})", parsed) from exc
    finally:
        if isinstance(src, Path):
            fh.close()
