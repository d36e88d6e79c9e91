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
:class:`BenchmarkError` naming the file and the fault. Items are checked a batch at a
time with numpy (:meth:`ContaminationIndex.check_batch`): a million per export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshdistill.config import data_file
from meshdistill.errors import ConfigError
from meshdistill.export.text import Tokens
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
    """Benchmark PMIDs and question word runs, checked against a batch of items at once.

    Per run length ``k`` a sorted table of run hashes with the first benchmark holding
    each: ``k == n`` for the ``n``-grams of long questions, ``1 <= k < n`` for whole short
    questions. An item position is looked up only when the two words starting there
    begin some benchmark run (a bitmap over those pairs' hashes), so checking costs a few
    numpy passes over the batch's words whatever the number of lengths.
    """

    def __init__(self, benchmarks: Sequence[Benchmark], n: int = NGRAM) -> None:
        if n < 2:
            raise ValueError(f"n-gram size must be at least 2, not {n}")
        self.n = n
        self.benchmarks = tuple(benchmarks)
        pmids = [np.asarray(sorted(b.pmids), dtype=np.int64) for b in self.benchmarks]
        self._pmids = _Table.of(pmids)
        runs: dict[int, list[tuple[np.ndarray, int]]] = {}
        pairs: list[np.ndarray] = []
        self._ngram_counts: list[int] = []
        for b, bench in enumerate(self.benchmarks):
            count = 0
            if bench.questions:
                tokens = Tokens.of(list(bench.questions))
                r = tokens.runs()
                lengths, offsets = tokens.lengths, tokens.offsets[:-1]
                starts, _ = r.windows(n)
                grams = r.raw(starts, n)
                count = len(np.unique(grams))
                runs.setdefault(n, []).append((grams, b))
                pairs.append(r.raw(starts, 2))
                for k in np.unique(lengths[(lengths > 0) & (lengths < n)]).tolist():
                    rows = offsets[lengths == k]
                    runs.setdefault(k, []).append((r.raw(rows, k), b))
                    if k >= 2:
                        pairs.append(r.raw(rows, 2))
            self._ngram_counts.append(count)
        self._runs = {k: _Table.of([h for h, _ in parts], [b for _, b in parts])
                      for k, parts in sorted(runs.items())}
        self._pairs = _bitmap(np.concatenate(pairs) if pairs else np.zeros(0, np.uint64))

    def check_batch(self, tokens: Tokens, pmids: np.ndarray,
                    pmid_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row: (reason, benchmark index): reason 1 when a PMID of the row
        (``pmids[pmid_offsets[i]:pmid_offsets[i + 1]]``, source and contexts) is a
        benchmark PMID, else 2 when its words hold a benchmark run, else 0 (index -1);
        the first benchmark in the given order wins."""
        rows = len(tokens)
        owner = np.repeat(np.arange(rows), np.diff(pmid_offsets))
        by_pmid = _first(rows, owner, self._pmids.lookup(np.asarray(pmids, np.int64)))
        by_run = self._first_run(tokens)
        reason = np.where(by_pmid >= 0, 1, np.where(by_run >= 0, 2, 0)).astype(np.int8)
        return reason, np.where(by_pmid >= 0, by_pmid, by_run)

    def _first_run(self, tokens: Tokens) -> np.ndarray:
        rows = len(tokens)
        best = np.full(rows, -1, dtype=np.int64)
        if not self._runs:
            return best
        r = tokens.runs()
        if 1 in self._runs:
            owner = np.repeat(np.arange(rows), tokens.lengths)
            best = _merge(best, _first(rows, owner, self._runs[1].lookup(tokens.hashes)))
        starts, owner = r.windows(2)
        candidate = _in_bitmap(self._pairs, r.raw(starts, 2))
        starts, owner = starts[candidate], owner[candidate]
        ends = tokens.offsets[owner + 1]
        for k, table in self._runs.items():
            if k < 2:
                continue
            fits = starts + k <= ends
            found = table.lookup(r.raw(starts[fits], k))
            best = _merge(best, _first(rows, owner[fits], found))
        return best

    def check(self, question: str, pmids: Iterable[int]) -> tuple[str, str] | None:
        """:meth:`check_batch` of one question: ``(benchmark name, "pmid" | "ngram")``
        or None."""
        found = np.asarray(list(pmids), dtype=np.int64)
        reason, bench = self.check_batch(Tokens.of([question]), found,
                                         np.asarray([0, len(found)]))
        if not reason[0]:
            return None
        return self.benchmarks[int(bench[0])].name, "pmid" if reason[0] == 1 else "ngram"

    def summary(self) -> list[dict[str, Any]]:
        """Per benchmark, for the export manifest: name, path, PMIDs, questions, and the
        distinct ``n``-grams of its questions of at least ``n`` words."""
        return [
            {"name": b.name, "path": b.path, "pmids": len(b.pmids),
             "questions": len(b.questions), "ngrams": count, "ngram_size": self.n}
            for b, count in zip(self.benchmarks, self._ngram_counts, strict=True)
        ]


_FILTER_BITS = 24
_SHIFT = np.uint64(64 - _FILTER_BITS)


def _bitmap(hashes: np.ndarray) -> np.ndarray:
    """A one-hash Bloom filter of ``hashes`` over their top 24 bits, packed eight to a
    byte (2 MB; :func:`_in_bitmap` reads it)."""
    bits = np.zeros(1 << _FILTER_BITS, dtype=np.bool_)
    bits[(hashes >> _SHIFT).astype(np.int64)] = True
    return np.packbits(bits, bitorder="little")


def _in_bitmap(bitmap: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Whether each of ``hashes`` may be in the filter ``bitmap``."""
    at = (hashes >> _SHIFT).astype(np.int64)
    return ((bitmap[at >> 3] >> (at & 7).astype(np.uint8)) & 1).astype(np.bool_)


@dataclass(frozen=True)
class _Table:
    """Sorted distinct keys, each with the first (lowest) benchmark index holding it."""

    keys: np.ndarray
    first: np.ndarray

    @classmethod
    def of(cls, parts: Sequence[np.ndarray], owners: Sequence[int] | None = None) -> _Table:
        owners = list(range(len(parts))) if owners is None else list(owners)
        keys = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        bench = np.repeat(np.asarray(owners, dtype=np.int64), [len(p) for p in parts])
        order = np.lexsort((bench, keys))
        keys, bench = keys[order], bench[order]
        first = np.ones(len(keys), dtype=np.bool_)
        first[1:] = keys[1:] != keys[:-1]
        return cls(keys[first], bench[first])

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """The benchmark index of each value, -1 where none holds it."""
        if not len(self.keys) or not len(values):
            return np.full(len(values), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, values), len(self.keys) - 1)
        return np.where(self.keys[pos] == values, self.first[pos], -1)


def _first(rows: int, owner: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Per row, the lowest benchmark index found among its entries (-1 for none)."""
    out = np.full(rows, np.iinfo(np.int64).max, dtype=np.int64)
    hit = found >= 0
    np.minimum.at(out, owner[hit], found[hit])
    return np.where(out == np.iinfo(np.int64).max, -1, out)


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise the lower benchmark index of two ``_first`` results."""
    return np.where(a < 0, b, np.where(b < 0, a, np.minimum(a, b)))
