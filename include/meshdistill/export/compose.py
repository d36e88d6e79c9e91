"""Columns of texts made of pieces, built for a whole batch with one gather.

A formatted message is a run of pieces: template literals, a row's question or answer,
the context blocks of its articles and the separators between them. Every distinct piece
of a batch goes once into a :class:`Pool` (a block is made once per article, not once
per item that cites it); a message is a run of pool indexes, and a column of messages is
one ``take`` of the pool in message order. The bytes ``take`` returns are already the
messages back to back, so the column is those bytes with every run's first offset: each
message's text is copied once, however many pieces it has (joining the pieces with
Arrow's element-wise kernels copies it once per nesting level).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

Ids = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Joined:
    """Per row, the pool pieces ``ids[offsets[i]:offsets[i + 1]]`` with piece ``sep``
    between them, or piece ``empty`` for a row that has none."""

    ids: Ids
    offsets: Ids
    sep: int
    empty: int


Segment = int | Ids | Joined
"""A piece of every row: one pool index for all rows (a literal), one per row (a
column), or a :class:`Joined` run."""


class Pool:
    """The pieces of one batch's texts. Values are added as whole columns (null becomes
    ``""``) and literals once each; :meth:`texts` gathers them."""

    def __init__(self) -> None:
        self._parts: list[pa.Array] = []
        self._size = 0
        self._literals: dict[str, int] = {}
        self._array: pa.Array | None = None

    def add(self, values: pa.Array) -> Ids:
        """The pool index of each of ``values``."""
        values = pc.fill_null(values.cast(pa.string()), "")
        ids = np.arange(self._size, self._size + len(values), dtype=np.int64)
        self._parts.append(values)
        self._size += len(values)
        self._array = None
        return ids

    def literal(self, text: str) -> int:
        """The pool index of ``text`` (added on first use)."""
        if text not in self._literals:
            self._literals[text] = int(self.add(pa.array([text], pa.string()))[0])
        return self._literals[text]

    def _pooled(self) -> pa.Array:
        if self._array is None:
            self._array = (pa.concat_arrays(self._parts) if self._parts
                           else pa.array([], pa.string()))
        return self._array

    def texts(self, n: int, messages: Sequence[Sequence[Segment]]) -> pa.StringArray:
        """``n * len(messages)`` strings, row by row: row ``i``'s message ``m`` is the
        concatenation of ``messages[m]``'s segments (at least one) for row ``i``."""
        segments = [s for segs in messages for s in segs]
        lengths = np.ones((len(segments), n), dtype=np.int64)
        for k, seg in enumerate(segments):
            if isinstance(seg, Joined):
                count = np.diff(seg.offsets)
                lengths[k] = np.where(count > 0, 2 * count - 1, 1)
        within: Ids = np.zeros_like(lengths)
        np.cumsum(lengths[:-1], axis=0, out=within[1:])
        per_row = lengths.sum(axis=0)
        row_start: Ids = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(per_row, out=row_start[1:])
        refs = np.empty(int(row_start[-1]), dtype=np.int64)
        for k, seg in enumerate(segments):
            at = row_start[:-1] + within[k]
            if isinstance(seg, Joined):
                _fill_joined(refs, at, seg)
            else:
                refs[at] = seg
        first_segment = np.cumsum([0, *map(len, messages[:-1])])  # of each message
        bounds = np.empty(n * len(messages) + 1, dtype=np.int64)
        for m, k in enumerate(first_segment.tolist()):
            bounds[m:-1:len(messages)] = row_start[:-1] + within[k]
        bounds[-1] = len(refs)
        taken = self._pooled().take(pa.array(refs))
        offsets = np.frombuffer(taken.buffers()[1], dtype=np.int32)[
            taken.offset:taken.offset + len(taken) + 1]
        data = taken.buffers()[2] or pa.py_buffer(b"")
        return pa.Array.from_buffers(pa.string(), len(bounds) - 1,
                                     [None, pa.py_buffer(offsets[bounds]), data])


def _fill_joined(refs: Ids, at: Ids, seg: Joined) -> None:
    count = np.diff(seg.offsets)
    refs[at[count == 0]] = seg.empty
    owner = np.repeat(np.arange(len(count)), count)
    j = np.arange(int(count.sum())) - np.repeat(seg.offsets[:-1] - seg.offsets[0], count)
    pos = at[owner] + 2 * j
    refs[pos] = seg.ids[seg.offsets[0]:seg.offsets[-1]]
    inner = j < count[owner] - 1
    refs[pos[inner] + 1] = seg.sep
