"""Shard files of one format and split: fixed-size, named as Hugging Face expects.

A :class:`ShardWriter` takes Arrow tables in order and writes them into
``<format>/<split>-00000-of-00003.<ext>`` files of ``shard_rows`` rows each (the total is
known from the plan, so each name can say how many shards there are). Parquet is written
with zstd compression from the format's schema; JSON lines with orjson, gzip at level 6
with a zero timestamp and no file name in the header, so the same rows give the same
bytes. Every file goes through fsspec, so the directory may be local or on object storage.
A :class:`ShardSet` holds the writers of one export and writes on a background thread
(Parquet encoding and compression release the GIL), so the next batch is formatted while
the last one is compressed.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from meshdistill.export.memory import release_freed
from meshdistill.export.schemas import SCHEMAS
from meshdistill.export.settings import SPLITS

EXTENSIONS = {"parquet": "parquet", "jsonl": "jsonl", "jsonl.gz": "jsonl.gz"}


@dataclass(frozen=True)
class ShardInfo:
    """One written shard, relative to the export directory."""

    path: str
    format: str
    split: str
    file_format: str
    rows: int
    bytes: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "split": self.split,
                "file_format": self.file_format, "rows": self.rows, "bytes": self.bytes,
                "sha256": self.sha256}


def shard_names(fmt: str, split: str, file_format: str, total: int, shard_rows: int) -> list[str]:
    """The relative paths of a format's split: ``ceil(total / shard_rows)`` files."""
    n = max(math.ceil(total / shard_rows), 1) if total else 0
    ext = EXTENSIONS[file_format]
    return [f"{fmt}/{split}-{i:05d}-of-{n:05d}.{ext}" for i in range(n)]


class ShardWriter:
    """Writes one (format, split, file format)'s rows into its shards, in order."""

    def __init__(self, fs: Any, root: str, fmt: str, split: str, file_format: str,
                 schema: pa.Schema, total: int, shard_rows: int) -> None:
        self.fs, self.root = fs, root.rstrip("/")
        self.fmt, self.split, self.file_format = fmt, split, file_format
        self.schema, self.shard_rows, self.total = schema, shard_rows, total
        self.names = shard_names(fmt, split, file_format, total, shard_rows)
        self._index = -1
        self._rows_in_shard = 0
        self._written = 0
        self._raw: BinaryIO | None = None
        self._parquet: pq.ParquetWriter | None = None
        self._jsonl: Any = None
        self.shards: list[ShardInfo] = []

    def write(self, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._raw is None or self._rows_in_shard >= self.shard_rows:
                self._next()
            take = min(self.shard_rows - self._rows_in_shard, table.num_rows - offset)
            self._write(table.slice(offset, take))
            self._rows_in_shard += take
            self._written += take
            offset += take

    def _write(self, table: pa.Table) -> None:
        if self._parquet is not None:
            self._parquet.write_table(table)
            return
        dumps = orjson.dumps
        self._jsonl.write(b"".join(dumps(row, option=orjson.OPT_APPEND_NEWLINE)
                                   for row in table.to_pylist()))

    def _next(self) -> None:
        self._finish()
        self._index += 1
        if self._index >= len(self.names):
            raise RuntimeError(f"{self.fmt}/{self.split}: more rows than the plan's {self.total}")
        path = f"{self.root}/{self.names[self._index]}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._raw = self.fs.open(path, "wb")
        if self.file_format == "parquet":
            self._parquet = pq.ParquetWriter(self._raw, self.schema, compression="zstd",
                                             store_schema=True)
        elif self.file_format == "jsonl.gz":
            self._jsonl = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw,
                                        compresslevel=6, mtime=0)
        else:
            self._jsonl = self._raw

    def _finish(self) -> None:
        if self._raw is None:
            return
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        elif self._jsonl is not self._raw:
            self._jsonl.close()
        self._jsonl = None
        self._raw.close()
        self._raw = None
        path = self.names[self._index]
        size, digest = file_digest(self.fs, f"{self.root}/{path}")
        self.shards.append(ShardInfo(path, self.fmt, self.split, self.file_format,
                                     self._rows_in_shard, size, digest))
        self._rows_in_shard = 0

    def close(self) -> list[ShardInfo]:
        """Finish the last shard; the rows written must be the plan's total."""
        self._finish()
        if self._written != self.total:
            raise RuntimeError(f"{self.fmt}/{self.split}: wrote {self._written} rows, the "
                               f"plan has {self.total}")
        return self.shards

    def abort(self) -> None:
        """Close open files without checks (the export is being abandoned)."""
        for handle in (self._parquet, self._jsonl, self._raw):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # already failing: the directory is removed next
                pass
        self._raw = self._parquet = self._jsonl = None


def file_digest(fs: Any, path: str) -> tuple[int, str]:
    """Size and sha256 of a written file, read back through ``fs``."""
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


PENDING_WRITES = 2
"""Tables queued for the writer thread at most (each a batch of one format)."""


class ShardSet:
    """Every :class:`ShardWriter` of one export, by (format, split), fed in order by one
    background thread; use as a context manager (an error aborts every writer)."""

    def __init__(self, fs: Any, root: str, formats: Sequence[str], file_formats: Sequence[str],
                 totals: dict[str, int], shard_rows: int) -> None:
        self.by_key: dict[tuple[str, str], list[ShardWriter]] = {
            (fmt, split): [ShardWriter(fs, root, fmt, split, ff, SCHEMAS[fmt], totals[split],
                                       shard_rows) for ff in file_formats]
            for fmt in formats for split in SPLITS}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshdistill-shards")
        self._pending: deque[Future[None]] = deque()

    def write(self, fmt: str, split_of_rows: np.ndarray, table: pa.Table) -> None:
        """Queue ``table``'s rows for their splits (``split_of_rows``: index per row, in
        split order, as ``run._kept_batches`` yields them: each split's rows are a slice)."""
        if (np.diff(split_of_rows) < 0).any():
            raise ValueError(f"{fmt}: rows are not grouped by split")
        bounds = np.searchsorted(split_of_rows, np.arange(len(SPLITS) + 1))
        parts = []
        for i, split in enumerate(SPLITS):
            part = table.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
            if part.num_rows:
                parts += [(w, part) for w in self.by_key[(fmt, split)]]
        self._pending.append(self._pool.submit(self._write, parts))
        while len(self._pending) > PENDING_WRITES:
            self._pending.popleft().result()

    @staticmethod
    def _write(parts: list[tuple[ShardWriter, pa.Table]]) -> None:
        for writer, part in parts:
            writer.write(part)
        release_freed()  # Arrow's allocator keeps a heap per thread: this one's too

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> list[ShardInfo]:
        self._drain()
        self._pool.shutdown()
        return [info for ws in self.by_key.values() for w in ws for info in w.close()]

    def abort(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True)
        for ws in self.by_key.values():
            for w in ws:
                w.abort()

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            self.abort()
