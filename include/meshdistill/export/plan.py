"""Deciding what an export keeps: decontamination, duplicates, splits, leakage and caps.

The narrow pass of :mod:`~meshdistill.export.source` feeds a :class:`Population` (items,
or preference pairs) batch by batch; :meth:`Population.decide` then applies, in order:
benchmark decontamination, exact duplicates, near-duplicates, the split of each source
PMID, cross-split contexts (counted; dropped with ``strict_splits``), the caps per
subtree and per question type, and the cap on the majority yes/no/maybe label. Where a
rule keeps one of several rows it keeps the best-ranked: items by hierarchy score, then
judge score sum, then id; pairs by margin, then chosen score, then id. Everything is
held in numpy arrays of about 110 bytes a row (signatures go to a temporary file), so a
million items plan in a few hundred megabytes.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from meshdistill.export.benchmarks import ContaminationIndex
from meshdistill.export.dedup import NearDuplicates, exact_duplicates
from meshdistill.export.settings import SPLITS, ExportSettings
from meshdistill.export.splits import split_index
from meshdistill.export.text import Tokens

REASONS = ("contamination_pmid", "contamination_ngram", "exact_duplicate", "near_duplicate",
           "cross_split_context", "cap_subtree", "cap_type", "cap_label")


@dataclass(frozen=True)
class Rows:
    """One batch of the narrow pass, column by column. ``questions`` are what
    near-duplicates and decontamination compare, ``exact`` the keys exact duplicates
    compare, ``also_checked`` further text checked for contamination (a pair's rejected
    question); row ``i``'s context PMIDs are
    ``context_pmids[context_offsets[i]:context_offsets[i + 1]]``."""

    ids: npt.NDArray[np.int64]
    pmids: npt.NDArray[np.int64]
    subtrees: pa.Array
    qtypes: pa.Array
    labels: pa.Array
    primary: npt.NDArray[np.float64]
    secondary: npt.NDArray[np.float64]
    questions: Tokens
    exact: npt.NDArray[np.uint64]
    context_pmids: npt.NDArray[np.int64]
    context_offsets: npt.NDArray[np.int64]
    also_checked: Tokens | None = None

    @classmethod
    def of(cls, *, ids: Sequence[int], pmids: Sequence[int], subtrees: Sequence[str],
           qtypes: Sequence[str], labels: Sequence[str | None], questions: Sequence[str],
           primary: Sequence[float], secondary: Sequence[float],
           contexts: Sequence[Sequence[int]] | None = None) -> Rows:
        """Rows from Python lists (the exact key is the question's)."""
        tokens = Tokens.of(list(questions))
        ctx = contexts or [[] for _ in ids]
        offsets = np.zeros(len(ctx) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in ctx], out=offsets[1:])
        return cls(np.asarray(ids, np.int64), np.asarray(pmids, np.int64),
                   pa.array(subtrees, pa.string()), pa.array(qtypes, pa.string()),
                   pa.array(labels, pa.string()), np.asarray(primary, np.float64),
                   np.asarray(secondary, np.float64), tokens, tokens.runs().whole(),
                   np.asarray([p for c in ctx for p in c], np.int64), offsets)


def _codes(values: pa.Array, table: dict[str, int]) -> npt.NDArray[np.int32]:
    """Stable integer codes of ``values`` (null is ``""``), growing ``table``."""
    encoded = pc.dictionary_encode(pc.fill_null(values, ""))
    mapping = np.asarray([table.setdefault(v, len(table))
                          for v in encoded.dictionary.to_pylist()], dtype=np.int32)
    return mapping[encoded.indices.to_numpy(zero_copy_only=False)] if len(mapping) else (
        np.zeros(0, np.int32))


@dataclass
class Population:
    """The rows of one kind (``items`` or ``pairs``) seen by the narrow pass."""

    kind: str
    settings: ExportSettings
    index: ContaminationIndex | None
    workdir: str | Path | None = None
    ids: list[npt.NDArray[np.int64]] = field(default_factory=list)
    pmids: list[npt.NDArray[np.int64]] = field(default_factory=list)
    primary: list[npt.NDArray[np.float64]] = field(default_factory=list)
    secondary: list[npt.NDArray[np.float64]] = field(default_factory=list)
    exact: list[npt.NDArray[np.uint64]] = field(default_factory=list)
    subtree: list[npt.NDArray[np.int32]] = field(default_factory=list)
    qtype: list[npt.NDArray[np.int32]] = field(default_factory=list)
    label: list[npt.NDArray[np.int32]] = field(default_factory=list)
    contaminated: list[npt.NDArray[np.int8]] = field(default_factory=list)  # 0, 1 pmid, 2 run
    context_pmids: list[npt.NDArray[np.integer[Any]]] = field(default_factory=list)
    context_counts: list[npt.NDArray[np.int32]] = field(default_factory=list)
    subtrees: dict[str, int] = field(default_factory=dict)
    qtypes: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=lambda: {"": 0})
    by_benchmark: Counter[tuple[str, str]] = field(default_factory=Counter)
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Time spent per cleaning step (``decontamination``, ``minhash``, ``clusters``)."""

    def __post_init__(self) -> None:
        threshold = self.settings.near_dup_threshold
        self._near = (NearDuplicates(threshold, workdir=self.workdir) if threshold < 1.0
                      else None)

    def add(self, rows: Rows) -> None:
        """Take one batch of the narrow pass."""
        self.ids.append(rows.ids)
        self.pmids.append(rows.pmids)
        self.primary.append(rows.primary)
        self.secondary.append(rows.secondary)
        self.exact.append(rows.exact)
        self.subtree.append(_codes(rows.subtrees, self.subtrees))
        self.qtype.append(_codes(rows.qtypes, self.qtypes))
        self.label.append(_codes(rows.labels, self.labels))
        self.context_pmids.append(_narrow(rows.context_pmids))
        counts = np.diff(rows.context_offsets)
        self.context_counts.append(counts.astype(np.int32))
        t0 = time.perf_counter()
        self.contaminated.append(self._contamination(rows, counts))
        t1 = time.perf_counter()
        self.seconds["decontamination"] += t1 - t0
        if self._near is not None:
            self._near.add(rows.questions)
            self.seconds["minhash"] += time.perf_counter() - t1

    def _contamination(self, rows: Rows, counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int8]:
        n = len(rows.ids)
        if self.index is None:
            return np.zeros(n, dtype=np.int8)
        # each row's PMIDs: its source, then its contexts
        offsets = rows.context_offsets + np.arange(n + 1)
        pmids = np.empty(int(offsets[-1]), dtype=np.int64)
        source = offsets[:-1]
        pmids[source] = rows.pmids
        rest = np.ones(len(pmids), dtype=np.bool_)
        rest[source] = False
        pmids[rest] = rows.context_pmids
        reason, bench = self.index.check_batch(rows.questions, pmids, offsets)
        if rows.also_checked is not None:
            other, other_bench = self.index.check_batch(rows.also_checked, pmids, offsets)
            use = reason == 0
            reason, bench = np.where(use, other, reason), np.where(use, other_bench, bench)
        hit = np.flatnonzero(reason > 0)
        names = self.index.benchmarks
        for (b, r), c in Counter(zip(bench[hit].tolist(), reason[hit].tolist(),
                                     strict=True)).items():
            self.by_benchmark[(names[b].name, "pmid" if r == 1 else "ngram")] += c
        return reason.astype(np.int8)

    def decide(self) -> Decision:
        """Apply the rules (module doc) and return what is kept, in which split. Call once:
        the batches are released as they are joined."""
        try:
            return self._decide()
        finally:
            if self._near is not None:
                self._near.close()

    def _decide(self) -> Decision:
        s = self.settings
        ids = _cat(self.ids, np.int64)
        n = len(ids)
        pmids = _cat(self.pmids, np.int64)
        primary, secondary = _cat(self.primary, np.float64), _cat(self.secondary, np.float64)
        order = np.lexsort((ids, -secondary, -primary))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        del order
        removed: dict[str, int] = dict.fromkeys(REASONS, 0)
        contaminated = _cat(self.contaminated, np.int8)
        removed["contamination_pmid"] = int((contaminated == 1).sum())
        removed["contamination_ngram"] = int((contaminated == 2).sum())
        active = contaminated == 0
        exact = exact_duplicates(_cat(self.exact, np.uint64), rank, active)
        removed["exact_duplicate"] = int(exact.sum())
        active &= ~exact
        t0 = time.perf_counter()
        near, verified_pairs = (self._near.duplicates(rank, active) if self._near is not None
                                else (np.zeros(n, dtype=np.bool_), 0))
        self.seconds["clusters"] += time.perf_counter() - t0
        removed["near_duplicate"] = int(near.sum())
        active &= ~near
        split = split_index(pmids, s.seed, s.split_ratios)
        leaking = self._cross_split(pmids, split, active)
        if s.strict_splits:
            removed["cross_split_context"] = int((leaking & active).sum())
            active &= ~leaking
        subtree, qtype = _cat(self.subtree, np.int32), _cat(self.qtype, np.int32)
        for reason, groups, cap in (("cap_subtree", subtree, s.max_per_subtree),
                                    ("cap_type", qtype, s.max_per_type)):
            if cap is not None:
                over = _over_cap(groups, rank, active, cap)
                removed[reason] = int(over.sum())
                active &= ~over
        label = _cat(self.label, np.int32)
        if s.max_label_share is not None and self.kind == "items":
            over = _label_cap(label, rank, active & (label > 0), s.max_label_share)
            removed["cap_label"] = int(over.sum())
            active &= ~over
        kept = np.flatnonzero(active)
        keep_order = kept[np.argsort(ids[kept])]
        return Decision(
            kind=self.kind, ids=ids[keep_order], split=split[keep_order], seen=n,
            removed=removed, near_pairs=verified_pairs,
            cross_split=int((leaking & (contaminated == 0)).sum()),
            by_benchmark={f"{b}:{r}": c for (b, r), c in sorted(self.by_benchmark.items())},
            subtree_names=_names(self.subtrees), subtree=subtree[keep_order],
            qtype_names=_names(self.qtypes), qtype=qtype[keep_order],
            label_names=_names(self.labels), label=label[keep_order],
            seconds={k: round(v, 3) for k, v in sorted(self.seconds.items())})

    def _cross_split(self, pmids: npt.NDArray[np.int64], split: npt.NDArray[np.int8],
                     active: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """Rows with a context that is the source of an active row in another split,
        checked :data:`CHUNK_ROWS` rows at a time (the temporary arrays of a million rows'
        contexts at once would take more memory than the plan itself)."""
        counts = _cat(self.context_counts, np.int64)
        flat = _cat(self.context_pmids, _widest(self.context_pmids))
        out = np.zeros(len(pmids), dtype=np.bool_)
        if not len(flat):
            return out
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        sources = np.unique(pmids[active])
        s = self.settings
        for lo in range(0, len(pmids), CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, len(pmids))
            part = flat[offsets[lo]:offsets[hi]]
            owner = np.repeat(np.arange(lo, hi), counts[lo:hi])
            foreign = (np.isin(part, sources) & (part != pmids[owner])
                       & (split_index(part.astype(np.int64), s.seed, s.split_ratios)
                          != split[owner]))
            out[owner[foreign]] = True
        return out


CHUNK_ROWS = 1 << 16
"""Rows whose contexts are checked for cross-split leakage at once."""


def _cat(parts: list[Any], dtype: Any) -> Any:
    """The batches of ``parts`` as one array; ``parts`` is emptied (each column is held
    once, not twice, while a million rows are decided)."""
    out = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
    parts.clear()
    return out


def _narrow(pmids: npt.NDArray[np.int64]) -> npt.NDArray[np.integer[Any]]:
    """``pmids`` as 32-bit integers when they all fit (every PMID so far does): the
    context PMIDs are the plan's largest column."""
    if not len(pmids) or (pmids.min() >= 0 and pmids.max() < 2**31):
        return pmids.astype(np.int32)
    return pmids


def _widest(parts: list[Any]) -> Any:
    return np.result_type(*parts) if parts else np.int64


def _names(table: dict[str, int]) -> list[str]:
    return [name for name, _ in sorted(table.items(), key=lambda kv: kv[1])]


def _over_cap(groups: npt.NDArray[np.int32], rank: npt.NDArray[np.int64],
              active: npt.NDArray[np.bool_], cap: int) -> npt.NDArray[np.bool_]:
    """Active rows past the ``cap`` best-ranked of their group."""
    idx = np.flatnonzero(active)
    order = idx[np.lexsort((rank[idx], groups[idx]))]
    g = groups[order]
    start = np.concatenate(([True], g[1:] != g[:-1])) if len(g) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(start, np.arange(len(g)), 0))
    out = np.zeros(len(groups), dtype=np.bool_)
    out[order[(np.arange(len(g)) - first) >= cap]] = True
    return out


def _label_cap(label: npt.NDArray[np.int32], rank: npt.NDArray[np.int64],
               active: npt.NDArray[np.bool_], share: float) -> npt.NDArray[np.bool_]:
    """Drop the worst-ranked rows of the largest label until no label's share among the
    active labelled rows exceeds ``share``."""
    out = np.zeros(len(label), dtype=np.bool_)
    counts = Counter(label[active].tolist())
    while counts:
        total = sum(counts.values())
        top, m = counts.most_common(1)[0]
        if m <= share * total or total == m:
            break
        others = total - m
        allowed = max(int(share * others / (1 - share)), 0)
        rows = np.flatnonzero(active & ~out & (label == top))
        worst = rows[np.argsort(rank[rows])][allowed:]
        out[worst] = True
        counts[top] = allowed
        if allowed == 0:
            del counts[top]
    return out


@dataclass
class Decision:
    """What one population keeps: ids ascending with their split, and why rows went."""

    kind: str
    ids: npt.NDArray[np.int64]
    split: npt.NDArray[np.int8]
    seen: int
    removed: dict[str, int]
    near_pairs: int
    cross_split: int
    by_benchmark: dict[str, int]
    subtree_names: list[str]
    subtree: npt.NDArray[np.int32]
    qtype_names: list[str]
    qtype: npt.NDArray[np.int32]
    label_names: list[str]
    label: npt.NDArray[np.int32]
    seconds: dict[str, float] = field(default_factory=dict)

    def split_of(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int8]:
        """The split index of each id, -1 for ids not kept."""
        if not len(self.ids):
            return np.full(len(ids), -1, dtype=np.int8)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        found = self.ids[pos] == ids
        return np.where(found, self.split[pos], -1).astype(np.int8)

    def rows_per_split(self) -> dict[str, int]:
        return {name: int((self.split == i).sum()) for i, name in enumerate(SPLITS)}

    def counts(self) -> dict[str, Any]:
        """Counts per split, subtree, type and label (labels of ``yesno`` items only)."""
        def tally(codes: npt.NDArray[np.int32], names: list[str]) -> dict[str, int]:
            found = Counter(codes.tolist())
            return {names[c]: found[c] for c in sorted(found, key=lambda c: names[c])
                    if names[c]}
        by_subtree_split = {
            self.subtree_names[c]: {SPLITS[i]: int(((self.subtree == c) & (self.split == i))
                                                   .sum()) for i in range(len(SPLITS))}
            for c in sorted(set(self.subtree.tolist()), key=lambda c: self.subtree_names[c])}
        return {"rows": len(self.ids), "seen": self.seen, "by_split": self.rows_per_split(),
                "by_subtree": tally(self.subtree, self.subtree_names),
                "by_subtree_split": by_subtree_split,
                "by_type": tally(self.qtype, self.qtype_names),
                "by_label": tally(self.label, self.label_names)}

    def report(self) -> dict[str, Any]:
        """The manifest's account of what went and why."""
        return {"removed": self.removed, "near_duplicate_pairs": self.near_pairs,
                "cross_split_context": self.cross_split, "by_benchmark": self.by_benchmark}
