"""Pure operations on MeSH tree numbers (no database)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

# A category letter alone ('C'), or a tree number ('C04', 'C04.557.337').
PREFIX_RE = re.compile(r"^[A-Z](\d{2}(\.\d{3})*)?$")

SubtreePrefix = Annotated[str, StringConstraints(pattern=PREFIX_RE.pattern)]
"""A MeSH tree-number prefix: ``C04`` (Neoplasms), ``C14.280`` (Heart Diseases), ``C``."""

SUBTREES_HELP = ("MeSH tree numbers, one per line, one task each: C04 (Neoplasms), C14.280 "
                 "(Heart Diseases), C10 (Nervous System Diseases), F03 (Mental Disorders), "
                 "or a category letter such as C")
"""How every form asks for subtrees (free text: the form would make ``examples`` a
closed list)."""


def is_valid_prefix(prefix: str) -> bool:
    return bool(PREFIX_RE.match(prefix))


def depth(tree_number: str) -> int:
    """Dot-separated parts; a category letter alone has depth 0."""
    return tree_number.count(".") + 1 if len(tree_number) > 1 else 0


def parent(tree_number: str) -> str | None:
    head, sep, _ = tree_number.rpartition(".")
    return head if sep else None


def ancestors(tree_number: str) -> list[str]:
    """From the top-level node down to (not including) ``tree_number``."""
    parts = tree_number.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def in_subtree(tree_number: str, prefix: str) -> bool:
    if len(prefix) == 1:
        return tree_number.startswith(prefix)
    return tree_number == prefix or tree_number.startswith(prefix + ".")


def like_pattern(prefix: str) -> str:
    """A SQL LIKE pattern for the subtree's descendants (the root is matched separately)."""
    return prefix + "%" if len(prefix) == 1 else prefix + ".%"
