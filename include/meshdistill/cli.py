"""The ``meshdistill`` command: every pipeline step without Airflow (and the demo's engine).

Errors a user can act on (:class:`MeshDistillError`) print one line and exit 2;
progress goes to stderr as log lines, results to stdout (``--json`` where it helps).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import psycopg2
import sqlalchemy.exc

from meshdistill.config import Settings
from meshdistill.errors import MeshDistillError

log = logging.getLogger("meshdistill")


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --- db -------------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    from meshdistill.store import embedded
    from meshdistill.store.db import get_engine, resolve_database_url, safe_url
    from meshdistill.store.migrate import current_revision

    settings = Settings.from_env()
    if args.action == "down":
        stopped = embedded.stop(settings.home)
        print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
        return 0
    url = resolve_database_url(settings=settings)
    engine = get_engine(url)  # migrates
    where = "embedded" if not settings.database_url else "configured"
    print(f"database ({where}): {safe_url(url)}")
    print(f"schema revision: {current_revision(engine)}")
    return 0


# --- mesh -----------------------------------------------------------------------------


def cmd_mesh_load(args: argparse.Namespace) -> int:
    from meshdistill.mesh.load import load_sources
    from meshdistill.mesh.sources import nlm_release_urls
    from meshdistill.store import connect

    settings = Settings.from_env()
    sources = args.sources or nlm_release_urls(args.year or date.today().year)
    t0 = time.perf_counter()
    with connect() as conn:
        out = load_sources(
            conn, sources, settings.mesh_cache_dir, year=args.year, replace_trees=args.replace
        )
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        _print_json(out)
    else:
        counts, report = out["counts"], out["report"]
        print(
            f"MeSH {report['year']}: {counts['descriptors']} descriptors, "
            f"{counts['tree_numbers']} tree numbers, {counts['entry_terms']} entry terms "
            f"({out['seconds']}s)"
        )
        if report["names_unjoined"]:
            sample = ", ".join(report["names_unjoined_sample"][:5])
            print(
                f"  {report['tree_numbers_unjoined']} tree numbers ({report['names_unjoined']} "
                f"names) found no descriptor UI in these sources, e.g. {sample}; "
                f"{counts['tree_numbers_unjoined']} still without UI after joining with the "
                f"database (article headings supply more as they load)"
            )
    return 0


def cmd_mesh_subtree(args: argparse.Namespace) -> int:
    from meshdistill.mesh.subtree import get_subtree
    from meshdistill.store import connect

    with connect() as conn:
        sub = get_subtree(conn, args.prefix)
    if args.json:
        _print_json(sub.as_dict())
    else:
        path = " > ".join([*sub.ancestry, sub.name or sub.prefix])
        print(f"{sub.prefix}  {path}  ({sub.ui or 'no UI'})")
        print(f"  {sub.tree_numbers} tree numbers, {sub.descriptors} descriptors")
        if sub.scope_note:
            print(f"  {sub.scope_note}")
    return 0


# --- pubmed ---------------------------------------------------------------------------


def cmd_pubmed_parse(args: argparse.Namespace) -> int:
    from meshdistill.pubmed.parser import iter_records
    from meshdistill.pubmed.records import Skip

    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
    failed = 0
    try:
        for path in args.files:
            t0 = time.perf_counter()
            n = skipped = 0
            try:
                for record in iter_records(path):
                    if isinstance(record, Skip):
                        skipped += 1
                        log.warning(
                            "%s: skipped a record (%s): %s", path, record.pmid, record.reason
                        )
                        continue
                    out.write(json.dumps(record.to_json(), ensure_ascii=False))
                    out.write("\n")
                    n += 1
            except MeshDistillError as exc:
                failed += 1
                log.error("%s", exc)
            dt = time.perf_counter() - t0
            log.info("%s: %d records (%d skipped) in %.1fs, %.0f/s", path, n, skipped, dt,
                     n / dt if dt else 0)
    finally:
        if out is not sys.stdout:
            out.close()
    return 1 if failed else 0


def cmd_pubmed_load(args: argparse.Namespace) -> int:
    from meshdistill.pubmed.files import load_files

    results = load_files(args.files)
    if args.json:
        _print_json([r.as_dict() for r in results])
    else:
        for r in results:
            rate = r.parsed / r.seconds if r.seconds else 0
            print(
                f"{r.item}: {r.status}: {r.parsed} parsed, {r.loaded} loaded, "
                f"{r.unchanged} unchanged, {r.deleted} deleted, {r.skipped} skipped "
                f"({r.without_abstract} without abstract, {r.without_mesh} without MeSH) "
                f"in {r.seconds:.1f}s ({rate:.0f}/s)"
            )
            if r.error:
                print(f"  error: {r.error}", file=sys.stderr)
    return 0 if all(r.status == "succeeded" for r in results) else 1


def cmd_pubmed_fetch(args: argparse.Namespace) -> int:
    from meshdistill.pubmed.eutils import EutilsClient
    from meshdistill.pubmed.ingest import ingest_subtree
    from meshdistill.store.db import get_engine

    settings = Settings.from_env()
    client = EutilsClient.from_settings(settings, base_url=args.eutils_url)
    summary = ingest_subtree(
        get_engine(), args.subtree, args.date_from, args.date_to, client=client,
        datetype=args.datetype,
    )
    if args.json:
        _print_json(summary)
    else:
        print(
            f"{summary['subtree']} {args.date_from}..{args.date_to}: {summary['expected']} "
            f"found, {summary['fetched']} fetched, {summary['loaded']} loaded, "
            f"{summary['unchanged']} unchanged; "
            + ("reconciled, watermark advanced" if summary["reconciled"]
               else f"NOT reconciled ({len(summary['missing'])} missing), watermark kept")
        )
    return 0 if summary["reconciled"] else 1


# --- distill --------------------------------------------------------------------------


def cmd_distill(args: argparse.Namespace) -> int:
    from meshdistill.llm.config import LLMConfig
    from meshdistill.pipeline import distill_subtree, validate_subtrees

    subtrees = validate_subtrees(args.subtree)
    run_id = args.run_id or f"cli-{time.strftime('%Y%m%dT%H%M%S')}"
    settings: dict[str, Any] = {"max_articles": args.limit, "redo": args.redo,
                                "processes": args.processes}
    if args.questions is not None:
        settings["questions_per_article"] = args.questions
    if args.types:
        settings["question_types"] = args.types
    llm = LLMConfig(backend=args.backend, model=args.model, base_url=args.base_url,
                    max_concurrency=args.concurrency)
    n = len(subtrees)
    summaries = [
        distill_subtree(
            prefix, run_id=run_id, settings=settings, llm=llm,
            budget_usd=None if args.budget_usd is None else args.budget_usd / n,
            budget_tokens=None if args.budget_tokens is None else args.budget_tokens // n,
        )
        for prefix in subtrees
    ]
    if args.json:
        _print_json({"run_id": run_id, "subtrees": summaries})
        return 0
    print(f"run {run_id} ({summaries[0]['backend']}, {summaries[0]['model']})")
    print(f"  {'subtree':<10}{'articles':>9}{'accepted':>10}{'rejected':>10}{'failed':>8}"
          f"{'deferred':>10}{'pairs':>7}{'cand/s':>8}")
    for s in summaries:
        print(f"  {s['subtree']:<10}{s['articles']:>9}{s['accepted']:>10}{s['rejected']:>10}"
              f"{s['failed']:>8}{s['deferred']:>10}{s['preference_pairs']:>7}"
              f"{s['candidates_per_s'] or 0:>8}")
    if any(s["deferred"] for s in summaries):
        print("  budget reached: deferred candidates continue on the next run")
    return 0


# --- calibrate ------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    from meshdistill.evaluate.calibrate import calibrate, verdict
    from meshdistill.evaluate.pubmedqa import load_pqal
    from meshdistill.store import connect

    records = load_pqal(args.pqal, limit=args.limit)
    with connect() as conn:
        result = calibrate(conn, records, n_random=args.random, n_hard=args.hard,
                           seed=args.seed, blend_weight=args.blend_weight,
                           judge=not args.no_judge)
    if args.json:
        _print_json(result)
        return 0
    c, prm = result["counts"], result["params"]
    print(f"calibration on PubMedQA-L: {c['questions']} questions, {prm['n_random']} random "
          f"and {prm['n_hard']} hard negatives each (seed {prm['seed']}, blend weight "
          f"{prm['blend_weight']}, judge {prm['judge']}); ROC AUC pooled "
          "(mean per question in brackets)")
    print(f"  {'negatives':<10}{'hierarchy':>17}{'retrieval':>17}{'blend':>17}{'judge':>17}")
    for kind in ("random", "hard"):
        r = result[kind]
        cells = []
        for s in ("hierarchy", "retrieval", "blend", "judge"):
            v, w = r[f"{s}_auc"], r["within_question"][f"{s}_auc"]
            cells.append("-" if v is None else f"{v:.3f} ({w:.3f})")
        print(f"  {kind:<10}" + "".join(f"{x:>17}" for x in cells))
    for h, halves in result["split"].items():
        print(f"  half {h} ({halves['random']['questions']} questions): hierarchy "
              f"{halves['random']['hierarchy_auc']:.3f} random, blend "
              f"{halves['hard']['blend_auc']:.3f} vs retrieval "
              f"{halves['hard']['retrieval_auc']:.3f} hard")
    print(f"  MeSH names: {c['mesh_names_unmapped']} of {c['mesh_names']} unmapped "
          f"({c['mesh_name_uses_unmapped']} of {c['mesh_name_uses']} uses); "
          f"{c['questions_without_mesh']} questions name no descriptor; {result['seconds']}s")
    for line in verdict(result):
        print(line)
    return 0


# --- status ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from meshdistill.mesh.subtree import subtree_stats
    from meshdistill.status import status
    from meshdistill.store import connect

    with connect() as conn:
        data = status(conn)
        if args.subtree:
            data["subtrees"] = {p: subtree_stats(conn, p) for p in args.subtree}
    if args.json:
        _print_json(data)
    else:
        a = data["articles"]
        print(
            f"articles: {a['active']} active ({a['with_abstract']} with abstract), "
            f"{a['deleted']} deleted, {a['retracted']} retracted; "
            f"{data['article_mesh']} MeSH links"
        )
        m = data["mesh"]
        print(f"MeSH {m['release_year']}: {m['descriptors']} descriptors, "
              f"{m['tree_numbers']} tree numbers")
        q = data["qa"]
        print(f"QA items: {q['accepted']} accepted, {q['rejected']} rejected, "
              f"{q['failed']} failed, {q['deferred']} deferred; "
              f"{data['preference_pairs']} preference pairs")
        llm = data["llm"]
        print(f"LLM: {llm['calls']} calls cached, {llm['tokens']} tokens, "
              f"${llm['cost_usd']:.4f}")
        for prefix, st in data.get("subtrees", {}).items():
            print(
                f"  {prefix:<8} {st['name'] or '':<40} {st['active_articles']:>7} articles, "
                f"{st['with_abstract']:>6} with abstract, {st['as_major_topic']:>6} as major topic"
            )
    return 0


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (YYYY-MM-DD)") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshdistill", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="the pipeline database")
    db.add_argument("action", choices=["up", "down", "migrate"])
    db.set_defaults(func=cmd_db)

    mesh = sub.add_parser("mesh", help="MeSH releases and subtrees").add_subparsers(
        dest="mesh_command", required=True
    )
    ml = mesh.add_parser("load", help="load NLM MeSH files (paths or URLs)")
    ml.add_argument("sources", nargs="*", help="descYYYY.xml[.gz], mtreesYYYY.bin, MeshTree.txt; "
                    "none: NLM's release for --year, downloaded once and cached")
    ml.add_argument("--year", type=int, help="MeSH year (default: from file names)")
    ml.add_argument("--replace", action="store_true",
                    help="remove tree numbers not in this release (use for a full release)")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=cmd_mesh_load)
    ms = mesh.add_parser("subtree", help="describe the subtree at a tree-number prefix")
    ms.add_argument("prefix")
    ms.add_argument("--json", action="store_true")
    ms.set_defaults(func=cmd_mesh_subtree)

    pm = sub.add_parser("pubmed", help="PubMed parsing, loading, fetching").add_subparsers(
        dest="pubmed_command", required=True
    )
    pp = pm.add_parser("parse", help="MEDLINE/PubMed XML to JSON lines")
    pp.add_argument("files", nargs="+")
    pp.add_argument("--out", required=True, help="output .jsonl ('-' for stdout)")
    pp.set_defaults(func=cmd_pubmed_parse)
    pl = pm.add_parser("load", help="load baseline/update files into Postgres, in order")
    pl.add_argument("files", nargs="+")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_pubmed_load)
    pf = pm.add_parser("fetch", help="fetch a subtree's articles from E-utilities")
    pf.add_argument("--subtree", required=True)
    pf.add_argument("--from", dest="date_from", type=_date, required=True)
    pf.add_argument("--to", dest="date_to", type=_date, required=True)
    pf.add_argument("--datetype", choices=["edat", "mdat"], default="edat")
    pf.add_argument("--eutils-url", help="E-utilities base URL (default: NCBI's)")
    pf.add_argument("--json", action="store_true")
    pf.set_defaults(func=cmd_pubmed_fetch)

    di = sub.add_parser("distill", help="generate, retrieve, grade, judge and answer")
    di.add_argument("--subtree", action="append", required=True,
                    help="MeSH tree-number prefix, e.g. C04 (repeat for several)")
    di.add_argument("--limit", type=int, default=100,
                    help="articles per subtree (default 100; pending ones first)")
    di.add_argument("--questions", type=int, help="questions per article and profile")
    di.add_argument("--types", nargs="+", choices=["yesno", "factoid", "list", "summary"])
    di.add_argument("--backend", choices=["offline", "openai"],
                    help="default: openai when a base URL is set, else offline")
    di.add_argument("--base-url", help="OpenAI-compatible endpoint (or OPENAI_BASE_URL)")
    di.add_argument("--model", help="model name (or MESHDISTILL_LLM_MODEL)")
    di.add_argument("--concurrency", type=int, help="requests in flight (default 32)")
    di.add_argument("--processes", type=int, default=1,
                    help="worker processes per subtree (default 1); the --concurrency cap "
                         "and the budget are split evenly between them")
    di.add_argument("--budget-usd", type=float, help="stop calling the LLM past this cost")
    di.add_argument("--budget-tokens", type=int, help="stop calling the LLM past these tokens")
    di.add_argument("--run-id", help="name of the run (rerunning it makes no new calls)")
    di.add_argument("--redo", action="store_true",
                    help="re-evaluate articles already distilled (LLM answers are cached)")
    di.add_argument("--json", action="store_true")
    di.set_defaults(func=cmd_distill)

    ca = sub.add_parser("calibrate",
                        help="ROC AUC of the ranking signals on PubMedQA-L's expert questions")
    ca.add_argument("--pqal", type=Path, help="ori_pqal.json (default: "
                    "$MESHDISTILL_DATA_DIR/pubmedqa/ori_pqal.json, data dir ../shared/data)")
    ca.add_argument("--random", type=int, default=5, help="random negatives per question")
    ca.add_argument("--hard", type=int, default=5, help="hard negatives per question")
    ca.add_argument("--seed", type=int, default=0, help="seed of the random negatives")
    ca.add_argument("--limit", type=int, help="first N questions by PMID (default: all)")
    ca.add_argument("--blend-weight", type=float, help="retrieval weight in the blend "
                    "(default: grade.DEFAULT_BLEND_WEIGHT)")
    ca.add_argument("--no-judge", action="store_true", help="skip the judge")
    ca.add_argument("--json", action="store_true")
    ca.set_defaults(func=cmd_calibrate)

    st = sub.add_parser("status", help="what the pipeline database holds")
    st.add_argument("--subtree", action="append", help="also count active articles under it")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except MeshDistillError as exc:
        print(f"meshdistill: error: {exc}", file=sys.stderr)
        return 2
    except (sqlalchemy.exc.DBAPIError, psycopg2.Error) as exc:
        # Each batch is one transaction: whatever was interrupted was rolled back whole.
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(
            f"meshdistill: database error: {reason}. The interrupted batch was rolled back "
            "(nothing partial is kept); run the command again once the database is back.",
            file=sys.stderr,
        )
        return 3
    return code


if __name__ == "__main__":
    raise SystemExit(main())
