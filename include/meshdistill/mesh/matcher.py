"""Find the MeSH descriptors a question mentions, by descriptor names and entry terms.

This gives ``MeSH(question)`` for the hierarchy grade (docs/architecture.md, Pipeline
steps: Grade). Matching is case-insensitive, accent-insensitive and on whole words;
punctuation between words is ignored, so 'A-23187', 'A 23187' and 'a-23187' are the same
term. Of overlapping candidates the longest wins, scanning left to right: 'breast
neoplasms' is one match for Breast Neoplasms, not also one for Neoplasms. A term's last
word also matches in its simple singular/plural form ('breast neoplasm'), unless the word
is an acronym ('AIDS' must not become 'aid') or another term spells that form exactly.
The terms live in a trie keyed by whole tokens, one flat dict ``(node, token) -> node``:
it walks at most the longest term's length from each word and gives longest-match for
free, where a regex alternation of ~30k names would try every one at every position
(``docs/grading.md``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, text

TOKEN_RE = re.compile(r"[^\W_]+")

MIN_TERM_CHARS = 3
"""Terms shorter than this (after normalization, without spaces) are not indexed: one- and
two-letter entry terms ('T', 'Ca') would match ordinary words and initials."""


def _fold(token: str) -> str:
    """Lower-case and strip accents, so 'Sjögren' matches 'sjogren'."""
    if token.isascii():  # most words: nothing to decompose, and casefold() == lower()
        return token.lower()
    decomposed = unicodedata.normalize("NFKD", token.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def tokenize(text_: str) -> list[tuple[str, int, int]]:
    """Folded word tokens of ``text_`` with their character offsets in the original."""
    return [(_fold(m.group()), m.start(), m.end()) for m in TOKEN_RE.finditer(text_)]


def _number_variants(word: str, original: str) -> list[str]:
    """Simple singular/plural forms of a term's last word (folded); none for acronyms."""
    if len(word) < 4 or (original.isupper() and len(original) > 1) or not word.isalpha():
        return []
    if word.endswith("ies"):
        return [word[:-3] + "y"]
    if word.endswith(("sses", "xes", "ches", "shes")):
        return [word[:-2]]
    if word.endswith("ss"):
        return [word + "es"]
    if word.endswith(("us", "is")):  # mellitus, sepsis: singular, and no simple plural
        return []
    if word.endswith("s"):
        return [word[:-1]]
    if word.endswith("y") and word[-2] not in "aeiou":
        return [word[:-1] + "ies"]
    if word.endswith(("x", "ch", "sh")):
        return [word + "es"]
    return [word + "s"]


@dataclass(frozen=True)
class MeshMatch:
    """One span of the text and the descriptor(s) its words name."""

    start: int
    end: int
    text: str
    uis: tuple[str, ...]


class MeshMatcher:
    """Longest-match lookup of descriptor names and entry terms in free text.

    Build once (``from_db`` or ``from_terms``) and reuse: building reads every term, matching
    is a few dict lookups per word of the question.
    """

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        self._edges: dict[tuple[int, str], int] = {}
        # node -> (uis, exact): 'exact' marks a term as written; a number variant never
        # overrides one, it only adds a spelling nobody else owns.
        self._terminal: dict[int, tuple[frozenset[str], bool]] = {}
        self._nodes = 1  # node 0 is the root
        self._max_len = 0
        self.names: dict[str, str] = dict(names or {})

    @property
    def term_count(self) -> int:
        """Indexed spellings (terms and their number variants)."""
        return len(self._terminal)

    def _node(self, tokens: Sequence[str]) -> int:
        node = 0
        for tok in tokens:
            nxt = self._edges.get((node, tok))
            if nxt is None:
                nxt = self._nodes
                self._nodes += 1
                self._edges[(node, tok)] = nxt
            node = nxt
        self._max_len = max(self._max_len, len(tokens))
        return node

    def _put(self, tokens: Sequence[str], ui: str, exact: bool) -> None:
        node = self._node(tokens)
        uis, was_exact = self._terminal.get(node, (frozenset(), False))
        if exact and not was_exact:
            self._terminal[node] = (frozenset({ui}), True)
        elif exact == was_exact:
            self._terminal[node] = (uis | {ui}, exact)
        # else: a variant landing on an exact term of another descriptor is dropped

    def add(self, ui: str, term: str) -> None:
        """Index ``term`` (a name or entry term) for descriptor ``ui``."""
        words = TOKEN_RE.findall(term)
        tokens = [_fold(w) for w in words]
        if not tokens or sum(map(len, tokens)) < MIN_TERM_CHARS:
            return
        self._put(tokens, ui, exact=True)
        for variant in _number_variants(tokens[-1], words[-1]):
            self._put([*tokens[:-1], variant], ui, exact=False)

    @classmethod
    def from_terms(
        cls, terms: Mapping[str, Iterable[str]], names: Mapping[str, str] | None = None
    ) -> MeshMatcher:
        """From ``{ui: [name, entry terms...]}``; ``names`` gives display names if wanted."""
        matcher = cls(names)
        for ui, ts in terms.items():
            for term in ts:
                matcher.add(ui, term)
        return matcher

    @classmethod
    def from_db(cls, conn: Connection, uis: Iterable[str] | None = None) -> MeshMatcher:
        """From ``mesh_descriptor`` names, ``mesh_tree`` names with a UI, and entry terms.

        Both name columns are read because the tree file may be of a later year than the
        descriptor names (renamed descriptors keep their UI). Tree numbers whose name was
        never joined to a UI are skipped: a match must yield a UI. ``uis`` restricts the
        matcher to a subset (e.g. one subtree's descriptors).
        """
        wanted = None if uis is None else sorted(set(uis))
        where = "" if wanted is None else " AND ui = ANY(:uis)"
        params = {} if wanted is None else {"uis": wanted}
        rows = conn.execute(
            text(
                f"""
                SELECT ui, name FROM mesh_descriptor WHERE true{where}
                UNION SELECT ui, name FROM mesh_tree WHERE ui IS NOT NULL{where}
                UNION SELECT ui, term FROM mesh_entry_term WHERE true{where}
                """
            ),
            params,
        ).all()
        names: dict[str, str] = {
            r[0]: r[1]
            for r in conn.execute(
                text(f"SELECT ui, name FROM mesh_descriptor WHERE true{where}"), params
            )
        }
        terms: dict[str, list[str]] = {}
        for ui, term in rows:
            terms.setdefault(ui, []).append(term)
        return cls.from_terms(terms, names)

    def find(self, text_: str) -> list[MeshMatch]:
        """Non-overlapping matches, left to right, each the longest term starting there."""
        tokens = tokenize(text_)
        out: list[MeshMatch] = []
        i, n = 0, len(tokens)
        edges, terminal = self._edges, self._terminal
        while i < n:
            node, best_end, best_uis = 0, -1, frozenset[str]()
            for j in range(i, min(n, i + self._max_len)):
                nxt = edges.get((node, tokens[j][0]))
                if nxt is None:
                    break
                node = nxt
                hit = terminal.get(node)
                if hit is not None:
                    best_end, best_uis = j, hit[0]
            if best_end < 0:
                i += 1
                continue
            start, end = tokens[i][1], tokens[best_end][2]
            out.append(MeshMatch(start, end, text_[start:end], tuple(sorted(best_uis))))
            i = best_end + 1
        return out

    def uis(self, text_: str) -> list[str]:
        """The distinct descriptor UIs mentioned in ``text_``, in order of first mention."""
        return list(dict.fromkeys(ui for m in self.find(text_) for ui in m.uis))


def load_tree_numbers(conn: Connection, uis: Iterable[str] | None = None) -> dict[str, list[str]]:
    """``{ui: [tree numbers]}`` from ``mesh_tree``, the input of ``similarity.TreeIndex``.

    Lives here, not in :mod:`meshdistill.mesh.similarity`, to keep that module free of the
    database.
    """
    if uis is None:
        result = conn.execute(
            text("SELECT ui, tree_number FROM mesh_tree WHERE ui IS NOT NULL ORDER BY tree_number")
        )
    else:
        result = conn.execute(
            text("SELECT ui, tree_number FROM mesh_tree WHERE ui = ANY(:uis) ORDER BY 2"),
            {"uis": sorted(set(uis))},
        )
    trees: dict[str, list[str]] = {}
    for ui, number in result:
        trees.setdefault(ui, []).append(number)
    return trees
