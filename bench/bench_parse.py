"""Parse speed as whole processes: ``meshdistill pubmed parse FILE --out OUT.jsonl`` against a
Python process running ``pubmed_parser.parse_medline_xml(FILE)`` to the end.

Both are timed by wall clock from spawn to exit (interpreter start-up and imports included),
on the same file, interleaved run by run (ours, theirs, ours, ...) so load from elsewhere on
the machine hits both; the median of N runs is kept for each. In-process figures follow for
context: ``iter_records`` alone, a minimal lxml ``iterparse`` walk, and gunzip alone (how
much of the time is the format itself).

Target: the ``pubmed parse`` process at least 3.0x the records/s of the pubmed_parser
process. Exit status 1 when missed, 2 when the two disagree on the number of records.

    .venv/bin/python bench/bench_parse.py [--runs 5] [--file PATH] [--target 3.0]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lxml import etree
from meshdistill.pubmed.parser import iter_records

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.support import BASELINE_2020, pubmed_parser_data  # noqa: E402

BASELINE = "pubmed_parser.parse_medline_xml"
OURS = "meshdistill pubmed parse"
_BASELINE_CODE = (
    "import sys, pubmed_parser\n"
    "print(sum(1 for _ in pubmed_parser.parse_medline_xml(sys.argv[1])))\n"
)


def ours_process(path: Path, out: Path) -> tuple[float, int]:
    """The CLI as a user runs it; records are the articles among the JSON lines it writes
    (pubmed_parser yields articles only; an update file's deletions are lines too)."""
    cmd = [sys.executable, "-m", "meshdistill.cli", "pubmed", "parse", str(path),
           "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    with open(out, "rb") as fh:
        return seconds, sum(1 for line in fh if not line.endswith(b'"status":"deleted"}\n'))


def baseline_process(path: Path) -> tuple[float, int]:
    """A process that imports pubmed_parser and consumes every record it yields."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _BASELINE_CODE, str(path)], check=True,
                          capture_output=True, text=True)
    return time.perf_counter() - t0, int(done.stdout.strip())


def iter_records_only(path: Path) -> int:
    return sum(1 for _ in iter_records(path))


def lxml_floor(path: Path) -> int:
    """The least any lxml-based parser can do: walk the articles and clear them."""
    n = 0
    with gzip.open(path, "rb") as fh:
        for _, elem in etree.iterparse(fh, events=("end",), tag="PubmedArticle"):
            n += 1
            elem.clear()
            while elem.getprevious() is not None:
                del elem.getparent()[0]
    return n


def gunzip_floor(path: Path) -> int:
    """Decompression alone (bytes, not records: reported as time only)."""
    total = 0
    with gzip.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--file", type=Path, default=None, help="default: pubmed20n0014.xml.gz")
    ap.add_argument("--target", type=float, default=3.0,
                    help=f"required speed-up over {BASELINE}")
    args = ap.parse_args(argv)
    path: Path = args.file or pubmed_parser_data(BASELINE_2020)

    in_process: dict[str, Callable[[Path], int]] = {
        "iter_records only": iter_records_only,
        "lxml iterparse floor": lxml_floor,
        "gunzip floor": gunzip_floor,
    }
    times: dict[str, list[float]] = {OURS: [], BASELINE: [], **{k: [] for k in in_process}}
    counts: dict[str, int] = {}
    print(f"file: {path.name} ({path.stat().st_size / 1e6:.1f} MB gzip), "
          f"median of {args.runs} runs")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        for run in range(1, args.runs + 1):
            seconds, counts[OURS] = ours_process(path, out)
            times[OURS].append(seconds)
            seconds, counts[BASELINE] = baseline_process(path)
            times[BASELINE].append(seconds)
            line = [f"ours {times[OURS][-1]:.2f}s", f"pubmed_parser {times[BASELINE][-1]:.2f}s"]
            for name, fn in in_process.items():
                t0 = time.perf_counter()
                counts[name] = fn(path)
                times[name].append(time.perf_counter() - t0)
                line.append(f"{name} {times[name][-1]:.2f}s")
            print(f"  run {run}: " + ", ".join(line), flush=True)

    records = counts[OURS]
    if counts[BASELINE] != records:
        print(f"record counts differ: ours {records}, {BASELINE} {counts[BASELINE]}")
        return 2
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{'':34}{'median s':>9}{'records/s':>11}")
    for name, seconds in median.items():
        kind = "process" if name in (OURS, BASELINE) else "in-process"
        rate = f"{records / seconds:11,.0f}" if name != "gunzip floor" else f"{'-':>11}"
        print(f"{name + f' ({kind})':34}{seconds:9.2f}{rate}")
    ratio = median[BASELINE] / median[OURS]
    verdict = "PASS" if ratio >= args.target else "FAIL"
    print(f"\n{records:,} records; the `{OURS}` process is {ratio:.2f}x the {BASELINE} "
          f"process (target {args.target:.1f}x): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
