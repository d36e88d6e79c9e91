"""Text normalisation, words and word-run hashes shared by de-duplication and
decontamination, computed for a whole batch of texts at once.

Two questions are the same text when their normalised forms are equal: Unicode NFKC,
lower case, every run of characters that are neither letters nor digits one space.
The normalisation runs as Arrow compute kernels over a whole column (one pass per step
in C++, instead of a regular expression per question in Python); :func:`normalize_text`
is the same kernels on one string, so there is one definition.

A normalised text is a sequence of words; each word gets a stable 64-bit hash (BLAKE2b,
the same in every process, unlike Python's ``hash``), and any run of consecutive words a
polynomial hash of its word hashes. Prefix sums make every run's hash two lookups and a
multiplication, so the shingles of MinHash, the 13-grams of decontamination and the key
of exact duplicates are all numpy operations over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from meshdistill.export.splits import splitmix64

_SEPARATORS = r"[^\pL\pN]+"
"""RE2's spelling of Python's ``[\\W_]+``: neither a letter nor a number."""
_U64 = np.uint64
_BASE = 0x9E3779B97F4A7C15
_BASE_INV = pow(_BASE, -1, 1 << 64)
_LENGTH_MIX = _U64(0xD6E8FEB86659FD93)

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]


def normalize(texts: pa.Array | list[str | None]) -> pa.StringArray:
    """NFKC, lower case, separators collapsed to single spaces, trimmed; null is ``""``."""
    arr = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
    arr = pc.utf8_normalize(pc.fill_null(arr, ""), form="NFKC")
    arr = pc.replace_substring_regex(pc.utf8_lower(arr), pattern=_SEPARATORS, replacement=" ")
    return pc.utf8_trim(arr, characters=" ")


def normalize_text(text: str) -> str:
    """:func:`normalize` of one string."""
    return str(normalize([text])[0].as_py())


def words(text: str) -> list[str]:
    """The words of ``normalize_text(text)``."""
    return normalize_text(text).split()


def word_ngrams(tokens: list[str], n: int) -> list[str]:
    """The word ``n``-grams of ``tokens`` joined by spaces; a text shorter than ``n``
    words is its own single n-gram (so short questions still compare)."""
    if not tokens:
        return []
    if len(tokens) <= n:
        return [" ".join(tokens)]
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def word_hash(word: str) -> int:
    """The stable unsigned 64-bit hash of one word."""
    return int.from_bytes(blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Tokens:
    """The words of a batch of normalised texts: ``hashes`` holds every word's hash, row
    ``i``'s words are ``hashes[offsets[i]:offsets[i + 1]]``."""

    hashes: U64Array
    offsets: I64Array

    @classmethod
    def of(cls, texts: pa.Array | list[str | None]) -> Tokens:
        """Normalise ``texts`` and hash their words (each distinct word hashed once)."""
        normal = normalize(texts)
        lists = pc.split_pattern(normal, " ")
        flat = lists.flatten()
        lengths = np.where(pc.equal(normal, "").to_numpy(zero_copy_only=False), 0,
                           pc.list_value_length(lists).to_numpy(zero_copy_only=False))
        flat = flat.filter(pc.not_equal(flat, ""))
        encoded = pc.dictionary_encode(flat).combine_chunks() if isinstance(
            flat, pa.ChunkedArray) else pc.dictionary_encode(flat)
        vocabulary = np.fromiter((word_hash(w) for w in encoded.dictionary.to_pylist()),
                                 dtype=_U64, count=len(encoded.dictionary))
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(normal) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(vocabulary[codes] if len(codes) else np.zeros(0, _U64), offsets)

    @property
    def lengths(self) -> I64Array:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def runs(self) -> Runs:
        return Runs(self)


class Runs:
    """Hashes of word runs of one :class:`Tokens`: ``hash(start, length)`` is
    ``sum(w[start + d] * B**(length - 1 - d))`` mod 2**64, from prefix sums."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens
        n = len(tokens.hashes)
        with np.errstate(over="ignore"):
            inverse = np.full(n, _BASE_INV, dtype=_U64)
            inverse[:1] = 1
            self._prefix = np.zeros(n + 1, dtype=_U64)
            np.cumsum(tokens.hashes * np.cumprod(inverse), out=self._prefix[1:])
            power = np.full(n, _BASE, dtype=_U64)
            power[:1] = 1
            self._power = np.cumprod(power)

    def raw(self, starts: I64Array, lengths: I64Array | int) -> U64Array:
        """The polynomial hash of each run (``lengths`` >= 1, within one row)."""
        ends = starts + lengths
        with np.errstate(over="ignore"):
            return (self._prefix[ends] - self._prefix[starts]) * self._power[ends - 1]

    def mixed(self, starts: I64Array, lengths: I64Array) -> U64Array:
        """:meth:`raw` with the length mixed in and the bits avalanched (for MinHash and
        exact keys, where runs of several lengths meet)."""
        with np.errstate(over="ignore"):
            return splitmix64(self.raw(starts, lengths) ^ (lengths.astype(_U64) * _LENGTH_MIX))

    def windows(self, n: int) -> tuple[I64Array, I64Array]:
        """(start, owning row) of every ``n``-word window of rows of at least ``n`` words."""
        lengths = self.tokens.lengths
        count = np.maximum(lengths - n + 1, 0)
        owner = np.repeat(np.arange(len(lengths)), count)
        first = np.repeat(self.tokens.offsets[:-1] - np.concatenate(([0], np.cumsum(count)[:-1])),
                          count)
        return first + np.arange(int(count.sum())), owner

    def shingles(self, n: int) -> tuple[U64Array, I64Array]:
        """The ``n``-word shingles of every row (a shorter row is one shingle of all its
        words, an empty row has none) as mixed hashes, with per-row offsets."""
        lengths = self.tokens.lengths
        count = np.where(lengths >= n, lengths - n + 1, (lengths > 0).astype(np.int64))
        starts, owner = self.windows(n)
        short = np.flatnonzero((lengths > 0) & (lengths < n))
        all_starts = np.concatenate((starts, self.tokens.offsets[short]))
        all_lengths = np.concatenate((np.full(len(starts), n, np.int64), lengths[short]))
        order = np.argsort(np.concatenate((owner, short)), kind="stable")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(count, out=offsets[1:])
        if not len(order):
            return np.zeros(0, _U64), offsets
        return self.mixed(all_starts[order], all_lengths[order]), offsets

    def whole(self) -> U64Array:
        """One mixed hash per row of all its words: equal exactly when the normalised
        texts are equal (up to 64-bit collisions)."""
        lengths = self.tokens.lengths
        out = np.zeros(len(lengths), dtype=_U64)
        have = np.flatnonzero(lengths > 0)
        if len(have):
            out[have] = self.mixed(self.tokens.offsets[have], lengths[have])
        return out
