"""Tree-number operations, on hand-picked cases and over the whole MeSH 2023 tree.

The SQL ``LIKE`` pattern and ``in_subtree`` must select the same tree numbers, or the
subtree queries in Postgres and the Python-side checks disagree about what 'under C04'
means; the whole-tree properties catch an off-by-one that hand-picked cases would miss.
"""

from __future__ import annotations

import re

import pytest
from meshdistill.mesh.formats import read_mtrees
from meshdistill.mesh.tree import (
    ancestors,
    depth,
    in_subtree,
    is_valid_prefix,
    like_pattern,
    parent,
)

from tests.support import MTREES_2023


@pytest.fixture(scope="module")
def tree_numbers() -> list[str]:
    return [t.tree_number for t in read_mtrees(MTREES_2023)]


def _like(pattern: str, value: str) -> bool:
    """SQL LIKE with only '%' (the patterns have no '_'; '.' is literal in LIKE)."""
    return re.fullmatch(re.escape(pattern).replace("%", ".*"), value) is not None


def test_depth() -> None:
    assert depth("C") == 0
    assert depth("C04") == 1
    assert depth("C04.557") == 2
    assert depth("B01.050.150.900.649.313.988.400.112.400.400") == 11


def test_parent_and_ancestors() -> None:
    assert parent("C04") is None
    assert parent("C04.557.337") == "C04.557"
    assert ancestors("C04") == []
    assert ancestors("C04.557.337.372") == ["C04", "C04.557", "C04.557.337"]


@pytest.mark.parametrize(
    ("tree_number", "prefix", "inside"),
    [
        ("C04", "C04", True),  # the root is in its own subtree
        ("C04.557.337", "C04", True),
        ("C04.557.337", "C", True),
        ("C04.557", "C04.557.337", False),  # an ancestor is not below
        ("C041", "C04", False),  # a longer sibling code, not a child
        ("D04.100", "C", False),
        ("C14.280", "C04", False),
    ],
)
def test_in_subtree(tree_number: str, prefix: str, inside: bool) -> None:
    assert in_subtree(tree_number, prefix) is inside


def test_like_pattern() -> None:
    assert like_pattern("C04") == "C04.%"
    assert like_pattern("C") == "C%"
    assert not _like(like_pattern("C04"), "C041")
    assert _like(like_pattern("C04"), "C04.557")


@pytest.mark.parametrize(
    ("prefix", "valid"),
    [
        ("C", True), ("C04", True), ("C04.557.337", True),
        ("C4", False), ("C04.5", False), ("c04", False), ("", False), ("C04.", False),
        ("Neoplasms", False), ("C04%", False), ("C04' OR '1'='1", False),
    ],
)
def test_is_valid_prefix(prefix: str, valid: bool) -> None:
    assert is_valid_prefix(prefix) is valid


def test_whole_tree_properties(tree_numbers: list[str]) -> None:
    present = set(tree_numbers)
    assert all(is_valid_prefix(t) for t in tree_numbers)
    assert all(depth(t) == len(t.split(".")) for t in tree_numbers)
    # The tree is closed under ancestors: every parent of a tree number is one too.
    assert all(a in present for t in tree_numbers for a in ancestors(t))
    assert all(len(ancestors(t)) == depth(t) - 1 for t in tree_numbers)
    assert max(depth(t) for t in tree_numbers) == 13


@pytest.mark.parametrize("prefix", ["C", "C04", "C04.557", "C14.280", "Z01"])
def test_like_pattern_selects_the_subtree(tree_numbers: list[str], prefix: str) -> None:
    """``tree_number = p OR tree_number LIKE like_pattern(p)``, as the SQL queries use it,
    selects exactly the tree numbers ``in_subtree`` accepts: the same as walking down
    from the root through ``parent``."""
    by_sql = {t for t in tree_numbers if t == prefix or _like(like_pattern(prefix), t)}
    by_python = {t for t in tree_numbers if in_subtree(t, prefix)}

    def below(t: str) -> bool:
        node: str | None = t
        while node is not None:
            if node == prefix:
                return True
            node = parent(node)
        return len(prefix) == 1 and t[0] == prefix

    assert by_sql == by_python == {t for t in tree_numbers if below(t)}
    assert by_sql


def test_subtree_sizes(tree_numbers: list[str]) -> None:
    """Figures from the 2023 file (SOURCES.md gives the category counts)."""
    assert sum(in_subtree(t, "C") for t in tree_numbers) == 12_950
    assert sum(in_subtree(t, "C04") for t in tree_numbers) == 1_056
