"""Handing freed memory back to the system between batches.

An export allocates and frees tens of megabytes per batch from three threads (reader,
formatter, shard writer). Arrow's pool (mimalloc) and glibc's per-thread arenas keep
what was freed for reuse, so the resident size of a long export climbs well above what
is live. Releasing after each batch hands that back; on 200,000 items it made the write
pass about 10% slower (bench/README.md has the export's memory figures).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any

import pyarrow as pa


@cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_freed() -> None:
    """Return memory freed by Arrow's pool and by glibc's malloc to the system."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
