"""Open data files plain or gzip-compressed, told apart by content.

A file is gzip when its first two bytes are the gzip magic ``1f 8b``, whatever its name:
names are only a hint (mirrors rename files, and a ``.gz`` fetched from a server that sets
``Content-Encoding: gzip`` arrives decompressed under its ``.gz`` name). Every reader of
MeSH, PubMedQA and fixture files opens its input here; the PubMed XML parser asks
:func:`is_gzip` and inflates on a thread of its own (``pubmed/gunzip.py``) for speed.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import IO, cast

from meshdistill.errors import MeshDistillError

GZIP_MAGIC = b"\x1f\x8b"

# What reading a damaged gzip raises: EOFError for a cut-off stream, zlib.error for bad
# deflate data, gzip.BadGzipFile (an OSError) for a bad header.
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)
# Everything reading a file through this module may raise besides a decoding error:
# readers that report their own error type catch this.
READ_ERRORS = (OSError, EOFError, zlib.error)


class DataFileError(MeshDistillError):
    """A data file that cannot be read whole: missing, unreadable, or a damaged gzip."""


def is_gzip(path: str | Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes (an empty file is not gzip)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def open_bytes(path: str | Path) -> IO[bytes]:
    """A binary file object over the content of ``path``, decompressed if it is gzip.

    Missing files raise ``OSError`` here; a damaged gzip raises one of ``GZIP_ERRORS``
    while it is read.
    """
    if is_gzip(path):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def open_text(
    path: str | Path, encoding: str = "utf-8", errors: str = "strict", newline: str | None = None
) -> IO[str]:
    """A text file object over the content of ``path``, decompressed if it is gzip.

    ``encoding="utf-8-sig"`` drops a leading byte-order mark; other arguments are those
    of :func:`open`.
    """
    raw = open_bytes(path)
    try:
        return io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline=newline)
    except BaseException:
        raw.close()
        raise


def read_bytes(path: str | Path) -> bytes:
    """The whole content of ``path``, decompressed if it is gzip.

    Raises :class:`DataFileError` for a missing or unreadable file and for a truncated or
    corrupt gzip, naming the file.
    """
    try:
        with open_bytes(path) as fh:
            return fh.read()
    except GZIP_ERRORS as exc:
        raise DataFileError(f"{path}: truncated or corrupt gzip ({exc})") from exc
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The whole content of ``path`` as text; :class:`DataFileError` as for
    :func:`read_bytes`, and for content that is not valid in ``encoding``."""
    data = read_bytes(path)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not {encoding} text ({exc})") from exc
