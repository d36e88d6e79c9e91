"""The pipeline's run-level rules, without a database: settings, budget shares, the table."""

from __future__ import annotations

from typing import Any

import pytest
from meshdistill import pipeline
from meshdistill.distill.settings import DistillSettings
from meshdistill.errors import ConfigError


def test_settings_and_request_take_their_own_keys_and_name_a_bad_field() -> None:
    values = {"subtrees": ["C04", "C14.280"], "max_articles": 7, "backend": "offline",
              "budget_tokens": 900, "question_types": ["yesno"]}
    settings = pipeline.distill_settings(values)
    request = pipeline.distill_request(values)
    assert (settings.max_articles, [t.value for t in settings.question_types]) == (7, ["yesno"])
    assert settings.processes == DistillSettings().processes
    assert (request.subtrees, request.backend, request.budget_tokens) == (
        ("C04", "C14.280"), "offline", 900)
    with pytest.raises(ConfigError, match=r"questions_per_article = 21: Input should be less"):
        pipeline.distill_settings({"questions_per_article": 21})
    with pytest.raises(ConfigError, match=r"subtrees\.0 = 'neoplasms': String should match"):
        pipeline.distill_request({"subtrees": ["neoplasms"]})


def test_ingest_and_mesh_requests_validate_their_forms() -> None:
    request = pipeline.ingest_request({"subtrees": ["C04", "C14.280"], "datetype": "mdat"})
    assert (request.subtrees, request.source, request.datetype) == (
        ("C04", "C14.280"), "eutils", "mdat")
    files = pipeline.ingest_request({"source": "files", "files": ["a.xml.gz"]})
    assert files.files == ("a.xml.gz",)
    with pytest.raises(ConfigError, match=r"^invalid ingest request: source = files needs "
                                          r"at least one file$"):
        pipeline.ingest_request({"source": "files", "files": []})
    with pytest.raises(ConfigError, match="files are only read with source = files"):
        pipeline.ingest_request({"files": ["a.xml.gz"]})
    with pytest.raises(ConfigError, match=r"subtrees\.1 = 'heart': String should match"):
        pipeline.ingest_request({"subtrees": ["C04", "heart"]})
    mesh = pipeline.mesh_refresh_request({"sources": ["desc2023.xml.gz"], "year": 2023})
    assert (mesh.sources, mesh.year, mesh.replace) == (("desc2023.xml.gz",), 2023, True)
    with pytest.raises(ConfigError, match=r"year = 1850: Input should be greater"):
        pipeline.mesh_refresh_request({"year": 1850})


def test_budget_shares_add_up_and_never_exceed_the_budget() -> None:
    assert pipeline.budget_shares(None, None, 3) == [(None, None)] * 3
    shares = pipeline.budget_shares(1.5, 1000, 3)
    assert [usd for usd, _ in shares] == pytest.approx([0.5, 0.5, 0.5])
    assert [tokens for _, tokens in shares] == [334, 333, 333]
    assert pipeline.budget_shares(None, 2, 2) == [(None, 1), (None, 1)]
    with pytest.raises(ConfigError, match="less than one token for each of the 3 subtrees"):
        pipeline.budget_shares(None, 2, 3)
    with pytest.raises(ConfigError):
        pipeline.budget_shares(1.0, None, 0)


def _summary(subtree: str, **counts: Any) -> dict[str, Any]:
    base = {"subtree": subtree, "articles": 2, "candidates": 8, "accepted": 5, "rejected": 2,
            "failed": 1, "deferred": 0, "preference_pairs": 3, "backend": "offline",
            "model": "m", "llm": {"misses": 12, "hits": 4, "tokens_in": 900, "tokens_out": 100}}
    return base | counts


def test_summarize_runs_totals_each_count() -> None:
    out = pipeline.summarize_runs([_summary("C04"), _summary("C14.280", accepted=1,
                                                            deferred=4, llm={})])
    assert out["subtrees"]["C04"]["llm_new_calls"] == 12
    assert out["subtrees"]["C04"]["llm_tokens"] == 1000
    assert out["subtrees"]["C14.280"]["llm_cached"] == 0
    assert out["subtrees"]["C14.280"]["llm_tokens"] == 0
    assert out["totals"] == {"articles": 4, "candidates": 16, "accepted": 6, "rejected": 4,
                             "failed": 2, "deferred": 4, "preference_pairs": 6,
                             "llm_new_calls": 12, "llm_cached": 4, "llm_tokens": 1000}


def test_summary_table_lines_up_and_marks_unknown_counts() -> None:
    rows = pipeline.summarize_runs([_summary("C04"), _summary("C14.280")])["subtrees"]
    rows["C14.280"].pop("llm_tokens")
    lines = pipeline.summary_table(rows)
    assert len(lines) == 4  # header, two subtrees, total
    assert len({len(line) for line in lines}) == 1  # columns line up
    assert lines[0].split()[:3] == ["subtree", "articles", "candidates"]
    assert lines[1].split() == ["C04", "2", "8", "5", "2", "1", "0", "3", "12", "4", "1000"]
    assert lines[2].split()[-1] == "-"
    assert lines[3].split() == ["total", "4", "16", "10", "4", "2", "0", "6", "24", "8",
                                "1000"]
    assert len(pipeline.summary_table({"C04": rows["C04"]})) == 2  # no total for one
    stored = pipeline.summary_table(rows, pipeline.STORED_COUNTS)
    assert stored[0].split()[-1] == "pairs" and stored[1].split()[-1] == "3"


def test_the_narrow_schema_flag_is_on_off_or_the_connections() -> None:
    from meshdistill.cli import build_parser
    from meshdistill.llm.config import LLMConfig

    parse = build_parser().parse_args
    assert parse(["distill", "--subtree", "C04", "--narrow-schema"]).narrow_schema is True
    assert parse(["distill", "--subtree", "C04", "--no-narrow-schema"]).narrow_schema is False
    assert parse(["distill", "--subtree", "C04"]).narrow_schema is None
    request = pipeline.distill_request({})
    connection = LLMConfig(narrow_schema=True)
    assert pipeline.llm_for(request, connection, narrow_schema=None).narrow_schema is True
    assert pipeline.llm_for(request, connection, narrow_schema=False).narrow_schema is False
    assert pipeline.llm_for(request, None, narrow_schema=None).narrow_schema is None
