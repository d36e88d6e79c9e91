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

from meshdistill.config import DATETYPES, Settings
from meshdistill.distill.settings import DistillSettings
from meshdistill.errors import MeshDistillError
from meshdistill.llm.config import BACKENDS, DEFAULT_CONCURRENCY
from meshdistill.llm.schemas import QuestionType

log = logging.getLogger("meshdistill")
DEFAULTS = DistillSettings()


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
    from meshdistill.pipeline import refresh_mesh

    out = refresh_mesh(args.sources, year=args.year, replace=args.replace)
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
    from meshdistill.pubmed.jsonl import write_jsonl

    if args.out == "-":
        summary = write_jsonl(args.files, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        with open(args.out, "wb", buffering=1 << 20) as out:
            summary = write_jsonl(args.files, out)
    return 0 if summary.ok else 1


def cmd_pubmed_load(args: argparse.Namespace) -> int:
    from meshdistill.pipeline import load_pubmed_files

    files = load_pubmed_files(args.files, strict=False)["files"]
    if args.json:
        _print_json(files)
    else:
        for r in files:
            rate = r["parsed"] / r["seconds"] if r["seconds"] else 0
            print(
                f"{r['item']}: {r['status']}: {r['parsed']} parsed, {r['loaded']} loaded, "
                f"{r['unchanged']} unchanged, {r['deleted']} deleted, {r['skipped']} skipped "
                f"({r['without_abstract']} without abstract, {r['without_mesh']} without "
                f"MeSH) in {r['seconds']:.1f}s ({rate:.0f}/s)"
            )
            if r["error"]:
                print(f"  error: {r['error']}", file=sys.stderr)
    return 0 if all(r["status"] == "succeeded" for r in files) else 1


def cmd_pubmed_fetch(args: argparse.Namespace) -> int:
    from meshdistill.pipeline import ingest_subtree_window

    summary = ingest_subtree_window(args.subtree, args.date_from, args.date_to,
                                    eutils_url=args.eutils_url, datetype=args.datetype)
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
    from meshdistill import pipeline

    # Unknown subtrees first: that check names the closest valid tree numbers.
    subtrees = pipeline.validate_subtrees(args.subtree)
    given = {"subtrees": subtrees, "max_articles": args.limit, "redo": args.redo,
             "processes": args.processes, "questions_per_article": args.questions,
             "question_types": args.types, "backend": args.backend, "model": args.model,
             "budget_usd": args.budget_usd, "budget_tokens": args.budget_tokens}
    values = {k: v for k, v in given.items() if v is not None}  # None: the default
    request, settings = pipeline.distill_request(values), pipeline.distill_settings(values)
    llm = pipeline.llm_for(request, base_url=args.base_url, max_concurrency=args.concurrency,
                           timeout=args.timeout, max_output_tokens=args.max_output_tokens,
                           narrow_schema=args.narrow_schema)
    shares = pipeline.budget_shares(request.budget_usd, request.budget_tokens, len(subtrees))
    run_id = args.run_id or f"cli-{time.strftime('%Y%m%dT%H%M%S')}"
    summaries = [
        pipeline.distill_subtree(prefix, run_id=run_id, settings=settings, llm=llm,
                                 budget_usd=usd, budget_tokens=tokens)
        for prefix, (usd, tokens) in zip(subtrees, shares, strict=True)
    ]
    if args.json:
        _print_json({"run_id": run_id, "subtrees": summaries})
        return 0
    out = pipeline.summarize_runs(summaries)
    seconds = sum(s["seconds"] for s in summaries)
    print(f"run {run_id} ({summaries[0]['backend']}, {summaries[0]['model']}): "
          f"{out['totals']['candidates']} candidates in {seconds:.1f}s "
          f"({out['totals']['candidates'] / seconds if seconds else 0:.0f}/s)")
    for line in pipeline.summary_table(out["subtrees"]):
        print(f"  {line}")
    if out["totals"]["deferred"]:
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


# --- export ---------------------------------------------------------------------------


def _ratios(value: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"three comma-separated numbers, got {value!r}") from exc


def cmd_export(args: argparse.Namespace) -> int:
    from meshdistill import pipeline

    given = {"out": args.out, "subtrees": args.subtree,
             "formats": args.formats.split(",") if args.formats else None,
             "question_types": args.types, "file_format": args.file_format,
             "benchmarks": args.benchmark, "near_dup_threshold": args.near_dup_threshold,
             "split_ratios": args.split_ratios, "shard_rows": args.shard_rows,
             "min_hierarchy": args.min_hierarchy, "max_per_subtree": args.max_per_subtree,
             "max_per_type": args.max_per_type, "max_label_share": args.max_label_share,
             "closed_book": args.closed_book or None, "strict_splits": args.strict_splits or None,
             "default_benchmarks": False if args.no_default_benchmarks else None}
    settings = pipeline.export_settings({k: v for k, v in given.items() if v is not None})

    def progress(phase: str, rows: int) -> None:
        if rows % 50_000 < 2_000:
            log.info("export: %s %s rows written", f"{rows:,}", phase)

    out = pipeline.export_shards(settings, progress=progress)
    if args.json:
        _print_json(out)
        return 0
    print(f"export {out['export_id']}: {out['path']} ({out['seconds']}s)")
    for fmt, splits in out["counts"].items():
        print(f"  {fmt:<18}" + "  ".join(f"{k} {v:,}" for k, v in splits.items()))
    removed = {k: v for k, v in out["removed"].items() if v}
    print("  removed: " + (", ".join(f"{k} {v:,}" for k, v in removed.items()) or "none"))
    print(f"  manifest: {out['manifest']}")
    return 0


# --- status ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from meshdistill.pipeline import status_report

    data = status_report(args.subtree or ())
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
        ex = data["exports"]
        latest = ex["latest"]
        print(f"exports: {ex['count']}" + (f", latest {latest['id']} ({latest['items']} "
                                            f"items, {latest['pairs']} pairs) at "
                                            f"{latest['location']}" if latest else ""))
        for prefix, st in data["subtrees"].items():
            rate = st["acceptance_rate"]
            print(
                f"  {prefix:<8} {st['name'] or '(not in MeSH)':<32} {st['active_articles']:>7} "
                f"articles ({st['with_abstract']} with abstract), watermark "
                f"{st['watermark'] or '-'}; {st['candidates']} candidates: "
                f"{st['accepted']} accepted ({'-' if rate is None else f'{rate:.0%}'}), "
                f"{st['rejected']} rejected, {st['failed']} failed, {st['deferred']} deferred; "
                f"LLM {st['llm']['calls']} calls, {st['llm']['tokens']} tokens"
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
    pf.add_argument("--datetype", choices=DATETYPES, default=DATETYPES[0])
    pf.add_argument("--eutils-url", help="E-utilities base URL (default: NCBI's)")
    pf.add_argument("--json", action="store_true")
    pf.set_defaults(func=cmd_pubmed_fetch)

    di = sub.add_parser("distill", help="generate, retrieve, grade, judge and answer")
    di.add_argument("--subtree", action="append", required=True,
                    help="MeSH tree-number prefix, e.g. C04 (repeat for several)")
    di.add_argument("--limit", type=int, default=DEFAULTS.max_articles,
                    help=f"articles per subtree (default {DEFAULTS.max_articles}; pending "
                         "ones first)")
    di.add_argument("--questions", type=int, help="questions per article and profile "
                    f"(default {DEFAULTS.questions_per_article})")
    di.add_argument("--types", nargs="+", choices=[t.value for t in QuestionType],
                    help="question types (default: all)")
    di.add_argument("--backend", choices=BACKENDS,
                    help="default: openai when a base URL is set, else offline")
    di.add_argument("--base-url", help="OpenAI-compatible endpoint (or OPENAI_BASE_URL)")
    di.add_argument("--model", help="model name (or MESHDISTILL_LLM_MODEL)")
    di.add_argument("--concurrency", type=int,
                    help=f"requests in flight (default {DEFAULT_CONCURRENCY})")
    di.add_argument("--timeout", type=float,
                    help="seconds per request (default 60; a small local server needs more)")
    di.add_argument("--max-output-tokens", type=int,
                    help="cap on every call's output tokens (default: each stage's own)")
    di.add_argument("--narrow-schema", action=argparse.BooleanOptionalAction, default=None,
                    help="send each generate request a schema narrowed to its article (the "
                         "questions asked for, evidence among its sentences): for servers "
                         "that constrain decoding to the schema, such as llama.cpp and vLLM; "
                         "default: the meshdistill_llm connection's, else off")
    di.add_argument("--processes", type=int, default=DEFAULTS.processes,
                    help=f"worker processes per subtree (default {DEFAULTS.processes}); the "
                         "--concurrency cap and the budget are split evenly between them")
    di.add_argument("--budget-usd", type=float, help="stop calling the LLM past this cost")
    di.add_argument("--budget-tokens", type=int, help="stop calling the LLM past these tokens")
    di.add_argument("--run-id", help="name of the run (rerunning it makes no new calls)")
    di.add_argument("--redo", action="store_true",
                    help="re-evaluate articles already distilled (LLM answers are cached)")
    di.add_argument("--json", action="store_true")
    di.set_defaults(func=cmd_distill)

    ca = sub.add_parser("calibrate",
                        help="ROC AUC of the ranking signals on PubMedQA-L's expert questions")
    ca.add_argument("--pqal", type=Path, help="PubMedQA-L's ori_pqal.json, plain or gzip "
                    "(default: the copy in $MESHDISTILL_DATA_DIR, the repository's data/)")
    ca.add_argument("--random", type=int, default=5, help="random negatives per question")
    ca.add_argument("--hard", type=int, default=5, help="hard negatives per question")
    ca.add_argument("--seed", type=int, default=0, help="seed of the random negatives")
    ca.add_argument("--limit", type=int, help="first N questions by PMID (default: all)")
    ca.add_argument("--blend-weight", type=float, help="retrieval weight in the blend "
                    f"(default {DEFAULTS.blend_weight})")
    ca.add_argument("--no-judge", action="store_true", help="skip the judge")
    ca.add_argument("--json", action="store_true")
    ca.set_defaults(func=cmd_calibrate)

    ex = sub.add_parser("export", help="write training shards (docs/export.md)")
    ex.add_argument("--out", help="directory or URL (file://, s3://, memory://) under which "
                    "the export gets its folder (default: $MESHDISTILL_HOME/exports)")
    ex.add_argument("--subtree", action="append", help="tree-number prefix (repeat; default all)")
    ex.add_argument("--formats", help="comma-separated: sft,prompt_completion,dpo,alpaca,"
                    "sharegpt,qca (default: all)")
    ex.add_argument("--types", nargs="+", choices=[t.value for t in QuestionType],
                    help="question types (default: all)")
    ex.add_argument("--file-format", choices=["parquet", "jsonl", "jsonl.gz", "both"])
    ex.add_argument("--benchmark", action="append", help="benchmark file to decontaminate "
                    "against: PubMedQA or BioASQ JSON, or JSON lines (repeat)")
    ex.add_argument("--no-default-benchmarks", action="store_true",
                    help="do not decontaminate against PubMedQA-L")
    ex.add_argument("--closed-book", action="store_true", help="no contexts in the prompts")
    ex.add_argument("--strict-splits", action="store_true",
                    help="drop items whose contexts are sources of another split")
    ex.add_argument("--near-dup-threshold", type=float, help="Jaccard threshold (default 0.8)")
    ex.add_argument("--split-ratios", type=_ratios, help="train,validation,test "
                    "(default 0.9,0.05,0.05)")
    ex.add_argument("--shard-rows", type=int, help="rows per shard (default 100000)")
    ex.add_argument("--min-hierarchy", type=float, help="minimum MeSH-hierarchy score")
    ex.add_argument("--max-per-subtree", type=int, help="cap of items per subtree")
    ex.add_argument("--max-per-type", type=int, help="cap of items per question type")
    ex.add_argument("--max-label-share", type=float,
                    help="largest share of one yes/no/maybe label among yesno items")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)

    st = sub.add_parser("status", help="what the pipeline database holds")
    st.add_argument("--subtree", action="append",
                    help="also report this subtree (every ingested or distilled one is)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    return p


def _database_errors() -> tuple[type[Exception], ...]:
    """The driver errors ``main`` reports as database errors, from the drivers loaded only:
    none can be raised by a command that never imported them, and sqlalchemy alone costs
    ~0.4 s of start-up that ``pubmed parse`` has no use for."""
    errors: list[type[Exception]] = []
    if "sqlalchemy" in sys.modules:
        import sqlalchemy.exc

        errors.append(sqlalchemy.exc.DBAPIError)
    if "psycopg2" in sys.modules:
        import psycopg2

        errors.append(psycopg2.Error)
    return tuple(errors)


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
    except _database_errors() as exc:
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
