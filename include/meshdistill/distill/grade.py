"""MeSH-hierarchy grade of questions and contexts (docs/architecture.md, Pipeline steps: Grade).

The measures (Wu–Palmer on tree numbers, best-match average) are
:mod:`meshdistill.mesh.similarity`; this module picks the descriptor sets compared:
``MeSH(question)`` is the descriptors whose name, entry term or :func:`name_variants`
occurs in the question (:class:`~meshdistill.mesh.matcher.MeshMatcher`), minus
:data:`GENERIC_NAMES`. The context score ``blend(retrieval, BMA(MeSH(question),
MeSH(context)))`` ranks a question's candidates (the pipeline falls back on the source's
headings when the question names no descriptor). The item score, ``hierarchy_score`` of
the source, the chosen contexts other than the source, and the question, is the
``min_hierarchy`` filter and the preference-pair criterion. The matcher choices and the
blend weight were tuned on half A of PubMedQA-L only; why, and the figures:
``docs/grading.md`` and ``docs/calibration.md``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, text

from meshdistill.distill.settings import DEFAULT_BLEND_WEIGHT
from meshdistill.mesh.matcher import MeshMatcher, load_tree_numbers
from meshdistill.mesh.similarity import (
    DEFAULT_ALPHA,
    SimilarityTable,
    TreeIndex,
    hierarchy_score,
)

_GRADERS: dict[tuple[str, int], MeshGrader] = {}
_GRADERS_LOCK = threading.Lock()

GENERIC_NAMES = frozenset({
    "evidence", "research", "methods", "patients", "persons", "humans", "disease",
    "therapeutics", "time", "risk", "population", "association", "role", "control groups",
    "cells", "diagnosis", "prognosis", "treatment outcome", "review", "data", "study",
    "affect",
})
"""Descriptor names ignored when matching questions: they are words any question uses
("is there *evidence*", "what is the *role*") and would tie every question to the same few
descriptors, not to its topic."""


def blend(retrieval: float, hierarchy: float, weight: float = DEFAULT_BLEND_WEIGHT) -> float:
    """``weight·retrieval + (1 − weight)·hierarchy``: both lie in [0, 1]."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"blend weight must be in [0, 1], got {weight}")
    return weight * retrieval + (1.0 - weight) * hierarchy


_NEOPLASMS = re.compile(r"\bNeoplasms\b")


def name_variants(name: str) -> list[str]:
    """Everyday spellings of a MeSH heading that NLM's entry terms usually list.

    - natural word order of an inverted heading: 'Carcinoma, Squamous Cell' → 'Squamous
      Cell Carcinoma', 'Students, Medical' → 'Medical Students' (parts reversed);
    - 'cancer' for 'Neoplasms': 'Breast Neoplasms' → 'Breast Cancer', 'Neoplasms' →
      'Cancer' (the matcher adds the plural).

    Only needed when the loaded MeSH source has no entry terms (a trees-only release such
    as ``mtrees2023.bin``): with them, these spellings are already there.
    """
    forms = [name]
    if ", " in name and "(" not in name:
        forms.append(" ".join(reversed(name.split(", "))))
    out = forms[1:]
    out += [_NEOPLASMS.sub("Cancer", f) for f in forms if _NEOPLASMS.search(f)]
    return list(dict.fromkeys(v for v in out if v != name))


def _descriptor_names(conn: Connection) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for ui, name in conn.execute(text(
        "SELECT ui, name FROM mesh_descriptor"
        " UNION SELECT ui, name FROM mesh_tree WHERE ui IS NOT NULL"
    )):
        names.setdefault(ui, set()).add(name)
    return names


def add_name_variants(matcher: MeshMatcher, names: dict[str, set[str]]) -> int:
    """Index :func:`name_variants` of ``{ui: names}`` in ``matcher``; returns those added.

    A variant that already names something (an entry term, another descriptor) is
    skipped, so a variant never makes a match ambiguous or takes a term from its owner.
    """
    added = 0
    for ui, ns in sorted(names.items()):
        for name in sorted(ns):
            for variant in name_variants(name):
                known = matcher.find(variant)
                if len(known) == 1 and known[0].start == 0 and known[0].end == len(variant):
                    continue
                matcher.add(ui, variant)
                added += 1
    return added


@dataclass(frozen=True)
class Headings:
    """The MeSH headings of one article: descriptor UIs and the major ones among them."""

    uis: tuple[str, ...]
    major: frozenset[str] = frozenset()


class MeshGrader:
    """Tree index and question matcher for one grading run, with the scores built on them.

    Building both takes a second or two for a full MeSH release, so one grader serves a
    whole subtree run (and every run of the process on that release).
    """

    def __init__(
        self,
        index: TreeIndex,
        matcher: MeshMatcher,
        *,
        blend_weight: float = DEFAULT_BLEND_WEIGHT,
        alpha: float = DEFAULT_ALPHA,
        generic_uis: Collection[str] = frozenset(),
    ) -> None:
        blend(0.0, 0.0, blend_weight)  # validates the weight
        self.index = index
        self.matcher = matcher
        self.blend_weight = blend_weight
        self.alpha = alpha
        self.generic_uis = frozenset(generic_uis)

    @classmethod
    def from_db(
        cls, conn: Connection, *, name_variants: bool = True, **kwargs: float
    ) -> MeshGrader:
        """All descriptors with a tree number, and every name and entry term, from the DB.

        With ``name_variants`` the matcher also knows :func:`name_variants` of every
        descriptor name (spellings nothing else owns only).
        """
        matcher = MeshMatcher.from_db(conn)
        if name_variants:
            add_name_variants(matcher, _descriptor_names(conn))
        generic = {ui for ui, name in matcher.names.items() if name.lower() in GENERIC_NAMES}
        return cls(TreeIndex(load_tree_numbers(conn)), matcher, generic_uis=generic, **kwargs)

    @classmethod
    def for_release(cls, conn: Connection, *, blend_weight: float = DEFAULT_BLEND_WEIGHT
                    ) -> MeshGrader:
        """:meth:`from_db`, built once per process per database and MeSH release.

        Building takes a few seconds; a CLI run over several subtrees, or a worker running
        several mapped tasks, reuses it until a new MeSH release is loaded.
        """
        release = conn.execute(text(
            "SELECT coalesce(max(id), 0) FROM mesh_release")).scalar_one()
        key = (conn.engine.url.render_as_string(hide_password=True), int(release))
        with _GRADERS_LOCK:
            grader = _GRADERS.get(key)
            if grader is None:
                _GRADERS.clear()  # one release per process is enough
                grader = _GRADERS[key] = cls.from_db(conn)
        return grader.with_blend_weight(blend_weight)

    def with_blend_weight(self, weight: float) -> MeshGrader:
        """The same index and matcher (caches shared) with another blend weight."""
        return MeshGrader(self.index, self.matcher, blend_weight=weight, alpha=self.alpha,
                          generic_uis=self.generic_uis)

    def question_uis(self, question: str) -> list[str]:
        """MeSH(question): descriptors named in the text, generic ones left out."""
        return [ui for ui in self.matcher.uis(question) if ui not in self.generic_uis]

    def table(self, question_uis: Sequence[str], source: Headings | None,
              contexts: Iterable[Headings]) -> SimilarityTable:
        """Every similarity one grading step needs, computed at once: the question's (and
        the source's) descriptors against every context's (and the source's).

        Pass it to :meth:`context_score` and :meth:`item_score` for the candidates of one
        question; each BMA is then a slice of one matrix rather than a matrix of its own.
        """
        own = source.uis if source is not None else ()
        return self.index.table([*question_uis, *own],
                                [*(u for c in contexts for u in c.uis), *own])

    def question_context(self, question_uis: Sequence[str], context: Headings,
                         table: SimilarityTable | None = None) -> float:
        """``BMA(MeSH(question), MeSH(context))``, the context's majors weighted; 0 if either
        side is empty."""
        scorer = self.index if table is None else table
        return scorer.best_match_average(question_uis, context.uis, frozenset(), context.major)

    def context_score(
        self, question_uis: Sequence[str], context: Headings, retrieval: float,
        table: SimilarityTable | None = None,
    ) -> tuple[float, float]:
        """(hierarchy, blend) of one candidate context for one question."""
        hierarchy = self.question_context(question_uis, context, table)
        return hierarchy, blend(retrieval, hierarchy, self.blend_weight)

    def context_scores(
        self, question_uis: Sequence[str], contexts: Sequence[Headings],
        retrievals: Sequence[float], table: SimilarityTable,
    ) -> list[tuple[float, float]]:
        """:meth:`context_score` of each context (same values), from one table lookup."""
        hierarchies = table.best_match_averages(
            question_uis, [c.uis for c in contexts], [c.major for c in contexts])
        return [(h, blend(r, h, self.blend_weight))
                for h, r in zip(hierarchies, retrievals, strict=True)]

    def item_score(
        self, source: Headings, contexts: Iterable[Headings], question_uis: Sequence[str],
        table: SimilarityTable | None = None,
    ) -> float:
        """The item's hierarchy score of a (question, contexts) pair (``docs/grading.md``)."""
        ctx_uis: dict[str, None] = {}
        ctx_major: set[str] = set()
        for c in contexts:
            ctx_uis.update(dict.fromkeys(c.uis))
            ctx_major.update(c.major)
        return hierarchy_score(
            source.uis, list(ctx_uis), question_uis, self.index if table is None else table,
            alpha=self.alpha, major_source=source.major, major_contexts=ctx_major,
        )
