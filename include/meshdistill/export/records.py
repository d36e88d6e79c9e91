"""Turning a batch of stored rows into one Arrow table per export format.

Tables are built column by column from the batch (``pyarrow`` list and struct arrays over
flat columns), not row dict by row dict: the prompt, context and answer strings of an
item are made once and shared by every format that shows them. The texts a trainer sees
come from versioned templates in ``llm/prompts`` (``export_answer``,
``export_answer_closed``, ``export_question``), whose versions the manifest records.
docs/export.md shows a record of each format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from meshdistill.export.schemas import (
    CONTEXT,
    ITEM_METADATA,
    JUDGE_CRITERIA,
    JUDGE_SCORES,
    MESH_TERM,
    MESSAGE,
    PAIR_METADATA,
    PROMPT_VERSIONS,
    SCHEMAS,
    SHAREGPT_TURN,
)
from meshdistill.llm import prompts
from meshdistill.llm.inputs import ArticleInput, MeshHeading, Passage
from meshdistill.llm.stages import format_ancestry, format_contexts, format_mesh

ANSWER_OPEN, ANSWER_CLOSED, QUESTION = "export_answer", "export_answer_closed", "export_question"
TEMPLATES = (ANSWER_OPEN, ANSWER_CLOSED, QUESTION)


def template_versions() -> dict[str, str]:
    """The version label of each export template (``export_answer_v1``, ...)."""
    return {name: f"{name}_v{prompts.available()[name][-1]}" for name in TEMPLATES}


def assistant_text(qtype: str, label: str | None, answer: str) -> str:
    """The answer as a trainer's target: a ``yesno`` answer starts with its label."""
    if qtype != "yesno" or not label:
        return answer
    if answer[: len(label)].lower() == label and not answer[len(label):len(label) + 1].isalpha():
        return answer
    return f"{label.capitalize()}. {answer}"


def _messages(roles: Sequence[str], columns: Sequence[Sequence[str]],
              role_key: str = "role", content_key: str = "content") -> pa.ListArray:
    """A list array of len(columns[0]) rows, each the messages ``roles`` x ``columns``."""
    n, k = len(columns[0]), len(columns)
    content = pa.array([text for row in zip(*columns, strict=True) for text in row],
                       pa.string())
    role = pa.array(list(roles) * n, pa.string())
    fields = list(MESSAGE) if role_key == "role" else list(SHAREGPT_TURN)
    structs = pa.StructArray.from_arrays([role, content], fields=fields)
    offsets = pa.array(range(0, n * k + 1, k), pa.int32())
    return pa.ListArray.from_arrays(offsets, structs)


def _judge(judgements: Sequence[dict[str, Any] | None]) -> pa.StructArray:
    arrays = [pa.array([(j or {}).get(c) for j in judgements], pa.int8()) for c in JUDGE_CRITERIA]
    return pa.StructArray.from_arrays(arrays, fields=list(JUDGE_SCORES))


class ItemBatch:
    """One batch of ``source.ITEM_ROWS_SQL`` rows, with the strings the formats share."""

    def __init__(self, rows: Sequence[tuple[Any, ...]], *, closed_book: bool,
                 mesh_trees: dict[str, list[str]]) -> None:
        self.rows = rows
        self.mesh_trees = mesh_trees
        self.ids = [r[0] for r in rows]
        self.subtrees = [r[1] for r in rows]
        self.pmids = [int(r[2]) for r in rows]
        self.qtypes = [r[5] for r in rows]
        self.questions = [r[6] for r in rows]
        self.labels = [r[12] for r in rows]
        self.hierarchy = [r[17] for r in rows]
        self.judgements = [r[19] for r in rows]
        self.passages = [self._passages(r) for r in rows]
        self.context_blocks = [format_contexts(p) for p in self.passages]
        template = ANSWER_CLOSED if closed_book else ANSWER_OPEN
        system: list[str] = []
        user: list[str] = []
        for question, block in zip(self.questions, self.context_blocks, strict=True):
            rendered = prompts.render(template, {"question": question, "contexts": block})
            system.append(rendered.messages[0]["content"])
            user.append(rendered.messages[1]["content"])
        self.system, self.user = system, user
        self.assistant = [assistant_text(r[5], r[12], r[11]) for r in rows]
        self.closed_book = closed_book
        self._metadata: pa.StructArray | None = None

    @staticmethod
    def _passages(row: tuple[Any, ...]) -> list[Passage]:
        texts = {int(p): (title, text) for p, title, text in (row[10] or [])}
        return [Passage(str(c["pmid"]), *texts[int(c["pmid"])])
                for c in (row[9] or []) if int(c["pmid"]) in texts]

    def metadata(self) -> pa.StructArray:
        if self._metadata is None:
            self._metadata = pa.StructArray.from_arrays([
                pa.array(self.ids, pa.int64()), pa.array(self.pmids, pa.int64()),
                pa.array(self.subtrees, pa.string()), pa.array(self.qtypes, pa.string()),
                pa.array(self.labels, pa.string()), pa.array(self.hierarchy, pa.float64()),
                _judge(self.judgements)], fields=list(ITEM_METADATA))
        return self._metadata

    def table(self, fmt: str) -> pa.Table:
        meta = self.metadata()
        if fmt == "sft":
            cols = [_messages(("system", "user", "assistant"),
                              (self.system, self.user, self.assistant)), meta]
        elif fmt == "prompt_completion":
            cols = [_messages(("system", "user"), (self.system, self.user)),
                    _messages(("assistant",), (self.assistant,)), meta]
        elif fmt == "alpaca":
            inputs = [""] * len(self.rows) if self.closed_book else self.context_blocks
            cols = [pa.array(self.questions, pa.string()), pa.array(inputs, pa.string()),
                    pa.array(self.assistant, pa.string()), meta]
        elif fmt == "sharegpt":
            cols = [_messages(("system", "human", "gpt"), (self.system, self.user,
                                                          self.assistant), "from", "value"),
                    meta]
        elif fmt == "qca":
            return self._qca(meta)
        else:
            raise ValueError(f"no item table for format {fmt!r}")
        return pa.Table.from_arrays(cols, schema=SCHEMAS[fmt])

    def _qca(self, meta: pa.StructArray) -> pa.Table:
        rows = self.rows
        contexts = []
        for r, passages in zip(rows, self.passages, strict=True):
            text = {int(p.pmid): p for p in passages}
            contexts.append([
                {"pmid": int(c["pmid"]), "title": text[int(c["pmid"])].title,
                 "text": text[int(c["pmid"])].text, "rank": c.get("rank"),
                 "retrieval": c.get("retrieval"), "hierarchy": c.get("hierarchy"),
                 "blend": c.get("blend"), "is_source": c.get("is_source")}
                for c in (r[9] or []) if int(c["pmid"]) in text])
        mesh = [[{"ui": ui, "tree_numbers": self.mesh_trees.get(ui, [])} for ui in (r[15] or [])]
                for r in rows]
        versions = [{k: (r[22] or {}).get(k) for k in ("generate", "judge", "answer")}
                    for r in rows]
        columns = {
            "id": pa.array(self.ids, pa.int64()),
            "subtree": pa.array(self.subtrees, pa.string()),
            "source_pmid": pa.array(self.pmids, pa.int64()),
            "profile": pa.array([r[3] for r in rows], pa.string()),
            "ordinal": pa.array([r[4] for r in rows], pa.int32()),
            "question_type": pa.array(self.qtypes, pa.string()),
            "question": pa.array(self.questions, pa.string()),
            "answer_hint": pa.array([r[7] for r in rows], pa.string()),
            "evidence": pa.array([r[8] for r in rows], pa.string()),
            "contexts": pa.array(contexts, pa.list_(CONTEXT)),
            "context_pmids": pa.array([[int(c["pmid"]) for c in (r[9] or [])] for r in rows],
                                      pa.list_(pa.int64())),
            "answer": pa.array([r[11] for r in rows], pa.string()),
            "label": pa.array(self.labels, pa.string()),
            "cited_pmids": pa.array([r[13] or [] for r in rows], pa.list_(pa.int64())),
            "answer_evidence": pa.array([r[14] or [] for r in rows], pa.list_(pa.string())),
            "question_mesh": pa.array(mesh, pa.list_(MESH_TERM)),
            "retrieval_score": pa.array([r[16] for r in rows], pa.float64()),
            "hierarchy_score": pa.array(self.hierarchy, pa.float64()),
            "blend_score": pa.array([r[18] for r in rows], pa.float64()),
            "judge": _judge(self.judgements),
            "judge_rationale": pa.array([(j or {}).get("rationale") for j in self.judgements],
                                        pa.string()),
            "backend": pa.array([r[20] for r in rows], pa.string()),
            "model": pa.array([r[21] for r in rows], pa.string()),
            "prompt_versions": pa.array(versions, PROMPT_VERSIONS),
            "run_id": pa.array([r[23] for r in rows], pa.string()),
            "params": pa.array([r[24] for r in rows], pa.string()),
            "metadata": meta,
        }
        return pa.Table.from_arrays(list(columns.values()), schema=SCHEMAS["qca"])


def pair_table(rows: Sequence[tuple[Any, ...]],
               subtree_info: dict[str, tuple[list[str], str | None]]) -> pa.Table:
    """The ``dpo`` table of a batch of ``source.PAIR_ROWS_SQL`` rows. ``subtree_info``
    maps a subtree to its ancestry (root first, itself last) and scope note."""
    system: list[str] = []
    user: list[str] = []
    for r in rows:
        ancestry, scope = subtree_info.get(r[1], ([r[1]], None))
        article = ArticleInput(
            pmid=str(r[2]), title=r[14], abstract=r[15],
            mesh=tuple(MeshHeading(n, bool(m)) for n, m in zip(r[16] or [], r[17] or [],
                                                               strict=True)),
            ancestry=tuple(ancestry), scope_note=scope)
        types = r[8] if r[8] == r[11] else f"{r[8]} or {r[11]}"
        rendered = prompts.render(QUESTION, {
            "types": types, "ancestry": format_ancestry(article),
            "scope_note": scope or "(not given)", "title": article.title,
            "mesh": format_mesh(article), "pmid": article.pmid, "abstract": article.abstract})
        system.append(rendered.messages[0]["content"])
        user.append(rendered.messages[1]["content"])
    meta = pa.StructArray.from_arrays([
        pa.array([r[3] for r in rows], pa.int64()), pa.array([r[4] for r in rows], pa.int64()),
        pa.array([int(r[2]) for r in rows], pa.int64()), pa.array([r[1] for r in rows]),
        pa.array([r[8] for r in rows]), pa.array([r[9] for r in rows]),
        pa.array([r[12] for r in rows]), pa.array([r[5] for r in rows], pa.float64()),
        pa.array([r[6] for r in rows], pa.float64()), pa.array([r[7] for r in rows], pa.float64()),
    ], fields=list(PAIR_METADATA))
    return pa.Table.from_arrays([
        _messages(("system", "user"), (system, user)),
        _messages(("assistant",), ([r[10] for r in rows],)),
        _messages(("assistant",), ([r[13] for r in rows],)),
        meta], schema=SCHEMAS["dpo"])
