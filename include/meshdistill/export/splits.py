"""Train/validation/test assignment by a stable hash of the source PMID.

An article's split is a pure function of its PMID, the seed and the ratios: the
splitmix64 finaliser of ``pmid XOR seed`` read as a number in [0, 1) and compared with
the cumulative ratios. So no source article is ever in two splits, every item and
preference pair about it lands in the same one, and an article keeps its split when
later exports add items. Every subtree gets each split in expectation by its ratio
(the hash ignores the subtree); the manifest reports the counts per subtree and split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The splitmix64 output function (Steele et al.), a bijective 64-bit mixer."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK


def split_index(pmids: npt.ArrayLike, seed: int,
                ratios: Sequence[float]) -> npt.NDArray[np.int8]:
    """For each PMID, the index of its split in ``ratios`` (0 = train)."""
    keys = np.asarray(pmids, dtype=np.int64).astype(np.uint64) ^ np.uint64(seed)
    unit = (splitmix64(keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    bounds = np.cumsum(np.asarray(ratios, dtype=np.float64))[:-1]
    return np.searchsorted(bounds, unit, side="right").astype(np.int8)
