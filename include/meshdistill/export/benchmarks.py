"""Benchmark sets an export must not overlap, and the index that finds overlapping items.

An item is contaminated when its source or any context PMID is a benchmark PMID
(reason ``"pmid"``, checked first), else when its question shares a run of ``n`` = 13
words with a benchmark question after :func:`normalize_text` (reason ``"ngram"``; 13 as
in GPT-3 and NeMo Curator). A benchmark question shorter than ``n`` words is matched
whole: it counts when it occurs as a contiguous word run anywhere in the item question.
An item question shorter than ``n`` words has no ``n``-gram of its own, so being the
beginning of a longer benchmark question is no hit. Benchmarks are searched in the order
given and the first one hit is reported, so results are deterministic.

Files are PubMedQA JSON (PQA-L ``ori_pqal.json``, ``test_ground_truth.json``), BioASQ
JSON or JSON lines, plain or gzip, told apart by content. A malformed one raises
:class:`BenchmarkError` naming the file and the fault. An item run is hashed only when
its first two and last words are a benchmark run's: a million items are checked per export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from meshdistill.config import data_file
from meshdistill.errors import ConfigError
from meshdistill.export.text import text_hash, word_ngrams, words
from meshdistill.fileio import DataFileError, read_text

NGRAM = 13
"""Words in a matching run: the size GPT-3 and NeMo Curator decontaminate with."""

_NAME_SUFFIXES = (".gz", ".json", ".jsonl")
_PUBMED_URL = re.compile(
    r"https?://(?:www\.)?(?:ncbi\.nlm\.nih\.gov/pubmed|pubmed\.ncbi\.nlm\.nih\.gov)/(\d+)/?"
)


class BenchmarkError(ConfigError):
    """A benchmark file that is missing, unreadable or not in a recognised shape."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark file: its PMIDs and its questions (none for a labels-only file)."""

    name: str
    path: str
    pmids: frozenset[int]
    questions: tuple[str, ...]


# --- reading -------------------------------------------------------------------------------


def benchmark_name(path: str | Path) -> str:
    """The file name without its ``.gz``, ``.json`` and ``.jsonl`` endings."""
    name = Path(path).name
    while name.endswith(_NAME_SUFFIXES):
        name = name.rsplit(".", 1)[0]
    return name


def _text(path: str | Path) -> str:
    try:
        text = read_text(path)
    except DataFileError as exc:
        raise BenchmarkError(f"benchmark file unreadable: {exc}") from exc
    if not text.strip():
        raise BenchmarkError(f"benchmark file {path} is empty")
    return text


def _json(path: str | Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"benchmark file {path} is not JSON ({exc})") from exc


def _pmid(value: object) -> int | None:
    """``value`` as a PMID if it is a positive int or a string of digits, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
        return int(value)
    return None


def _question(path: str | Path, where: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkError(f"benchmark file {path}: {where} has no question text")
    return value.strip()


def _keyed_pmids(path: str | Path, data: dict[str, Any]) -> frozenset[int]:
    pmids = set()
    for key in data:
        pmid = _pmid(key)
        if pmid is None:
            raise BenchmarkError(f"benchmark file {path}: key {key!r} is not a PMID")
        pmids.add(pmid)
    return frozenset(pmids)


def _from_pqal(path: str | Path, data: dict[str, Any], name: str | None) -> Benchmark:
    questions = []
    for key, record in data.items():
        if not isinstance(record, dict):
            raise BenchmarkError(f"benchmark file {path}: PMID {key} is not a record")
        questions.append(_question(path, f"PMID {key} (QUESTION)", record.get("QUESTION")))
    return Benchmark(name or benchmark_name(path), str(path), _keyed_pmids(path, data),
                     tuple(questions))


def _from_ground_truth(path: str | Path, data: dict[str, Any], name: str | None) -> Benchmark:
    for key, label in data.items():
        if not isinstance(label, str):
            raise BenchmarkError(f"benchmark file {path}: PMID {key} has no label string")
    return Benchmark(name or benchmark_name(path), str(path), _keyed_pmids(path, data), ())


def _document_pmid(path: str | Path, where: str, url: object) -> int:
    match = _PUBMED_URL.fullmatch(url.strip()) if isinstance(url, str) else None
    if match is None:
        raise BenchmarkError(f"benchmark file {path}: {where} document {url!r} is not a "
                             "PubMed URL")
    return int(match.group(1))


def _from_bioasq(path: str | Path, data: dict[str, Any], name: str | None) -> Benchmark:
    items = data.get("questions")
    if not isinstance(items, list):
        raise BenchmarkError(f"benchmark file {path}: \"questions\" is not a list")
    pmids: set[int] = set()
    questions = []
    for i, item in enumerate(items, start=1):
        where = f"question {i}"
        if not isinstance(item, dict):
            raise BenchmarkError(f"benchmark file {path}: {where} is not an object")
        questions.append(_question(path, f"{where} (body)", item.get("body")))
        documents = item.get("documents", [])
        if not isinstance(documents, list):
            raise BenchmarkError(f"benchmark file {path}: {where} documents is not a list")
        pmids.update(_document_pmid(path, where, url) for url in documents)
    return Benchmark(name or benchmark_name(path), str(path), frozenset(pmids),
                     tuple(questions))


def _from_jsonl(path: str | Path, text: str, name: str | None) -> Benchmark:
    pmids: set[int] = set()
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"benchmark file {path}: {where} is not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise BenchmarkError(f"benchmark file {path}: {where} is not a JSON object")
        questions.append(_question(path, where, record.get("question")))
        if record.get("pmid") is not None:
            pmid = _pmid(record["pmid"])
            if pmid is None:
                raise BenchmarkError(f"benchmark file {path}: {where} pmid "
                                     f"{record['pmid']!r} is not a PMID")
            pmids.add(pmid)
    return Benchmark(name or benchmark_name(path), str(path), frozenset(pmids),
                     tuple(questions))


def read_pqal(path: str | Path, name: str | None = None) -> Benchmark:
    """PubMedQA's ``ori_pqal.json``: PMID string → record with a ``QUESTION``."""
    data = _json(path, _text(path))
    if not isinstance(data, dict):
        raise BenchmarkError(f"benchmark file {path}: expected an object keyed by PMID")
    return _from_pqal(path, data, name)


def read_ground_truth(path: str | Path, name: str | None = None) -> Benchmark:
    """PubMedQA's ``test_ground_truth.json``: PMID string → label; PMIDs only."""
    data = _json(path, _text(path))
    if not isinstance(data, dict):
        raise BenchmarkError(f"benchmark file {path}: expected an object keyed by PMID")
    return _from_ground_truth(path, data, name)


def read_bioasq(path: str | Path, name: str | None = None) -> Benchmark:
    """BioASQ JSON: ``{"questions": [{"body": ..., "documents": [PubMed URL, ...]}]}``."""
    data = _json(path, _text(path))
    if not isinstance(data, dict):
        raise BenchmarkError(f"benchmark file {path}: expected a JSON object")
    return _from_bioasq(path, data, name)


def read_jsonl(path: str | Path, name: str | None = None) -> Benchmark:
    """JSON lines, each an object with ``question`` and an optional ``pmid``; blank
    lines are skipped."""
    return _from_jsonl(path, _text(path), name)


def read_benchmark(path: str | Path, name: str | None = None) -> Benchmark:
    """Any benchmark file, its kind told by content: an object with ``questions`` is
    BioASQ, one whose values are records with a ``QUESTION`` is PQA-L, one whose values
    are strings is ground truth; text that is not one JSON value, or is one object with
    ``question``, is JSON lines."""
    text = _text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _from_jsonl(path, text, name)
    if isinstance(data, dict) and data:
        values = data.values()
        if "question" in data:
            return _from_jsonl(path, text, name)
        if "questions" in data:
            return _from_bioasq(path, data, name)
        if all(isinstance(v, dict) for v in values) and any("QUESTION" in v for v in values):
            return _from_pqal(path, data, name)
        if all(isinstance(v, str) for v in values):
            return _from_ground_truth(path, data, name)
    raise BenchmarkError(f"benchmark file {path}: not PubMedQA, BioASQ or JSON lines "
                         "with a question field")


def default_benchmarks() -> list[Benchmark]:
    """PubMedQA-L from the data directory: ``pubmedqa_l`` (``ori_pqal.json``, its 1,000
    questions and PMIDs) and ``pubmedqa_l_test`` (``test_ground_truth.json``, the PMIDs of
    the test split). One benchmark per file keeps each path and count exact in the
    manifest; the test PMIDs lie within PQA-L's, so hits on them report ``pubmedqa_l``."""
    return [
        read_pqal(data_file("pubmedqa/ori_pqal.json"), "pubmedqa_l"),
        read_ground_truth(data_file("pubmedqa/test_ground_truth.json"), "pubmedqa_l_test"),
    ]


# --- matching ------------------------------------------------------------------------------


class ContaminationIndex:
    """Benchmark PMIDs and question word runs, for :meth:`check` on each exported item.

    ``_runs[k]`` maps the stable hash of a normalised ``k``-word run to the first benchmark
    holding it: ``k == n`` for the ``n``-grams of long questions, ``k < n`` for whole short
    questions. ``_starts`` maps each run's first two words to the (length, last word) of
    the runs starting with them, so that an item run is hashed only when its first two and
    last words match a benchmark run; ``_singles`` holds one-word questions.
    """

    def __init__(self, benchmarks: Sequence[Benchmark], n: int = NGRAM) -> None:
        if n < 2:
            raise ValueError(f"n-gram size must be at least 2, not {n}")
        self.n = n
        self.benchmarks = tuple(benchmarks)
        self._pmids: dict[int, int] = {}
        self._runs: dict[int, dict[int, int]] = {}
        self._starts: dict[tuple[str, str], tuple[tuple[int, str], ...]] = {}
        self._singles: dict[str, int] = {}
        self._ngram_counts: list[int] = []
        starts: dict[tuple[str, str], set[tuple[int, str]]] = {}
        for b, bench in enumerate(self.benchmarks):
            for pmid in bench.pmids:
                self._pmids.setdefault(pmid, b)
            self._ngram_counts.append(self._add_questions(b, bench.questions, starts))
        self._starts = {pair: tuple(sorted(ends)) for pair, ends in starts.items()}

    def _add_questions(self, b: int, questions: Iterable[str],
                       starts: dict[tuple[str, str], set[tuple[int, str]]]) -> int:
        """Index benchmark ``b``'s questions; the number of distinct ``n``-grams added."""
        ngrams: set[int] = set()
        for question in questions:
            tokens = words(question)
            if len(tokens) == 1:
                self._singles.setdefault(tokens[0], b)
                continue
            k = min(len(tokens), self.n)
            table = self._runs.setdefault(k, {})
            for gram in word_ngrams(tokens, self.n):
                h = text_hash(gram)
                table.setdefault(h, b)
                if k == self.n:
                    ngrams.add(h)
                run = gram.split(" ")
                starts.setdefault((run[0], run[1]), set()).add((k, run[-1]))
        return len(ngrams)

    def check(self, question: str, pmids: Iterable[int]) -> tuple[str, str] | None:
        """``(benchmark name, "pmid")`` when any of ``pmids`` (source and contexts) is a
        benchmark PMID, else ``(name, "ngram")`` when ``question`` holds a benchmark run,
        else None; the first benchmark in the given order wins."""
        found = self._first_pmid(pmids)
        if found is not None:
            return self.benchmarks[found].name, "pmid"
        found = self._first_run(words(question))
        if found is not None:
            return self.benchmarks[found].name, "ngram"
        return None

    def _first_pmid(self, pmids: Iterable[int]) -> int | None:
        table = self._pmids
        hits = [table[p] for p in pmids if p in table]
        return min(hits) if hits else None

    def _first_run(self, tokens: list[str]) -> int | None:
        best: int | None = None
        if self._singles:
            hits = [self._singles[t] for t in tokens if t in self._singles]
            best = min(hits) if hits else None
        starts, runs, size = self._starts, self._runs, len(tokens)
        for i, pair in enumerate(pairwise(tokens)):
            ends = starts.get(pair)
            if ends is None:
                continue
            for k, last in ends:
                if i + k > size:
                    break
                if tokens[i + k - 1] != last:
                    continue
                b = runs[k].get(text_hash(" ".join(tokens[i:i + k])))
                if b is not None and (best is None or b < best):
                    if b == 0:
                        return 0
                    best = b
        return best

    def summary(self) -> list[dict[str, Any]]:
        """Per benchmark, for the export manifest: name, path, PMIDs, questions, and the
        distinct ``n``-grams of its questions of at least ``n`` words."""
        return [
            {"name": b.name, "path": b.path, "pmids": len(b.pmids),
             "questions": len(b.questions), "ngrams": count, "ngram_size": self.n}
            for b, count in zip(self.benchmarks, self._ngram_counts, strict=True)
        ]
