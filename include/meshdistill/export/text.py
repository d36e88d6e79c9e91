"""Text normalisation and word n-grams shared by de-duplication and decontamination.

Two questions are the same text when their normalised forms are equal: Unicode NFKC,
lower case, every run of punctuation and whitespace one space. N-grams are hashed to
64-bit integers with BLAKE2b so that sets of them are small and stable across processes
(Python's ``hash`` of a string changes with each interpreter).
"""

from __future__ import annotations

import re
import unicodedata
from hashlib import blake2b

_SEPARATORS = re.compile(r"[\W_]+")


def normalize_text(text: str) -> str:
    """NFKC, lower case, punctuation and whitespace collapsed to single spaces."""
    return _SEPARATORS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


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


def text_hash(text: str) -> int:
    """A stable unsigned 64-bit hash of ``text``."""
    return int.from_bytes(blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def ngram_hashes(text: str, n: int) -> set[int]:
    """The stable hashes of the word ``n``-grams of ``text`` after normalisation."""
    return {text_hash(g) for g in word_ngrams(words(text), n)}
