"""Handing freed memory back to the system between batches.

An export allocates and frees tens of megabytes per batch from three threads (reader,
formatter, shard writer). Arrow's pool (mimalloc) and glibc's per-thread arenas keep
what was freed for reuse, so the resident size of a long export climbs towards the sum
of the threads' largest batches instead of staying near what is live: measured on a
million items, 650 MB resident against 380 MB live. Releasing after each batch keeps it
near the live size at a cost of about 1% of the run.
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
