"""MeSH-hierarchy similarity, pure functions over tree numbers (docs/grading.md).

- ``sim(a, b) = max over t ∈ T(a), u ∈ T(b) of 2·lcp(t, u) / (depth(t) + depth(u))``: a
  Wu–Palmer measure on tree numbers, ``depth`` counting dot-separated parts and ``lcp``
  the shared leading parts (compared whole, so different categories score 0). The max is
  taken over positions because a descriptor can sit in several places of the hierarchy.
- ``BMA(A, B) = ½·(mean_a max_b sim(a, b) + mean_b max_a sim(a, b))``, major topics
  weighted ``major_weight`` (2) in the means, so that one unrelated heading does not
  wipe out several good ones.

:func:`tree_similarity` and :func:`descriptor_similarity` state the measure plainly;
:class:`TreeIndex` and :class:`SimilarityTable` compute the same values, bit for bit, as
whole numpy matrices, for the thousands of pairs a distill run scores (docs/architecture.md,
Pipeline steps: Grade).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np

Parts = tuple[str, ...]

DEFAULT_ALPHA = 0.5
"""Weight of BMA(source, contexts) in :func:`hierarchy_score`; the rest goes to
BMA(question, source). Equal by default: neither term is known to matter more, and both
lie in [0, 1] so neither dominates by scale."""

DEFAULT_MAJOR_WEIGHT = 2.0


def _split(tree_number: str) -> Parts:
    return tuple(tree_number.split("."))


def _lcp(t: Parts, u: Parts) -> int:
    n = 0
    for x, y in zip(t, u, strict=False):
        if x != y:
            break
        n += 1
    return n


def _parts_similarity(t: Parts, u: Parts) -> float:
    total = len(t) + len(u)
    return 2.0 * _lcp(t, u) / total if total else 0.0


def tree_similarity(t: str, u: str) -> float:
    """Wu–Palmer similarity of two tree numbers: ``2·lcp / (depth(t) + depth(u))``."""
    return _parts_similarity(_split(t), _split(u))


def descriptor_similarity(a_trees: Iterable[str], b_trees: Iterable[str]) -> float:
    """Best similarity over all pairs of the two descriptors' tree numbers.

    A descriptor is as close to another as its closest position in the hierarchy, so the
    max (not the mean) is taken. Two descriptors sharing a tree number score 1.0; one
    without tree numbers scores 0.0 (nothing to compare).
    """
    a = [_split(t) for t in a_trees if t]
    b = [_split(u) for u in b_trees if u]
    return max((_parts_similarity(t, u) for t in a for u in b), default=0.0)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


class TreeIndex:
    """Tree numbers of descriptors, encoded once for whole-matrix similarity in numpy.

    Built once per grading run from ``{ui: [tree numbers]}`` (e.g. ``mesh_tree`` rows with a
    UI). A UI missing from the index has no position in the hierarchy: it scores 0.0 against
    every other descriptor but 1.0 against itself, since a heading shared verbatim is the
    strongest agreement there is whether or not this MeSH year still files it in a tree.

    Every position (tree number) is a row of node ids, one per level: the id of the
    prefix of that length, so two positions agree at level ``k`` exactly when their first
    ``k+1`` parts agree, and ``lcp`` is a count of equal cells. All pairs of a grading
    step are one broadcast comparison; ``np.maximum.reduceat`` turns position pairs into
    descriptor pairs. The arithmetic (``2.0·lcp / (depth + depth)`` in float64) is that of
    :func:`tree_similarity`, so the values are identical, not merely close. Why numpy
    rather than a memoised pair function (almost every pair is new): ``docs/grading.md``.
    """

    def __init__(self, trees: Mapping[str, Iterable[str]]) -> None:
        node_ids: dict[str, int] = {}
        rows: list[list[int]] = []
        self._span: dict[str, tuple[int, int]] = {}  # ui -> its positions' rows [start, end)
        for ui, numbers in trees.items():
            start = len(rows)
            for number in dict.fromkeys(numbers):
                if not number:
                    continue
                parts = number.split(".")
                # the id of each prefix ('C04', 'C04.588', ...): a node of the hierarchy
                rows.append([node_ids.setdefault(".".join(parts[: k + 1]), len(node_ids))
                             for k in range(len(parts))])
            self._span[ui] = (start, len(rows))
        width = max((len(r) for r in rows), default=1)
        # Padding differs by side (-1 on the left, -2 on the right) so that padding never
        # counts as an agreeing level.
        self._left = np.full((len(rows), width), -1, dtype=np.int32)
        for i, r in enumerate(rows):
            self._left[i, : len(r)] = r
        self._right = np.where(self._left < 0, -2, self._left).astype(np.int32)
        self._depth = np.array([len(r) for r in rows], dtype=np.int64)

    def __contains__(self, ui: object) -> bool:
        span = self._span.get(ui) if isinstance(ui, str) else None
        return span is not None and span[1] > span[0]

    def __len__(self) -> int:
        return len(self._span)

    def _positions(self, uis: Sequence[str]) -> tuple[list[int], list[int], list[int]]:
        """(row of each position, start of each placed descriptor's run, which descriptor)."""
        rows: list[int] = []
        starts: list[int] = []
        placed: list[int] = []
        for i, ui in enumerate(uis):
            start, end = self._span.get(ui, (0, 0))
            if end > start:
                starts.append(len(rows))
                placed.append(i)
                rows.extend(range(start, end))
        return rows, starts, placed

    def similarity_matrix(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """``sim(a_i, b_j)`` for every pair, a ``len(a) × len(b)`` float64 array."""
        out = np.zeros((len(a), len(b)))
        rows_a, starts_a, placed_a = self._positions(a)
        rows_b, starts_b, placed_b = self._positions(b)
        if rows_a and rows_b:
            depth_a, depth_b = self._depth[rows_a], self._depth[rows_b]
            width = int(max(depth_a.max(), depth_b.max()))
            left = self._left[rows_a, :width]
            right = self._right[rows_b, :width]
            lcp = (left[:, None, :] == right[None, :, :]).sum(axis=2)
            sims = (2.0 * lcp) / (depth_a[:, None] + depth_b[None, :])
            best = np.maximum.reduceat(np.maximum.reduceat(sims, starts_a, axis=0),
                                       starts_b, axis=1)
            out[np.ix_(placed_a, placed_b)] = best
        same = {ui: j for j, ui in enumerate(b)}
        for i, ui in enumerate(a):  # a UI with itself: 1.0, with or without a position
            j = same.get(ui)
            if j is not None:
                out[i, j] = 1.0
        return out

    def similarity(self, a: str, b: str) -> float:
        """``sim(a, b)`` for two descriptor UIs (symmetric, in [0, 1], 1.0 when a == b)."""
        return float(self.similarity_matrix([a], [b])[0, 0])

    def table(self, a_uis: Iterable[str], b_uis: Iterable[str]) -> SimilarityTable:
        """Every similarity between two sets of descriptors, for many BMAs over them."""
        return SimilarityTable(self, _unique(a_uis), _unique(b_uis))

    def best_match_average(
        self,
        a_uis: Iterable[str],
        b_uis: Iterable[str],
        major_a: Collection[str] = frozenset(),
        major_b: Collection[str] = frozenset(),
        major_weight: float = DEFAULT_MAJOR_WEIGHT,
    ) -> float:
        """``BMA(A, B)``; see :func:`best_match_average`."""
        a, b = _unique(a_uis), _unique(b_uis)
        return _bma(self.similarity_matrix(a, b), a, b, major_a, major_b, major_weight)


class SimilarityTable:
    """The similarities of a row set × a column set of descriptors, computed at once.

    One grading step (a question against its retrieved contexts, then the item score over
    the chosen ones) asks for a dozen BMAs over the same descriptors; each is a slice of
    this table instead of a matrix of its own. A BMA over descriptors the table does not
    hold is computed from the index (correct, just not shared).
    """

    def __init__(self, index: TreeIndex, rows: list[str], cols: list[str]) -> None:
        self.index = index
        self._matrix = index.similarity_matrix(rows, cols)
        self._row = {ui: i for i, ui in enumerate(rows)}
        self._col = {ui: j for j, ui in enumerate(cols)}

    def best_match_average(
        self,
        a_uis: Iterable[str],
        b_uis: Iterable[str],
        major_a: Collection[str] = frozenset(),
        major_b: Collection[str] = frozenset(),
        major_weight: float = DEFAULT_MAJOR_WEIGHT,
    ) -> float:
        """``BMA(A, B)`` from the table (``A`` among the rows and ``B`` among the columns,
        or the other way round: the measure is symmetric)."""
        a, b = _unique(a_uis), _unique(b_uis)
        if not a or not b:
            return 0.0
        rows, cols = self._row, self._col
        if all(x in rows for x in a) and all(y in cols for y in b):
            sub = self._matrix[np.ix_([rows[x] for x in a], [cols[y] for y in b])]
        elif all(x in cols for x in a) and all(y in rows for y in b):
            sub = self._matrix[np.ix_([rows[y] for y in b], [cols[x] for x in a])].T
        else:
            sub = self.index.similarity_matrix(a, b)
        return _bma(sub, a, b, major_a, major_b, major_weight)

    def best_match_averages(
        self,
        a_uis: Iterable[str],
        b_sets: Sequence[Iterable[str]],
        majors_b: Sequence[Collection[str]],
        major_weight: float = DEFAULT_MAJOR_WEIGHT,
    ) -> list[float]:
        """``[BMA(A, B_j) for each j]`` (``B_j``'s majors weighted, none of ``A``'s), the
        same values as one :meth:`best_match_average` per set, in one gather.

        Why: a question is scored against each of its ten contexts; ten small slices and
        twenty reductions cost more than the arithmetic. Here the contexts' columns are
        gathered side by side and the row maxima of every context come from one
        ``np.maximum.reduceat``. Maxima are exact in any order and the means are summed in
        Python as :func:`_bma` sums them, so each value is bit-identical.
        """
        a = _unique(a_uis)
        sets = [_unique(b) for b in b_sets]
        rows, cols = self._row, self._col
        if not a or not all(x in rows for x in a) or not all(
                y in cols for b in sets for y in b):
            return [self.best_match_average(a, b, frozenset(), m, major_weight)
                    for b, m in zip(sets, majors_b, strict=True)]
        placed = [j for j, b in enumerate(sets) if b]
        out = [0.0] * len(sets)
        if not placed:
            return out
        starts: list[int] = []
        columns: list[int] = []
        for j in placed:
            starts.append(len(columns))
            columns.extend(cols[y] for y in sets[j])
        sub = self._matrix[np.ix_([rows[x] for x in a], columns)]
        col_best = sub.max(axis=0).tolist()
        row_best = np.maximum.reduceat(sub, starts, axis=1).T.tolist()
        wa = [1.0] * len(a)
        for k, j in enumerate(placed):
            start = starts[k]
            b = sets[j]
            out[j] = _mean_of_best(row_best[k], col_best[start:start + len(b)], wa,
                                   [major_weight if y in majors_b[j] else 1.0 for y in b])
        return out


def _mean_of_best(row_best: list[float], col_best: list[float], wa: list[float],
                  wb: list[float]) -> float:
    """``½·(weighted mean of row_best + weighted mean of col_best)``, summed in Python,
    left to right, as the definition reads (numpy's pairwise summation could differ in
    the last bit)."""
    mean_a = sum(w * s for w, s in zip(wa, row_best, strict=True)) / sum(wa)
    mean_b = sum(w * s for w, s in zip(wb, col_best, strict=True)) / sum(wb)
    return 0.5 * (mean_a + mean_b)


def _bma(
    matrix: np.ndarray, a: Sequence[str], b: Sequence[str], major_a: Collection[str],
    major_b: Collection[str], major_weight: float,
) -> float:
    """BMA of the distinct sets ``a`` × ``b`` given their similarity matrix."""
    if not a or not b:
        return 0.0
    # Maxima in numpy (exact); the weighted means in Python (see _mean_of_best).
    row_best = matrix.max(axis=1).tolist()
    col_best = matrix.max(axis=0).tolist()
    wa = [major_weight if x in major_a else 1.0 for x in a]
    wb = [major_weight if y in major_b else 1.0 for y in b]
    return _mean_of_best(row_best, col_best, wa, wb)


def _as_index(
    trees: Mapping[str, Sequence[str]] | TreeIndex | SimilarityTable, *uis: Iterable[str]
) -> TreeIndex | SimilarityTable:
    if isinstance(trees, TreeIndex | SimilarityTable):
        return trees
    # A throwaway index over just the UIs involved: cheap, and avoids encoding a full
    # 30k-descriptor mapping for one call. Callers scoring many sets pass a TreeIndex, or
    # a SimilarityTable over the sets.
    wanted = {u for group in uis for u in group}
    return TreeIndex({u: trees[u] for u in wanted if u in trees})


def best_match_average(
    a_uis: Collection[str],
    b_uis: Collection[str],
    trees: Mapping[str, Sequence[str]] | TreeIndex | SimilarityTable,
    major_a: Collection[str] = frozenset(),
    major_b: Collection[str] = frozenset(),
    major_weight: float = DEFAULT_MAJOR_WEIGHT,
) -> float:
    """Best-match average of two descriptor sets, in [0, 1] and symmetric.

    Each descriptor on either side is credited with its best partner on the other side, and
    the two directions are averaged so that a large set cannot score well merely by
    containing the small one. Major topics count ``major_weight`` times in their side's mean
    because they say what the article is about. Duplicates count once. Either side empty:
    0.0 (no evidence of topical agreement). ``trees`` maps UI -> tree numbers, or is a
    :class:`TreeIndex` (or a :class:`SimilarityTable` holding both sets) built once for
    many calls.
    """
    index = _as_index(trees, a_uis, b_uis)
    return index.best_match_average(a_uis, b_uis, major_a, major_b, major_weight)


def hierarchy_score(
    source: Collection[str],
    contexts: Collection[str],
    question: Collection[str],
    trees: Mapping[str, Sequence[str]] | TreeIndex | SimilarityTable,
    alpha: float = DEFAULT_ALPHA,
    major_source: Collection[str] = frozenset(),
    major_contexts: Collection[str] = frozenset(),
    major_weight: float = DEFAULT_MAJOR_WEIGHT,
) -> float:
    """Hierarchy score of a (question, contexts) pair, in [0, 1].

    ``alpha·BMA(source, contexts) + (1 − alpha)·BMA(question, source)`` where ``source`` is
    the source abstract's MeSH headings, ``contexts`` the union of the retrieved context
    abstracts' headings and ``question`` the descriptors found in the question text (see
    :mod:`meshdistill.mesh.matcher`). The first term rewards contexts on the source's topic,
    the second a question that stays on it.

    When ``question`` is empty the score is ``BMA(source, contexts)`` alone. Text matching
    only finds descriptor names and entry terms written out verbatim, so a question with no
    match is weak evidence of being off-topic; scoring it 0 would rank candidates by the
    matcher's coverage rather than by the question. Empty ``source`` or ``contexts`` make
    the corresponding BMA 0.0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    index = _as_index(trees, source, contexts, question)
    context_part = index.best_match_average(
        source, contexts, major_source, major_contexts, major_weight
    )
    if not question:
        return context_part
    question_part = index.best_match_average(
        question, source, frozenset(), major_source, major_weight
    )
    return alpha * context_part + (1.0 - alpha) * question_part
