"""Exact and near-duplicate questions, found in bounded memory for millions of items.

Exact duplicates share :func:`~meshdistill.export.text.normalize_text` (the key is the
hash of all of a question's words). Near-duplicates are found with MinHash LSH: word
5-gram shingles, 128 permutations, datasketch's permutations (``MinHash(num_perm,
seed).permutations``, its ``affine32`` scheme) and its band layout for the threshold
(``MinHashLSH(threshold, num_perm).b`` and ``.r``). Shingles are hashed from word hashes
(:class:`~meshdistill.export.text.Runs`) instead of SHA-1 per shingle string, and the
minima are taken permutation-major over a block of questions at once: the same
estimator as datasketch's (a test checks the estimates agree with its ``MinHash``),
computed in numpy at a fraction of the cost. Only the band keys stay in memory (36 bytes
an item at the default threshold); signatures go to a temporary file (256 bytes an item)
and are read back for the rows of candidate pairs alone, whose estimated Jaccard
similarity must reach the threshold (LSH candidates are only likely duplicates).
Clusters are the connected components of the verified pairs; the best-ranked item of
each is kept.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
from datasketch import MinHash, MinHashLSH
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from meshdistill.export.text import Tokens

NUM_PERM = 128
SHINGLE_WORDS = 5
BLOCK_SHINGLES = 1 << 15
"""Shingles permuted at once: 128 x 32,768 x 4 bytes = 16 MB of scratch."""
_U32 = np.uint32


class MinHasher:
    """MinHash signatures of word 5-gram shingles with datasketch's permutations."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 1) -> None:
        a, b = MinHash(num_perm=num_perm, seed=seed).permutations
        self.num_perm = num_perm
        self._a = np.asarray(a, dtype=_U32)[:, None]
        self._b = np.asarray(b, dtype=_U32)[:, None]

    def signatures(self, tokens: Tokens) -> npt.NDArray[np.uint32]:
        """One row of ``num_perm`` minima per text (all 0xFFFFFFFF without words)."""
        hashes, offsets = tokens.runs().shingles(SHINGLE_WORDS)
        folded = (hashes ^ (hashes >> np.uint64(32))).astype(_U32)
        out = np.full((self.num_perm, len(tokens)), np.iinfo(_U32).max, dtype=_U32)
        have = np.flatnonzero(np.diff(offsets) > 0)
        row = 0
        while row < len(have):
            # the rows whose shingles fit one block (at least one row per block)
            end = max(int(np.searchsorted(offsets[have + 1], offsets[have[row]] + BLOCK_SHINGLES,
                                          side="right")), row + 1)
            rows = have[row:end]
            lo, hi = offsets[rows[0]], offsets[rows[-1] + 1]
            with np.errstate(over="ignore"):
                permuted = self._a * folded[lo:hi]
                permuted += self._b
            out[:, rows] = np.minimum.reduceat(permuted, offsets[rows] - lo, axis=1)
            row = end
        return np.ascontiguousarray(out.T)


def band_layout(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """datasketch's (bands, rows per band) for ``threshold``, weighing false positives
    and false negatives equally."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(sigs: npt.NDArray[np.uint32], bands: int, rows: int) -> npt.NDArray[np.uint32]:
    """A 32-bit key per band and signature, band-major: equal rows give equal keys. (A
    chance collision only adds a candidate, which the Jaccard check then rejects.)"""
    out = np.zeros((bands, sigs.shape[0]), dtype=np.uint32)
    with np.errstate(over="ignore"):
        for i in range(bands):
            key = np.full(sigs.shape[0], np.uint64(i + 1) * np.uint64(0x9E3779B97F4A7C15))
            for j in range(i * rows, (i + 1) * rows):
                key = (key ^ sigs[:, j].astype(np.uint64)) * np.uint64(0x100000001B3)
                key ^= key >> np.uint64(29)
            out[i] = (key ^ (key >> np.uint64(32))).astype(np.uint32)
    return out


STORED_BITS = np.uint16
"""Signatures are kept on disk as the low 16 bits of each minimum: two different minima
agree there by chance once in 65,536, which raises an estimated Jaccard similarity by at
most 1.5e-5, at half the bytes (256 a question) to store and read back."""
READ_ROWS = 1 << 16
"""Stored signatures read back per chunk (16 MB), keeping only the rows candidates need."""


VERIFY_EDGES = 1 << 15
"""Candidate pairs verified at once: their signatures (at most twice this many rows,
256 bytes each) are read from the stored file per chunk, so the verification's memory
does not grow with the number of candidates."""


class NearDuplicates:
    """Collects questions batch by batch, then says which ones a better one duplicates."""

    def __init__(self, threshold: float, *, num_perm: int = NUM_PERM,
                 workdir: str | Path | None = None) -> None:
        self.threshold = threshold
        self.bands, self.rows = band_layout(threshold, num_perm)
        self._hasher = MinHasher(num_perm)
        self._tmp = tempfile.TemporaryDirectory(prefix="meshdistill-minhash-", dir=workdir)
        self._path = Path(self._tmp.name) / "signatures.u16"
        self._file = self._path.open("wb")
        self._keys: list[list[npt.NDArray[np.uint32]]] = [[] for _ in range(self.bands)]
        self._has_words: list[npt.NDArray[np.bool_]] = []
        self.count = 0

    def add(self, tokens: Tokens) -> None:
        sigs = self._hasher.signatures(tokens)
        sigs.astype(STORED_BITS).tofile(self._file)
        for band, keys in zip(self._keys, band_keys(sigs, self.bands, self.rows), strict=True):
            band.append(keys)
        self._has_words.append(sigs[:, 0] != np.iinfo(_U32).max)
        self.count += len(tokens)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.cleanup()

    def _candidates(self, rank: npt.NDArray[np.int64],
                    live: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        """Distinct (best of group, other) pairs of live rows sharing a band key; each
        band's keys are joined and released in turn."""
        idx = np.flatnonzero(live)
        pairs = []
        for band in self._keys:
            k = np.concatenate(band)[idx]
            band.clear()
            order = np.lexsort((rank[idx], k))
            sk = k[order]
            first = np.concatenate(([True], sk[1:] != sk[:-1]))
            group_start = np.maximum.accumulate(np.where(first, np.arange(len(sk)), 0))
            dup = ~first
            # the group's best-ranked item, then the other
            pairs.append(np.stack([idx[order[group_start[dup]]], idx[order[dup]]], axis=1))
        return np.unique(np.concatenate(pairs), axis=0)

    def _stored(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.uint16]:
        """The stored signatures of ``rows`` (sorted, distinct), read chunk by chunk
        (a memory map would keep every page it touches resident)."""
        width = self._hasher.num_perm
        out = np.empty((len(rows), width), dtype=STORED_BITS)
        with self._path.open("rb") as f:
            for start in range(0, self.count, READ_ROWS):
                lo, hi = np.searchsorted(rows, [start, start + READ_ROWS])
                if lo == hi:
                    continue
                f.seek(start * width * 2)
                chunk = np.fromfile(f, dtype=STORED_BITS,
                                    count=min(READ_ROWS, self.count - start) * width)
                out[lo:hi] = chunk.reshape(-1, width)[rows[lo:hi] - start]
        return out

    def duplicates(self, rank: npt.NDArray[np.int64],
                   active: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.bool_], int]:
        """Items (among ``active``) a better-ranked near-duplicate replaces, and the number
        of verified pairs. ``rank``: lower is better, unique per item. Call once."""
        self._file.flush()
        n = self.count
        if n == 0:
            return np.zeros(0, dtype=np.bool_), 0
        edges = self._candidates(rank, active & np.concatenate(self._has_words))
        if not len(edges):
            return np.zeros(n, dtype=np.bool_), 0
        similar = np.empty(len(edges), dtype=np.bool_)
        for s in range(0, len(edges), VERIFY_EDGES):
            chunk = edges[s:s + VERIFY_EDGES]
            rows = np.unique(chunk)
            sigs = self._stored(rows)
            at = np.searchsorted(rows, chunk)
            similar[s:s + VERIFY_EDGES] = ((sigs[at[:, 0]] == sigs[at[:, 1]]).mean(axis=1)
                                           >= self.threshold)
            del sigs
        edges = edges[similar]
        if not len(edges):
            return np.zeros(n, dtype=np.bool_), 0
        graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                           shape=(n, n))
        _, component = connected_components(graph, directed=False)
        members = np.unique(edges)
        comp = component[members]
        order = np.lexsort((rank[members], comp))
        first = np.concatenate(([True], comp[order][1:] != comp[order][:-1]))
        dropped = np.zeros(n, dtype=np.bool_)
        dropped[members[order[~first]]] = True
        return dropped, len(edges)


def exact_duplicates(keys: npt.NDArray[np.uint64], rank: npt.NDArray[np.int64],
                     active: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Items (among ``active``) whose key a better-ranked active item also has."""
    idx = np.flatnonzero(active)
    order = np.lexsort((rank[idx], keys[idx]))
    sk = keys[idx][order]
    first = np.concatenate(([True], sk[1:] != sk[:-1])) if len(sk) else np.zeros(0, bool)
    dropped = np.zeros(len(keys), dtype=np.bool_)
    dropped[idx[order[~first]]] = True
    return dropped
