"""Turning a batch of streamed rows into one Arrow table per export format.

Everything is column-wise Arrow compute, with no Python object per row: templates are
split into their literal pieces once (:func:`meshdistill.llm.prompts.pieces`), and each
column of messages is gathered in one pass from a pool holding those pieces, the batch's
columns and one context block per article (:mod:`~meshdistill.export.compose`). Formats
that show the same texts share the gathered column. The
texts a trainer sees come from versioned templates in ``llm/prompts`` (``export_answer``,
``export_answer_closed``, ``export_question``), whose versions the manifest records;
joining their pieces gives exactly what :func:`~meshdistill.llm.prompts.render` gives,
and the formatting of contexts, MeSH headings and ancestry equals
:mod:`meshdistill.llm.stages`' (tests compare both). docs/export.md shows a record of
each format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from meshdistill.export.compose import Joined, Pool, Segment
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

ANSWER_OPEN, ANSWER_CLOSED, QUESTION = "export_answer", "export_answer_closed", "export_question"
TEMPLATES = (ANSWER_OPEN, ANSWER_CLOSED, QUESTION)
_STORED_CONTEXT = pa.struct([("pmid", pa.int64()), ("rank", pa.int32()),
                             ("retrieval", pa.float64()), ("hierarchy", pa.float64()),
                             ("blend", pa.float64()), ("is_source", pa.bool_())])
_JSON_COLUMNS = pa.schema([("c", pa.list_(_STORED_CONTEXT)), ("e", pa.list_(pa.string()))])


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


# --- column helpers ------------------------------------------------------------------------


def _constant(value: str, n: int) -> pa.Array:
    return pc.fill_null(pa.nulls(n, pa.string()), value)


def segments(name: str, values: Mapping[str, Segment], pool: Pool) -> list[list[Segment]]:
    """Each message of template ``name`` as pool segments: its literal pieces, and
    ``values[v]`` for each ``$v``."""
    return [[pool.literal(t) if kind == "text" else values[t] for kind, t in parts]
            for _, parts in prompts.pieces(name)]


def _turns(roles: Sequence[str], content: pa.Array,
           turn: pa.StructType = MESSAGE) -> pa.ListArray:
    """A list array of ``len(content) / len(roles)`` rows, each the turns ``roles`` with
    the row's consecutive texts of ``content`` as ``turn`` structs (role field first,
    text second)."""
    k = len(roles)
    n = len(content) // k
    role = pa.array(list(roles), pa.string()).take(pa.array(np.tile(np.arange(k), n)))
    structs = pa.StructArray.from_arrays([role, content], fields=list(turn))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                    structs)


def _offsets(lengths: npt.NDArray[np.int64]) -> pa.Array:
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return pa.array(out)


def _lengths(lists: pa.Array) -> npt.NDArray[np.int64]:
    return pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64)


def _empty_for_null(lists: pa.Array) -> pa.Array:
    return pc.coalesce(lists, pa.scalar([], type=lists.type))


JSON_BLOCK_BYTES = 1 << 20
"""Arrow's JSON reader parses blocks of this size in parallel (measured: 1 MB blocks
parse a batch's contexts twice as fast as one block)."""


def _parse_json(columns: Sequence[pa.Array], schema: pa.Schema) -> pa.Table:
    """JSON texts (one per row and column, null for none) parsed into ``schema``'s
    fields, in row order: the texts are joined into JSON lines that Arrow's reader
    parses in C++, instead of one ``json.loads`` per value."""
    args: list[pa.Array | pa.Scalar] = []
    for i, (field, col) in enumerate(zip(schema, columns, strict=True)):
        args += [pa.scalar(("{" if i == 0 else ",") + f'"{field.name}":'),
                 pc.fill_null(col.cast(pa.string()), "null")]
    lines = pc.binary_join_element_wise(*args, pa.scalar("}\n"), "")
    _, offsets, values = lines.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int32)[lines.offset:lines.offset + len(lines) + 1]
    start, end = int(bounds[0]), int(bounds[-1])
    data = values.slice(start, end - start)  # the lines, back to back
    table = pj.read_json(pa.BufferReader(data),
                         read_options=pj.ReadOptions(block_size=JSON_BLOCK_BYTES),
                         parse_options=pj.ParseOptions(explicit_schema=schema,
                                                       unexpected_field_behavior="ignore"))
    if table.num_rows != len(lines):
        raise ValueError(f"parsed {table.num_rows} JSON rows from {len(lines)}")
    return table.combine_chunks()


def _judge(batch: pa.RecordBatch) -> pa.StructArray:
    return pa.StructArray.from_arrays(
        [batch.column(f"judge_{c}").cast(pa.int8()) for c in JUDGE_CRITERIA],
        fields=list(JUDGE_SCORES))


@dataclass(frozen=True)
class MeshTrees:
    """Each descriptor UI's tree numbers: ``trees[position[ui]]``."""

    position: Mapping[str, int]
    trees: pa.Array

    @classmethod
    def of(cls, mapping: Mapping[str, Sequence[str]]) -> MeshTrees:
        keys = sorted(mapping)
        return cls({k: i for i, k in enumerate(keys)},
                   pa.array([list(mapping[k]) for k in keys], pa.list_(pa.string())))

    def of_uis(self, uis: pa.Array) -> pa.Array:
        """The tree numbers of each of ``uis`` (empty for an unknown UI). The batch's
        distinct UIs are looked up in a dict built once: an Arrow set lookup would hash
        every MeSH UI again for each batch."""
        encoded = pc.dictionary_encode(uis)
        found = pa.array([self.position.get(u) for u in encoded.dictionary.to_pylist()],
                         pa.int64())
        return _empty_for_null(self.trees.take(found.take(encoded.indices)))


class ItemBatch:
    """One batch of ``source.ITEM_ROWS_SQL`` rows, with the strings the formats share.
    ``articles`` gives the ``pmid``, ``title`` and ``abstract`` of the stored ones of the
    PMIDs it is passed, called once per batch with all its contexts (a context whose
    article is not stored is left out of the prompt and of ``qca``). Message texts are
    gathered from one :class:`~meshdistill.export.compose.Pool` per batch, once per
    column a format needs, and shared by the formats that show the same texts."""

    def __init__(self, batch: pa.RecordBatch, *, closed_book: bool, mesh_trees: MeshTrees,
                 articles: Callable[[npt.NDArray[np.int64]], pa.Table]) -> None:
        self.batch = batch
        self.closed_book = closed_book
        self.mesh_trees = mesh_trees
        n = self.n = batch.num_rows
        parsed = _parse_json([batch.column("contexts"), batch.column("answer_evidence")],
                             _JSON_COLUMNS)
        self.stored_contexts = _empty_for_null(parsed.column("c").chunk(0)) if n else (
            pa.array([], pa.list_(_STORED_CONTEXT)))
        self.answer_evidence = _empty_for_null(parsed.column("e").chunk(0)) if n else (
            pa.array([], pa.list_(pa.string())))
        flat = self.stored_contexts.flatten()
        self.context_lengths = _lengths(self.stored_contexts)
        self.articles = texts = articles(flat.field("pmid").to_numpy(zero_copy_only=False))
        found = pc.index_in(flat.field("pmid"), value_set=texts.column("pmid"))
        have = found.is_valid().to_numpy(zero_copy_only=False)
        owner = np.repeat(np.arange(n), self.context_lengths)
        self.shown = flat.filter(pa.array(have))
        self.shown_article = found.filter(pa.array(have)).to_numpy(
            zero_copy_only=False).astype(np.int64)
        self.shown_offsets = _offsets(np.bincount(owner[have], minlength=n))
        self.assistant = self._assistant()
        pool = self.pool = Pool()
        blocks = pool.add(pc.binary_join_element_wise(
            "[PMID ", texts.column("pmid").cast(pa.string()), "] ", texts.column("title"),
            "\n", texts.column("abstract"), "").combine_chunks())
        self.contexts = Joined(blocks[self.shown_article],
                               np.asarray(self.shown_offsets, dtype=np.int64),
                               pool.literal("\n\n"), pool.literal("(none)"))
        self.answer_ids = pool.add(self.assistant)
        values: dict[str, Segment] = {"question": pool.add(batch.column("question")),
                                      "contexts": self.contexts}
        self.system, self.user = segments(ANSWER_CLOSED if closed_book else ANSWER_OPEN,
                                          values, pool)
        self._gathered: dict[str, pa.StringArray] = {}
        self.metadata = pa.StructArray.from_arrays([
            batch.column("id"), batch.column("source_pmid"), batch.column("subtree"),
            batch.column("qtype"), batch.column("label"),
            batch.column("hierarchy_score").cast(pa.float64()), _judge(batch)],
            fields=list(ITEM_METADATA))

    def _texts(self, key: str) -> pa.StringArray:
        """The gathered column ``key``: ``conversation`` (system, user, assistant per
        row), ``prompt`` (system, user) or ``contexts`` (the context blocks)."""
        if key not in self._gathered:
            messages: dict[str, list[list[Segment]]] = {
                "conversation": [self.system, self.user, [self.answer_ids]],
                "prompt": [self.system, self.user], "contexts": [[self.contexts]]}
            self._gathered[key] = self.pool.texts(self.n, messages[key])
        return self._gathered[key]

    def column(self, name: str) -> pa.Array:
        return self.batch.column(name)

    def _assistant(self) -> pa.Array:
        answers = self.column("answer")
        labelled = np.flatnonzero(pc.and_(pc.equal(self.column("qtype"), "yesno"),
                                          pc.is_valid(self.column("label")))
                                  .to_numpy(zero_copy_only=False))
        if not len(labelled):
            return answers
        rows = pa.array(labelled)
        # a few short strings per yes/no item: Python keeps str.isalpha's exact meaning
        fixed = [assistant_text("yesno", label, answer) for label, answer in zip(
            self.column("label").take(rows).to_pylist(), answers.take(rows).to_pylist(),
            strict=True)]
        mask = np.zeros(self.n, dtype=np.bool_)
        mask[labelled] = True
        return pc.replace_with_mask(answers, pa.array(mask), pa.array(fixed, pa.string()))

    def table(self, fmt: str) -> pa.Table:
        meta = self.metadata
        if fmt == "sft":
            cols = [_turns(("system", "user", "assistant"), self._texts("conversation")), meta]
        elif fmt == "prompt_completion":
            cols = [_turns(("system", "user"), self._texts("prompt")),
                    _turns(("assistant",), self.assistant), meta]
        elif fmt == "alpaca":
            inputs = _constant("", self.n) if self.closed_book else self._texts("contexts")
            cols = [self.column("question"), inputs, self.assistant, meta]
        elif fmt == "sharegpt":
            cols = [_turns(("system", "human", "gpt"), self._texts("conversation"),
                           SHAREGPT_TURN), meta]
        elif fmt == "qca":
            return self._qca(meta)
        else:
            raise ValueError(f"no item table for format {fmt!r}")
        return pa.Table.from_arrays(cols, schema=SCHEMAS[fmt])

    def _qca(self, meta: pa.StructArray) -> pa.Table:
        col = self.column
        shown = self.shown
        where = pa.array(self.shown_article)
        titles = self.articles.column("title").take(where).combine_chunks()
        texts = self.articles.column("abstract").take(where).combine_chunks()
        contexts = pa.ListArray.from_arrays(self.shown_offsets, pa.StructArray.from_arrays(
            [shown.field("pmid"), titles, texts, shown.field("rank"),
             shown.field("retrieval"), shown.field("hierarchy"), shown.field("blend"),
             shown.field("is_source")], fields=list(CONTEXT)))
        flat = self.stored_contexts.flatten()
        context_pmids = pa.ListArray.from_arrays(_offsets(self.context_lengths),
                                                 flat.field("pmid"))
        mesh = _empty_for_null(col("question_mesh"))
        uis = mesh.flatten()
        trees = self.mesh_trees.of_uis(uis)
        question_mesh = pa.ListArray.from_arrays(_offsets(_lengths(mesh)),
                                                 pa.StructArray.from_arrays(
                                                     [uis, trees], fields=list(MESH_TERM)))
        versions = pa.StructArray.from_arrays(
            [col(f"prompt_{k}") for k in ("generate", "judge", "answer")],
            fields=list(PROMPT_VERSIONS))
        columns = [
            col("id"), col("subtree"), col("source_pmid"), col("profile"),
            col("ordinal").cast(pa.int32()), col("qtype"), col("question"), col("answer_hint"),
            col("evidence"), contexts, context_pmids, col("answer"), col("label"),
            _empty_for_null(col("cited_pmids")).cast(pa.list_(pa.int64())),
            self.answer_evidence, question_mesh,
            col("retrieval_score"), col("hierarchy_score"), col("blend_score"), _judge(self.batch),
            col("judge_rationale"), col("backend"), col("model"), versions, col("run_id"),
            col("params"), meta]
        return pa.Table.from_arrays([_plain(c) for c in columns], schema=SCHEMAS["qca"])


def _plain(arr: pa.Array) -> pa.Array:
    """The array without its field metadata or extension type (ADBC marks JSON)."""
    return arr.storage if isinstance(arr, pa.ExtensionArray) else arr


def pair_table(batch: pa.RecordBatch,
               subtree_info: Mapping[str, tuple[Sequence[str], str | None]]) -> pa.Table:
    """The ``dpo`` table of a batch of ``source.PAIR_ROWS_SQL`` rows. ``subtree_info``
    maps a subtree to its ancestry (root first, itself last) and scope note."""
    n = batch.num_rows
    col = batch.column
    subtrees = pc.dictionary_encode(col("subtree"))
    names = subtrees.dictionary.to_pylist()
    info = [subtree_info.get(s, ([s], None)) for s in names]
    codes = subtrees.indices
    ancestry = pa.array([" > ".join(a) if a else "(not given)" for a, _ in info],
                        pa.string()).take(codes)
    scope = pa.array([s or "(not given)" for _, s in info], pa.string()).take(codes)
    same = pc.equal(col("chosen_type"), col("rejected_type"))
    types = pc.if_else(same, col("chosen_type"), pc.binary_join_element_wise(
        col("chosen_type"), " or ", col("rejected_type"), ""))
    headings = _empty_for_null(col("names"))
    majors = _empty_for_null(col("majors")).flatten()
    starred = pc.if_else(majors, pc.binary_join_element_wise(headings.flatten(), "*", ""),
                         headings.flatten())
    mesh = pc.binary_join(pa.ListArray.from_arrays(_offsets(_lengths(headings)), starred), "; ")
    mesh = pc.if_else(pc.equal(pc.list_value_length(headings), 0), "(none)", mesh)
    pool = Pool()
    prompt = pool.texts(n, segments(QUESTION, {
        "types": pool.add(types), "ancestry": pool.add(ancestry),
        "scope_note": pool.add(scope), "title": pool.add(col("title")), "mesh": pool.add(mesh),
        "pmid": pool.add(col("source_pmid")), "abstract": pool.add(col("abstract"))}, pool))
    meta = pa.StructArray.from_arrays([
        col("chosen_id"), col("rejected_id"), col("source_pmid"), col("subtree"),
        col("chosen_type"), col("chosen_profile"), col("rejected_profile"),
        col("chosen_score"), col("rejected_score"), col("margin")], fields=list(PAIR_METADATA))
    return pa.Table.from_arrays([
        _turns(("system", "user"), prompt),
        _turns(("assistant",), col("chosen")),
        _turns(("assistant",), col("rejected")),
        meta], schema=SCHEMAS["dpo"])
