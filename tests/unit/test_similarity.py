"""MeSH-hierarchy similarity on real 2023 tree numbers, against hand-computed figures.

Tree numbers are read from mtrees2023.bin (``Name;tree number`` per line) so the test
follows the real hierarchy; the expected values are literals worked out by hand from the
numbers quoted in the comments. The descriptor *name* stands in for its UI.
"""

from __future__ import annotations

import random
from functools import cache

import pytest
from meshdistill.fileio import open_text
from meshdistill.mesh.similarity import (
    TreeIndex,
    best_match_average,
    descriptor_similarity,
    hierarchy_score,
    tree_similarity,
)

from tests.support import MTREES_2023

BN = "Breast Neoplasms"  # C04.588.180, C17.800.090.500
BNM = "Breast Neoplasms, Male"  # C04.588.180.260, C17.800.090.500.260
N = "Neoplasms"  # C04
SN = "Skin Neoplasms"  # C04.588.805, C17.800.882
HD = "Heart Diseases"  # C14.280
CVD = "Cardiovascular Diseases"  # C14
T = "Tamoxifen"  # D02.455.426.559.389.150.700.900
BREAST = "Breast"  # A01.236
MEL = "Melanoma"  # C04.557.465.625.650.510, C04.557.580.625.650.510, C04.557.665.510
CDB = "Carcinoma, Ductal, Breast"
# C04.557.470.200.025.232.500, C04.557.470.615.132.500, C04.588.180.390,
# C17.800.090.500.390


@cache
def all_trees() -> dict[str, list[str]]:
    trees: dict[str, list[str]] = {}
    with open_text(MTREES_2023) as fh:
        for line in fh:
            name, _, number = line.rstrip("\n").rpartition(";")
            if name and number:
                trees.setdefault(name, []).append(number)
    return trees


def tn(name: str) -> list[str]:
    return all_trees()[name]


def test_fixture_tree_numbers_are_the_ones_hand_computed_on() -> None:
    # If a future file moved these, the hand computations below would no longer apply.
    assert sorted(tn(BN)) == ["C04.588.180", "C17.800.090.500"]
    assert sorted(tn(BNM)) == ["C04.588.180.260", "C17.800.090.500.260"]
    assert tn(N) == ["C04"]
    assert sorted(tn(SN)) == ["C04.588.805", "C17.800.882"]
    assert tn(HD) == ["C14.280"]
    assert tn(CVD) == ["C14"]
    assert tn(T) == ["D02.455.426.559.389.150.700.900"]
    assert tn(BREAST) == ["A01.236"]
    assert len(tn(MEL)) == 3 and len(tn(CDB)) == 4


def test_tree_similarity_parts_not_characters() -> None:
    # 'C04' vs 'C14': first parts differ -> lcp 0 -> 0 (no credit for the shared 'C').
    assert tree_similarity("C04", "C14") == 0.0
    # C04 vs C04.588.180: lcp 1, depths 1 + 3 -> 2·1/4 = 0.5
    assert tree_similarity("C04", "C04.588.180") == pytest.approx(0.5)
    # C04.588 vs C04.58: lcp 1 ('588' != '58'), depths 2 + 2 -> 2/4
    assert tree_similarity("C04.588", "C04.58") == pytest.approx(0.5)


def test_neoplasms_vs_breast_neoplasms() -> None:
    # C04 vs C04.588.180: lcp 1, depths 1 + 3 -> 2·1/(1+3) = 0.5
    # C04 vs C17.800.090.500: different category -> 0. max = 0.5
    assert descriptor_similarity(tn(N), tn(BN)) == pytest.approx(0.5)


def test_multiple_tree_numbers_take_the_max() -> None:
    # C04.588.180 vs C04.588.180.260: lcp 3, depths 3 + 4 -> 6/7 ≈ 0.857
    # C17.800.090.500 vs C17.800.090.500.260: lcp 4, depths 4 + 5 -> 8/9 ≈ 0.889
    # cross pairs (C04 vs C17) -> 0. max = 8/9 (the C17 position, not the first one)
    assert descriptor_similarity(tn(BN), tn(BNM)) == pytest.approx(8 / 9)
    # C04.588.805 vs C04.588.180: lcp 2, depths 3 + 3 -> 4/6 = 2/3
    # C17.800.882 vs C17.800.090.500: lcp 2, depths 3 + 4 -> 4/7 ≈ 0.571. max = 2/3
    assert descriptor_similarity(tn(SN), tn(BN)) == pytest.approx(2 / 3)
    # Melanoma (3 positions) vs Carcinoma, Ductal, Breast (4 positions), best pair:
    # C04.557.665.510 vs C04.557.470.615.132.500: lcp 2, depths 4 + 6 -> 4/10 = 0.4
    # (e.g. C04.557.465.625.650.510 vs C04.557.470.615.132.500: lcp 2, 6 + 6 -> 1/3;
    #  C04.557.665.510 vs C04.588.180.390: lcp 1, 4 + 4 -> 0.25)
    assert descriptor_similarity(tn(MEL), tn(CDB)) == pytest.approx(0.4)


def test_cross_category_is_zero() -> None:
    # A01.236 vs C04.588.180 / C17.800.090.500: first parts differ -> 0
    assert descriptor_similarity(tn(BREAST), tn(BN)) == 0.0
    # C04 vs C14: different first part -> 0
    assert descriptor_similarity(tn(N), tn(CVD)) == 0.0
    # C14.280 vs C04: 0; D02... vs C04...: 0
    assert descriptor_similarity(tn(HD), tn(N)) == 0.0
    assert descriptor_similarity(tn(T), tn(BN)) == 0.0


def test_same_descriptor_and_empty() -> None:
    # C04.588.180 vs itself: lcp 3, depths 3 + 3 -> 6/6 = 1
    assert descriptor_similarity(tn(BN), tn(BN)) == 1.0
    assert descriptor_similarity([], tn(BN)) == 0.0
    assert descriptor_similarity(tn(BN), []) == 0.0
    index = TreeIndex({BN: tn(BN)})
    assert index.similarity("D999999", "D999999") == 1.0  # same UI, even without a tree
    assert index.similarity("D999999", BN) == 0.0  # no position in the hierarchy


# 2×3 example: A = {BN, T}, B = {BNM, N, HD}
# sim matrix          BNM    N     HD
#   BN               8/9   1/2    0      (values from the tests above; BN vs C14.280 -> 0)
#   T                 0     0     0      (D02 vs C04/C14 -> 0)
# row max: BN 8/9, T 0          col max: BNM 8/9, N 1/2, HD 0
A = [BN, T]
B = [BNM, N, HD]


def test_bma_unweighted_by_hand() -> None:
    # mean_a = (8/9 + 0)/2 = 4/9 = 24/54;  mean_b = (8/9 + 1/2 + 0)/3 = 25/54
    # BMA = ½·(24/54 + 25/54) = 49/108 ≈ 0.4537
    assert best_match_average(A, B, all_trees()) == pytest.approx(49 / 108)


def test_bma_major_weighted_by_hand() -> None:
    # major_a = {BN}, major_b = {N}, weight 2:
    # mean_a = (2·8/9 + 1·0)/(2+1) = 16/27 = 64/108
    # mean_b = (1·8/9 + 2·1/2 + 1·0)/(1+2+1) = (17/9)/4 = 17/36 = 51/108
    # BMA = ½·(64/108 + 51/108) = 115/216 ≈ 0.5324
    got = best_match_average(A, B, all_trees(), major_a={BN}, major_b={N})
    assert got == pytest.approx(115 / 216)
    # weight 1 is the unweighted figure again
    assert best_match_average(
        A, B, all_trees(), major_a={BN}, major_b={N}, major_weight=1.0
    ) == pytest.approx(49 / 108)


def test_bma_symmetric_identity_duplicates_and_empty() -> None:
    trees = all_trees()
    assert best_match_average(B, A, trees) == pytest.approx(49 / 108)
    assert best_match_average(B, A, trees, major_a={N}, major_b={BN}) == pytest.approx(115 / 216)
    assert best_match_average(A, A, trees) == 1.0
    assert best_match_average([*A, BN], B, trees) == pytest.approx(49 / 108)  # BN counts once
    assert best_match_average([], B, trees) == 0.0
    assert best_match_average(A, set(), trees) == 0.0


def test_hierarchy_score_by_hand() -> None:
    trees = all_trees()
    # BMA(question={N}, source={BN, T}): row N: max(1/2, 0) = 1/2 -> mean_a = 1/2;
    # cols BN 1/2, T 0 -> mean_b = 1/4; BMA = ½·(1/2 + 1/4) = 3/8
    # score = 0.5·49/108 + 0.5·3/8 = 49/216 + 81/432 = 179/432 ≈ 0.4144
    assert hierarchy_score(A, B, [N], trees) == pytest.approx(179 / 432)
    assert hierarchy_score(A, B, [N], trees, alpha=1.0) == pytest.approx(49 / 108)
    assert hierarchy_score(A, B, [N], trees, alpha=0.0) == pytest.approx(3 / 8)
    # no MeSH term matched in the question: the contexts term alone, not a zero
    assert hierarchy_score(A, B, [], trees) == pytest.approx(49 / 108)
    assert hierarchy_score(A, [], [N], trees) == pytest.approx(0.5 * 3 / 8)
    with pytest.raises(ValueError):
        hierarchy_score(A, B, [N], trees, alpha=1.5)


def _plain_bma(a: list[str], b: list[str], trees: dict[str, list[str]],
               major_a: set[str], major_b: set[str], weight: float = 2.0) -> float:
    """The definition as written, a double loop over descriptor_similarity."""
    if not a or not b:
        return 0.0
    sim = [[descriptor_similarity(trees.get(x, []), trees.get(y, [])) if x != y else 1.0
            for y in b] for x in a]
    wa = [weight if x in major_a else 1.0 for x in a]
    wb = [weight if y in major_b else 1.0 for y in b]
    mean_a = sum(w * max(row) for w, row in zip(wa, sim, strict=True)) / sum(wa)
    mean_b = sum(w * max(sim[i][j] for i in range(len(a)))
                 for j, w in enumerate(wb)) / sum(wb)
    return 0.5 * (mean_a + mean_b)


def test_index_matrix_equals_the_plain_definition_on_real_sample() -> None:
    trees = all_trees()
    rng = random.Random(7)
    names = rng.sample(sorted(trees), 150)
    index = TreeIndex(trees)
    matrix = index.similarity_matrix(names[:60], names[60:])
    assert matrix.shape == (60, 90)
    seen_positive = 0
    for i, a in enumerate(names[:60]):
        for j, b in enumerate(names[60:]):
            s = float(matrix[i, j])
            # identical, not approximately equal: the same integers and the same division
            assert s == descriptor_similarity(trees[a], trees[b])
            assert s == index.similarity(b, a)
            seen_positive += 0.0 < s < 1.0
    assert seen_positive > 0  # the sample exercises more than the cross-category zero


def _neighbourhood(
    branch: str,
) -> tuple[dict[str, list[str]], list[str], TreeIndex, list[str]]:
    """(trees, every descriptor, their index, the descriptors under ``branch``): one MeSH
    neighbourhood, so that sampled sets share branches (not only zeros)."""
    trees = all_trees()
    names = sorted(trees)
    return trees, names, TreeIndex(trees), [
        n for n in names if any(t.startswith(branch) for t in trees[n])]


def test_bma_index_and_table_equal_the_plain_definition_bit_for_bit() -> None:
    rng = random.Random(11)
    trees, names, index, c04 = _neighbourhood("C04.557")
    for _ in range(200):
        a = rng.sample(c04, rng.randint(1, 4)) + rng.sample(names, rng.randint(0, 2))
        b = rng.sample(c04, rng.randint(1, 12)) + rng.sample(names, rng.randint(0, 3))
        major_a, major_b = set(a[:1]), set(b[:2])
        want = _plain_bma(list(dict.fromkeys(a)), list(dict.fromkeys(b)), trees,
                          major_a, major_b)
        assert index.best_match_average(a, b, major_a, major_b) == want
        table = index.table([*a, "D999999"], [*b, *a])
        assert table.best_match_average(a, b, major_a, major_b) == want
        assert table.best_match_average(b, a, major_b, major_a) == want  # transposed
        assert table.best_match_average(a, ["D999999"]) == 0.0  # no tree position
        # sets the table does not hold (b is not among its rows): computed from the index
        assert table.best_match_average(b, b, major_b, major_b) == 1.0
    assert TreeIndex({}).table(["X"], ["X"]).best_match_average(["X"], ["X"]) == 1.0


def test_many_bmas_in_one_gather_equal_one_bma_each_bit_for_bit() -> None:
    """``best_match_averages`` (a question against its ten contexts at once) gives the
    very values of one ``best_match_average`` per context and of the plain definition."""
    rng = random.Random(13)
    trees, names, index, c04 = _neighbourhood("C04.588")
    for _ in range(100):
        a = rng.sample(c04, rng.randint(1, 4)) + rng.sample(names, rng.randint(0, 1))
        sets = [rng.sample(c04, rng.randint(0, 8)) + rng.sample(names, rng.randint(0, 2))
                for _ in range(rng.randint(1, 10))]
        majors = [set(b[:2]) for b in sets]
        table = index.table([*a, "D999999"], [u for b in sets for u in b])
        got = table.best_match_averages(a, sets, majors)
        assert got == [table.best_match_average(a, b, frozenset(), m)
                       for b, m in zip(sets, majors, strict=True)]
        assert got == [_plain_bma(list(dict.fromkeys(a)), list(dict.fromkeys(b)), trees,
                                  set(), m) if b else 0.0
                       for b, m in zip(sets, majors, strict=True)]
        # sets outside the table: each computed from the index, same values
        outside = [[*b, "Humans"] for b in sets]
        assert table.best_match_averages(a, outside, majors) == [
            index.best_match_average(a, b, frozenset(), m)
            for b, m in zip(outside, majors, strict=True)]
    assert index.table(["X"], ["Y"]).best_match_averages([], [["Y"]], [set()]) == [0.0]
