"""Subtree queries: the descriptors under a tree-number prefix."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, text

from meshdistill.errors import UnknownSubtreeError
from meshdistill.mesh.tree import ancestors, is_valid_prefix, like_pattern


@dataclass(frozen=True)
class Subtree:
    prefix: str
    name: str | None
    ui: str | None
    scope_note: str | None
    ancestry: list[str]
    tree_numbers: int
    descriptors: int
    unjoined_tree_numbers: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def suggest(conn: Connection, prefix: str, n: int = 5) -> list[str]:
    """The closest valid tree numbers (or, for a name, 'Name (tree number)')."""
    looks_like_tree = prefix[:1].isalpha() and prefix[:1].isupper() and any(
        c.isdigit() for c in prefix
    )
    if looks_like_tree or len(prefix) <= 3:
        dots = prefix.count(".")
        candidates = [
            r[0]
            for r in conn.execute(
                text(
                    "SELECT tree_number FROM mesh_tree WHERE "
                    "length(tree_number) - length(replace(tree_number, '.', '')) "
                    "BETWEEN :lo AND :hi"
                ),
                {"lo": max(dots - 1, 0), "hi": dots + 1},
            )
        ]
        # 'C4' (or 'c04') should point at 'C04': try the zero-padded, upper-case spelling first.
        upper = prefix.upper()
        padded = upper[:1] + upper[1:].zfill(2) if upper[1:].isdigit() else upper
        found = [padded] if padded != prefix and padded in set(candidates) else []
        found += difflib.get_close_matches(prefix, candidates, n=n, cutoff=0.5)
        return list(dict.fromkeys(found))[:n]
    names: dict[str, str] = dict(
        conn.execute(text("SELECT name, min(tree_number) FROM mesh_tree GROUP BY name")).all()
    )
    close = difflib.get_close_matches(prefix, list(names), n=n, cutoff=0.6)
    return [f"{c} ({names[c]})" for c in close]


def get_subtree(conn: Connection, prefix: str) -> Subtree:
    """Describe the subtree at ``prefix``; an unknown prefix names the closest valid ones."""
    prefix = prefix.strip()
    exists = is_valid_prefix(prefix) and conn.execute(
        text(
            "SELECT 1 FROM mesh_tree WHERE tree_number = :p OR tree_number LIKE :like LIMIT 1"
        ),
        {"p": prefix, "like": like_pattern(prefix)},
    ).first()
    if not exists:
        raise UnknownSubtreeError(prefix, suggest(conn, prefix))
    row = conn.execute(
        text(
            """
            SELECT count(*), count(DISTINCT ui), count(*) FILTER (WHERE ui IS NULL)
            FROM mesh_tree WHERE tree_number = :p OR tree_number LIKE :like
            """
        ),
        {"p": prefix, "like": like_pattern(prefix)},
    ).one()
    root = conn.execute(
        text(
            "SELECT t.name, t.ui, d.scope_note FROM mesh_tree t "
            "LEFT JOIN mesh_descriptor d ON d.ui = t.ui WHERE t.tree_number = :p"
        ),
        {"p": prefix},
    ).first()
    path = ancestors(prefix) if len(prefix) > 1 else []
    names: dict[str, str] = dict(
        conn.execute(
            text("SELECT tree_number, name FROM mesh_tree WHERE tree_number = ANY(:t)"),
            {"t": path},
        ).all()
    )
    return Subtree(
        prefix=prefix,
        name=root[0] if root else None,
        ui=root[1] if root else None,
        scope_note=root[2] if root else None,
        ancestry=[names.get(t, t) for t in path],
        tree_numbers=row[0],
        descriptors=row[1],
        unjoined_tree_numbers=row[2],
    )


def subtree_descriptor_uis(conn: Connection, prefix: str) -> list[str]:
    get_subtree(conn, prefix)  # validates, with suggestions on error
    return [
        r[0]
        for r in conn.execute(
            text(
                "SELECT DISTINCT ui FROM mesh_tree WHERE ui IS NOT NULL AND "
                "(tree_number = :p OR tree_number LIKE :like) ORDER BY ui"
            ),
            {"p": prefix, "like": like_pattern(prefix)},
        )
    ]


def subtree_stats(conn: Connection, prefix: str) -> dict[str, Any]:
    """Per-subtree figures for summaries: articles, those with an abstract, major topics."""
    sub = get_subtree(conn, prefix)
    row = conn.execute(
        text(
            """
            SELECT count(DISTINCT a.pmid),
                   count(DISTINCT a.pmid) FILTER (WHERE a.abstract <> ''),
                   count(DISTINCT a.pmid) FILTER (WHERE am.major)
            FROM article_mesh am
            JOIN article a ON a.pmid = am.pmid AND a.status = 'active'
            WHERE am.ui IN (SELECT ui FROM mesh_tree
                            WHERE tree_number = :p OR tree_number LIKE :like)
            """
        ),
        {"p": prefix, "like": like_pattern(prefix)},
    ).one()
    return {
        "subtree": prefix,
        "name": sub.name,
        "descriptors": sub.descriptors,
        "active_articles": row[0],
        "with_abstract": row[1],
        "as_major_topic": row[2],
    }
