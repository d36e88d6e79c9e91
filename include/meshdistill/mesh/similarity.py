"""MeSH-hierarchy similarity (pipeline step 5): pure functions over tree numbers, no database.

The grade asks how close two descriptors sit in the MeSH hierarchy, then how close two
*sets* of descriptors are. A descriptor can appear in several places of the hierarchy
(Breast Neoplasms is both C04.588.180 and C17.800.090.500), so the descriptor measure takes
the best pair of positions; the set measure is a best-match average so that one
unrelated heading does not wipe out several good ones.

- ``sim(a, b) = max over t ∈ T(a), u ∈ T(b) of 2·lcp(t, u) / (depth(t) + depth(u))``: a
  Wu–Palmer measure where ``depth`` counts dot-separated parts and ``lcp`` the shared
  leading parts. Parts are compared whole, so 'C04' and 'C14' share nothing and different
  categories always score 0.
- ``BMA(A, B) = ½·(mean_a max_b sim(a, b) + mean_b max_a sim(a, b))`` with major topics
  weighted ``major_weight`` (2 by default) in the means.

The distill stage scores thousands of (question, contexts) pairs over the same few
thousand descriptors, so :class:`TreeIndex` splits every tree number once, groups the
positions of a descriptor by top-level tree ('C04', 'C17', ...) so cross-tree pairs are
never compared, and memoizes descriptor pairs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import lru_cache

Parts = tuple[str, ...]

DEFAULT_ALPHA = 0.5
"""Weight of BMA(source, contexts) in :func:`hierarchy_score`; the rest goes to
BMA(question, source). Equal by default: the DESIGN asks for a blend without ranking the
two, and both lie in [0, 1] so neither dominates by scale."""

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
    """Tree numbers of descriptors, pre-split, with memoized pairwise similarities.

    Built once per grading run from ``{ui: [tree numbers]}`` (e.g. ``mesh_tree`` rows with a
    UI). A UI missing from the index has no position in the hierarchy: it scores 0.0 against
    every other descriptor but 1.0 against itself, since a heading shared verbatim is the
    strongest agreement there is whether or not this MeSH year still files it in a tree.
    """

    def __init__(
        self, trees: Mapping[str, Iterable[str]], cache_size: int | None = 1 << 20
    ) -> None:
        # ui -> {top-level tree: [split tree numbers]}; pairs in different top-level trees
        # score 0, so only the shared keys are ever compared.
        self._by_top: dict[str, dict[str, list[Parts]]] = {}
        # The same positions as (ancestor-or-self prefixes, depth), built on first use
        # (see _prefix_groups): the prefixes of a tree number form a chain, so
        # |P(t) ∩ P(u)| is lcp(t, u), and a C-level set intersection replaces the Python
        # loop of _lcp when a pair is first computed.
        self._prefixes: dict[str, dict[str, list[tuple[frozenset[Parts], int]]]] = {}
        for ui, numbers in trees.items():
            groups: dict[str, list[Parts]] = {}
            for number in dict.fromkeys(numbers):
                if number:
                    parts = _split(number)
                    groups.setdefault(parts[0], []).append(parts)
            self._by_top[ui] = groups
        # Per instance (not a decorated method) so the cache dies with the index; bounded so
        # a long run over many subtrees cannot grow it without limit.
        self._pair = lru_cache(maxsize=cache_size)(self._compute)
        # BMA columns: {tuple(A): {y: [sim(x, y) for x in A]}}. The distill stage compares
        # the same few sets (a source's headings, a question's descriptors) with many
        # overlapping others, so a column is computed once per (A, y) and a BMA costs one
        # dict look-up and a C-level max per heading of B instead of |A| method calls and
        # cache look-ups. Bounded like the pair cache: cleared when it holds too many sets.
        self._columns: dict[tuple[str, ...], dict[str, list[float]]] = {}
        self._max_column_sets = 1 << 14 if cache_size is None else max(cache_size >> 6, 1)

    def __contains__(self, ui: object) -> bool:
        return ui in self._by_top and bool(self._by_top[ui])

    def __len__(self) -> int:
        return len(self._by_top)

    def tree_numbers(self, ui: str) -> list[str]:
        return [".".join(p) for group in self._by_top.get(ui, {}).values() for p in group]

    def _prefix_groups(self, ui: str) -> dict[str, list[tuple[frozenset[Parts], int]]]:
        groups = self._prefixes.get(ui)
        if groups is None:
            groups = self._prefixes[ui] = {
                top: [(frozenset(p[:n] for n in range(1, len(p) + 1)), len(p)) for p in group]
                for top, group in self._by_top.get(ui, {}).items()}
        return groups

    def _compute(self, a: str, b: str) -> float:
        ga = self._prefix_groups(a)
        gb = self._prefix_groups(b)
        if not ga or not gb:
            return 0.0
        if len(ga) > len(gb):  # walk the smaller side (the maximum is order-free)
            ga, gb = gb, ga
        best = 0.0
        for top, group_a in ga.items():
            group_b = gb.get(top)
            if group_b is None:
                continue
            for pt, dt in group_a:
                for pu, du in group_b:
                    # = _parts_similarity(t, u): the same integers, so the same float
                    s = 2.0 * len(pt & pu) / (dt + du)
                    if s > best:
                        best = s
                        if best == 1.0:
                            return best
        return best

    def similarity(self, a: str, b: str) -> float:
        """``sim(a, b)`` for two descriptor UIs (symmetric, in [0, 1], 1.0 when a == b)."""
        if a == b:
            return 1.0
        return self._pair(a, b) if a < b else self._pair(b, a)

    def cache_stats(self) -> dict[str, int]:
        """Hits, misses and size of the pair cache, to check reuse across a grading run."""
        info = self._pair.cache_info()
        return {"hits": info.hits, "misses": info.misses, "size": info.currsize}

    def best_match_average(
        self,
        a_uis: Iterable[str],
        b_uis: Iterable[str],
        major_a: Collection[str] = frozenset(),
        major_b: Collection[str] = frozenset(),
        major_weight: float = DEFAULT_MAJOR_WEIGHT,
    ) -> float:
        """``BMA(A, B)``; see :func:`best_match_average`."""
        a = _unique(a_uis)
        b = _unique(b_uis)
        if not a or not b:
            return 0.0
        key = tuple(a)
        columns = self._columns.get(key)
        if columns is None:
            if len(self._columns) >= self._max_column_sets:
                self._columns.clear()
            columns = self._columns[key] = {}
        # row_best[i] = max_j sim(a_i, b_j), col_best[j] = max_i sim(a_i, b_j): the same
        # maxima as a plain double loop (every similarity is >= 0, and max of floats is
        # exact), so the means below are bit-identical to it.
        row_best = [0.0] * len(a)
        col_best = []
        similarity = self.similarity
        for y in b:
            column = columns.get(y)
            if column is None:
                column = columns[y] = [similarity(x, y) for x in a]
            row_best = list(map(max, row_best, column))
            col_best.append(max(column))
        wa = [major_weight if x in major_a else 1.0 for x in a]
        wb = [major_weight if y in major_b else 1.0 for y in b]
        mean_a = sum(w * s for w, s in zip(wa, row_best, strict=True)) / sum(wa)
        mean_b = sum(w * s for w, s in zip(wb, col_best, strict=True)) / sum(wb)
        return 0.5 * (mean_a + mean_b)


def _as_index(trees: Mapping[str, Sequence[str]] | TreeIndex, *uis: Iterable[str]) -> TreeIndex:
    if isinstance(trees, TreeIndex):
        return trees
    # A throwaway index over just the UIs involved: cheap, and avoids splitting a full
    # 30k-descriptor mapping for one call. Callers scoring many pairs pass a TreeIndex.
    wanted = {u for group in uis for u in group}
    return TreeIndex({u: trees[u] for u in wanted if u in trees}, cache_size=None)


def best_match_average(
    a_uis: Collection[str],
    b_uis: Collection[str],
    trees: Mapping[str, Sequence[str]] | TreeIndex,
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
    :class:`TreeIndex` to reuse its cache across calls.
    """
    index = _as_index(trees, a_uis, b_uis)
    return index.best_match_average(a_uis, b_uis, major_a, major_b, major_weight)


def hierarchy_score(
    source: Collection[str],
    contexts: Collection[str],
    question: Collection[str],
    trees: Mapping[str, Sequence[str]] | TreeIndex,
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
