"""Per-subtree status (``meshdistill status --json``'s ``subtrees``) and the dashboard's
pages and plot built from it, on real distill runs of the offline backend."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from meshdistill import dashboard
from meshdistill.llm.config import LLMConfig
from meshdistill.pipeline import accepted_items, distill_subtree, status_report
from meshdistill.store.db import get_engine
from sqlalchemy import text

pytestmark = pytest.mark.integration

SETTINGS = {"max_articles": 4}
STATES = ("accepted", "rejected", "failed", "deferred")


def _run(url: str, subtree: str, run_id: str) -> dict:
    return distill_subtree(subtree, run_id=run_id, settings=SETTINGS,
                           llm=LLMConfig(backend="offline"), database_url=url)


def test_subtree_report_counts_what_each_subtree_stored_and_paid(distill_url: str) -> None:
    c04 = _run(distill_url, "C04", "status-1")
    c14 = _run(distill_url, "C14", "status-2")
    report = status_report(["C10"], database_url=distill_url)["subtrees"]
    # Requested subtrees come first, then every distilled one; C10 has nothing yet.
    assert list(report) == ["C10", "C04", "C14"]
    assert report["C10"]["candidates"] == 0 and report["C10"]["acceptance_rate"] is None
    assert report["C10"]["llm"] == {"calls": 0, "tokens": 0, "cost_usd": 0.0}

    engine = get_engine(distill_url)
    with engine.connect() as conn:
        for prefix, summary in (("C04", c04), ("C14", c14)):
            row = report[prefix]
            stored = Counter(dict(conn.execute(text(
                "SELECT state, count(*) FROM qa_item WHERE subtree = :s GROUP BY state"),
                {"s": prefix}).all()))
            assert {s: row[s] for s in STATES} == {s: stored[s] for s in STATES}
            assert {s: row[s] for s in STATES} == {s: summary[s] for s in STATES}
            assert row["candidates"] == summary["candidates"] > 0
            settled = row["accepted"] + row["rejected"] + row["failed"]
            assert row["acceptance_rate"] == round(row["accepted"] / settled, 4)
            assert sum(row["top_reasons"].values()) <= row["rejected"] + row["failed"]
            assert row["name"] and row["with_abstract"] <= row["active_articles"]
            # The calls each run stored are its own: the cache records who paid.
            assert row["llm"]["calls"] == summary["llm"]["stored"] > 0
            tokens = conn.execute(text(
                "SELECT sum(tokens_in + tokens_out) FROM llm_call WHERE subtree = :s"),
                {"s": prefix}).scalar_one()
            assert row["llm"]["tokens"] == tokens  # the offline backend counts none
            assert row["preference_pairs"] == summary["preference_pairs"]
        total = conn.execute(text("SELECT count(*) FROM llm_call")).scalar_one()
    assert report["C04"]["llm"]["calls"] + report["C14"]["llm"]["calls"] == total

    # A rerun pays nothing: the per-subtree calls do not move.
    again = _run(distill_url, "C04", "status-1")
    assert again["llm"]["stored"] == 0
    assert status_report(database_url=distill_url)["subtrees"]["C04"]["llm"] == \
        report["C04"]["llm"]


def test_dashboard_pages_show_the_report_and_escape_model_output(distill_url: str) -> None:
    _run(distill_url, "C04", "dash-1")
    with get_engine(distill_url).begin() as conn:
        conn.execute(text(
            "UPDATE qa_item SET question = '<script>alert(1)</script> ' || question, "
            "updated_at = now() + interval '1 minute' "
            "WHERE id = (SELECT min(id) FROM qa_item WHERE state = 'accepted')"))
    status = status_report(database_url=distill_url)
    row = status["subtrees"]["C04"]
    page = dashboard.overview_page(status)
    assert 'data-subtree="C04"' in page and row["name"] in page
    assert f"{row['acceptance_rate']:.0%}" in page
    latest = status["exports"]["latest"]  # other tests on this corpus may have exported
    assert ("No export yet" in page) == (latest is None)
    latest = {"id": "20261207T000000Z-abcdef", "created_at": "2026-12-07T00:00:00+00:00",
              "location": "/x", "formats": {}, "items": 1234, "pairs": 56}
    page = dashboard.overview_page({**status, "exports": {"count": 1, "latest": latest}})
    assert "<b>20261207T000000Z-abcdef</b>" in page and "1,234 items, 56 pairs" in page

    items = accepted_items(subtree="C04", database_url=distill_url)
    assert items and all(i["subtree"] == "C04" for i in items)
    assert len(items) == min(20, row["accepted"])
    qtype = items[0]["qtype"]
    only = accepted_items(subtree="C04", qtype=qtype, limit=200, database_url=distill_url)
    assert only and {i["qtype"] for i in only} == {qtype}
    assert accepted_items(subtree="C14", database_url=distill_url) == []
    html = dashboard.items_page(items, ["C04"], ["yesno"], "C04", None)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html

    png = dashboard.subtree_plot(status["subtrees"])
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert dashboard.subtree_plot({}).startswith(b"\x89PNG")


def test_export_up_to_date_until_something_is_distilled(distill_url: str,
                                                         tmp_path: Path) -> None:
    from meshdistill.errors import UnknownSubtreeError
    from meshdistill.export.settings import ExportSettings
    from meshdistill.pipeline import export_shards, export_up_to_date

    _run(distill_url, "C04", "current-1")
    settings = ExportSettings(out=str(tmp_path / "a"))
    assert export_up_to_date(settings, distill_url) is None  # never exported so
    out = export_shards(settings, database_url=distill_url)
    reason = export_up_to_date(settings, distill_url)
    assert reason and out["export_id"] in reason
    # Other settings: their own history.
    assert export_up_to_date(ExportSettings(out=str(tmp_path / "b")), distill_url) is None
    # A candidate written after the export began: the export no longer holds everything.
    with get_engine(distill_url).begin() as conn:
        conn.execute(text("UPDATE qa_item SET updated_at = now() "
                          "WHERE id = (SELECT max(id) FROM qa_item)"))
    assert export_up_to_date(settings, distill_url) is None

    # A subtree asked for by name must exist; one only found in the rows may not.
    with pytest.raises(UnknownSubtreeError, match="C4"):
        status_report(["C4"], database_url=distill_url)
