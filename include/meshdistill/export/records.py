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
from meshdistill.export.source import ITEM_COLUMNS
from meshdistill.llm import prompts
from meshdistill.llm.inputs import ArticleInput, MeshHeading, Passage
from meshdistill.llm.stages import format_ancestry, format_contexts, format_mesh

_I = {name: i for i, name in enumerate(ITEM_COLUMNS)}
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
              turn: pa.StructType = MESSAGE) -> pa.ListArray:
    """A list array of len(columns[0]) rows, each the turns ``roles`` x ``columns`` as
    ``turn`` structs (role field first, text second)."""
    n, k = len(columns[0]), len(columns)
    content = pa.array([text for row in zip(*columns, strict=True) for text in row],
                       pa.string())
    role = pa.array(list(roles) * n, pa.string())
    structs = pa.StructArray.from_arrays([role, content], fields=list(turn))
    offsets = pa.array(range(0, n * k + 1, k), pa.int32())
    return pa.ListArray.from_arrays(offsets, structs)


def _judge(judgements: Sequence[dict[str, Any] | None]) -> pa.StructArray:
    arrays = [pa.array([(j or {}).get(c) for j in judgements], pa.int8()) for c in JUDGE_CRITERIA]
    return pa.StructArray.from_arrays(arrays, fields=list(JUDGE_SCORES))


class ItemBatch:
    """One batch of ``source.ITEM_ROWS_SQL`` rows, with the strings the formats share;
    ``texts`` holds the title and abstract of every context article of the batch."""

    def __init__(self, rows: Sequence[tuple[Any, ...]], *, closed_book: bool,
                 mesh_trees: dict[str, list[str]],
                 texts: dict[int, tuple[str, str]]) -> None:
        self.rows = rows
        self.mesh_trees = mesh_trees
        self.ids = self.column("id")
        self.subtrees = self.column("subtree")
        self.pmids = [int(p) for p in self.column("source_pmid")]
        self.qtypes = self.column("qtype")
        self.questions = self.column("question")
        self.labels = self.column("label")
        self.hierarchy = self.column("hierarchy_score")
        self.judgements = self.column("judgement")
        contexts = _I["contexts"]
        self.passages = [[Passage(str(c["pmid"]), *texts[int(c["pmid"])])
                          for c in (r[contexts] or []) if int(c["pmid"]) in texts]
                         for r in rows]
        self.context_blocks = [format_contexts(p) for p in self.passages]
        template = ANSWER_CLOSED if closed_book else ANSWER_OPEN
        system: list[str] = []
        user: list[str] = []
        for question, block in zip(self.questions, self.context_blocks, strict=True):
            rendered = prompts.render(template, {"question": question, "contexts": block})
            system.append(rendered.messages[0]["content"])
            user.append(rendered.messages[1]["content"])
        self.system, self.user = system, user
        self.assistant = [assistant_text(q, label, answer) for q, label, answer in zip(
            self.qtypes, self.labels, self.column("answer"), strict=True)]
        self.closed_book = closed_book
        self._metadata: pa.StructArray | None = None

    def column(self, name: str) -> list[Any]:
        i = _I[name]
        return [r[i] for r in self.rows]

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
            cols = [_messages(("system", "human", "gpt"),
                              (self.system, self.user, self.assistant), SHAREGPT_TURN), meta]
        elif fmt == "qca":
            return self._qca(meta)
        else:
            raise ValueError(f"no item table for format {fmt!r}")
        return pa.Table.from_arrays(cols, schema=SCHEMAS[fmt])

    def _qca(self, meta: pa.StructArray) -> pa.Table:
        col = self.column
        contexts = []
        for stored, passages in zip(col("contexts"), self.passages, strict=True):
            text = {int(p.pmid): p for p in passages}
            contexts.append([
                {"pmid": int(c["pmid"]), "title": text[int(c["pmid"])].title,
                 "text": text[int(c["pmid"])].text, "rank": c.get("rank"),
                 "retrieval": c.get("retrieval"), "hierarchy": c.get("hierarchy"),
                 "blend": c.get("blend"), "is_source": c.get("is_source")}
                for c in (stored or []) if int(c["pmid"]) in text])
        mesh = [[{"ui": ui, "tree_numbers": self.mesh_trees.get(ui, [])} for ui in (uis or [])]
                for uis in col("question_mesh")]
        versions = [{k: (v or {}).get(k) for k in ("generate", "judge", "answer")}
                    for v in col("prompt_versions")]
        columns = {
            "id": pa.array(self.ids, pa.int64()),
            "subtree": pa.array(self.subtrees, pa.string()),
            "source_pmid": pa.array(self.pmids, pa.int64()),
            "profile": pa.array(col("profile"), pa.string()),
            "ordinal": pa.array(col("ordinal"), pa.int32()),
            "question_type": pa.array(self.qtypes, pa.string()),
            "question": pa.array(self.questions, pa.string()),
            "answer_hint": pa.array(col("answer_hint"), pa.string()),
            "evidence": pa.array(col("evidence"), pa.string()),
            "contexts": pa.array(contexts, pa.list_(CONTEXT)),
            "context_pmids": pa.array([[int(c["pmid"]) for c in (v or [])]
                                       for v in col("contexts")], pa.list_(pa.int64())),
            "answer": pa.array(col("answer"), pa.string()),
            "label": pa.array(self.labels, pa.string()),
            "cited_pmids": pa.array([v or [] for v in col("cited_pmids")],
                                    pa.list_(pa.int64())),
            "answer_evidence": pa.array([v or [] for v in col("answer_evidence")],
                                        pa.list_(pa.string())),
            "question_mesh": pa.array(mesh, pa.list_(MESH_TERM)),
            "retrieval_score": pa.array(col("retrieval_score"), pa.float64()),
            "hierarchy_score": pa.array(self.hierarchy, pa.float64()),
            "blend_score": pa.array(col("blend_score"), pa.float64()),
            "judge": _judge(self.judgements),
            "judge_rationale": pa.array([(j or {}).get("rationale") for j in self.judgements],
                                        pa.string()),
            "backend": pa.array(col("backend"), pa.string()),
            "model": pa.array(col("model"), pa.string()),
            "prompt_versions": pa.array(versions, PROMPT_VERSIONS),
            "run_id": pa.array(col("run_id"), pa.string()),
            "params": pa.array(col("params"), pa.string()),
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
