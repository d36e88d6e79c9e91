"""The column-wise export formatting gives exactly what the per-item functions give."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from meshdistill.export.compose import Pool
from meshdistill.export.records import (
    ANSWER_CLOSED,
    ANSWER_OPEN,
    QUESTION,
    ItemBatch,
    MeshTrees,
    assistant_text,
    pair_table,
    segments,
)
from meshdistill.export.schemas import JUDGE_CRITERIA
from meshdistill.llm import prompts
from meshdistill.llm.inputs import ArticleInput, MeshHeading, Passage
from meshdistill.llm.stages import format_ancestry, format_contexts, format_mesh

ARTICLES = {11: ("Tamoxifen and recurrence", "Tamoxifen lowered recurrence. $5 a dose."),
            12: ("", "An abstract without a title."),
            13: ("Radiotherapy", "Adjuvant radiotherapy {braces} and 100% survival.")}


def _contexts(*pmids: int) -> str:
    return json.dumps([{"pmid": p, "rank": i, "retrieval": 0.5, "hierarchy": 0.25,
                        "blend": 0.375, "is_source": i == 0, "extra": "ignored"}
                       for i, p in enumerate(pmids)])


ROWS: list[dict[str, Any]] = [
    {"qtype": "yesno", "label": "yes", "answer": "Yes, it does [PMID 11].",
     "contexts": _contexts(11, 12)},
    {"qtype": "yesno", "label": "no", "answer": "Nothing reduces it.", "contexts": _contexts(13)},
    {"qtype": "yesno", "label": "maybe", "answer": "Maybe-ish; unclear.",
     "contexts": _contexts(99, 11)},  # 99 is not stored: left out
    {"qtype": "yesno", "label": "no", "answer": "Nobody knows.", "contexts": None},
    {"qtype": "factoid", "label": None, "answer": "ER-positive $x cancers.",
     "contexts": "[]"},
]


def _item_batch_rows() -> pa.RecordBatch:
    n = len(ROWS)
    columns: dict[str, pa.Array] = {
        "id": pa.array(range(1, n + 1), pa.int64()),
        "subtree": pa.array(["C04"] * n), "source_pmid": pa.array([11, 13, 11, 12, 13],
                                                                   pa.int64()),
        "profile": pa.array(["domain"] * n), "ordinal": pa.array(range(n), pa.int32()),
        "qtype": pa.array([r["qtype"] for r in ROWS]),
        "question": pa.array([f"Does $drug {i} reduce {{x}} recurrence?" for i in range(n)]),
        "answer_hint": pa.array([None] * n, pa.string()),
        "evidence": pa.array(["Tamoxifen lowered recurrence."] * n),
        "contexts": pa.array([r["contexts"] for r in ROWS], pa.string()),
        "answer": pa.array([r["answer"] for r in ROWS]),
        "label": pa.array([r["label"] for r in ROWS], pa.string()),
        "cited_pmids": pa.array([[11], None, [], [12, 13], [13]], pa.list_(pa.int64())),
        "answer_evidence": pa.array(['["a", "b"]', None, "[]", '["c"]', "null"], pa.string()),
        "question_mesh": pa.array([["D000001"], ["D000002", "D404"], None, [], ["D000001"]],
                                  pa.list_(pa.string())),
        "retrieval_score": pa.array([0.5] * n, pa.float64()),
        "hierarchy_score": pa.array([0.2, 0.4, None, 0.6, 0.8], pa.float64()),
        "blend_score": pa.array([0.3] * n, pa.float64()),
        **{f"judge_{c}": pa.array([4, 3, None, 5, 2], pa.int16()) for c in JUDGE_CRITERIA},
        "judge_rationale": pa.array(["fine"] * n),
        "backend": pa.array(["offline"] * n), "model": pa.array(["m"] * n),
        "prompt_generate": pa.array(["generate_domain_v1"] * n),
        "prompt_judge": pa.array(["judge_v1"] * n), "prompt_answer": pa.array(["answer_v1"] * n),
        "run_id": pa.array(["r"] * n), "params": pa.array(['{"k": 3}'] * n),
    }
    return pa.RecordBatch.from_pydict(columns)


def _articles(pmids: np.ndarray) -> pa.Table:
    found = sorted({int(p) for p in pmids} & set(ARTICLES))
    return pa.table({"pmid": pa.array(found, pa.int64()),
                     "title": [ARTICLES[p][0] for p in found],
                     "abstract": [ARTICLES[p][1] for p in found]})


TREES = MeshTrees.of({"D000001": ["C04.001", "C04.002"], "D000002": ["C14"]})


@pytest.mark.parametrize("closed_book", [False, True])
def test_item_texts_equal_render_and_format_contexts(closed_book: bool) -> None:
    rows = _item_batch_rows()
    batch = ItemBatch(rows, closed_book=closed_book, mesh_trees=TREES, articles=_articles)
    sft = batch.table("sft").to_pylist()
    for i, r in enumerate(ROWS):
        stored = json.loads(r["contexts"] or "[]")
        passages = [Passage(str(c["pmid"]), *ARTICLES[c["pmid"]]) for c in stored
                    if c["pmid"] in ARTICLES]
        block = format_contexts(passages)
        question = rows.column("question")[i].as_py()
        rendered = prompts.render(ANSWER_CLOSED if closed_book else ANSWER_OPEN,
                                  {"question": question, "contexts": block}).messages
        answer = assistant_text(r["qtype"], r["label"], r["answer"])
        assert sft[i]["messages"] == [
            {"role": "system", "content": rendered[0]["content"]},
            {"role": "user", "content": rendered[1]["content"]},
            {"role": "assistant", "content": answer}]
        alpaca = batch.table("alpaca").to_pylist()[i]
        assert alpaca["input"] == ("" if closed_book else block)
        assert alpaca["output"] == answer
    assert [m["messages"][2]["content"] for m in sft][:4] == [
        "Yes, it does [PMID 11].", "No. Nothing reduces it.", "Maybe-ish; unclear.",
        "No. Nobody knows."]


def test_qca_keeps_provenance_and_drops_unstored_contexts() -> None:
    batch = ItemBatch(_item_batch_rows(), closed_book=False, mesh_trees=TREES,
                      articles=_articles)
    qca = batch.table("qca").to_pylist()
    assert [[c["pmid"] for c in r["contexts"]] for r in qca] == [[11, 12], [13], [11], [], []]
    assert [r["context_pmids"] for r in qca] == [[11, 12], [13], [99, 11], [], []]
    first = qca[0]["contexts"][0]
    assert first == {"pmid": 11, "title": ARTICLES[11][0], "text": ARTICLES[11][1], "rank": 0,
                     "retrieval": 0.5, "hierarchy": 0.25, "blend": 0.375, "is_source": True}
    assert qca[1]["question_mesh"] == [{"ui": "D000002", "tree_numbers": ["C14"]},
                                       {"ui": "D404", "tree_numbers": []}]
    assert [r["cited_pmids"] for r in qca] == [[11], [], [], [12, 13], [13]]
    assert [r["answer_evidence"] for r in qca] == [["a", "b"], [], [], ["c"], []]
    assert qca[2]["judge"] == dict.fromkeys(JUDGE_CRITERIA)
    assert qca[0]["prompt_versions"] == {"generate": "generate_domain_v1", "judge": "judge_v1",
                                         "answer": "answer_v1"}
    assert qca[3]["metadata"]["hierarchy_score"] == 0.6


def test_pair_prompt_equals_render_of_the_question_template() -> None:
    n = 3
    rows = pa.RecordBatch.from_pydict({
        "id": pa.array([1, 2, 3], pa.int64()), "subtree": ["C04", "C14.280", "C04"],
        "source_pmid": pa.array([11, 12, 13], pa.int64()),
        "chosen_id": pa.array([1, 3, 5], pa.int64()),
        "rejected_id": pa.array([2, 4, 6], pa.int64()),
        "chosen_score": [0.9, 0.8, 0.7], "rejected_score": [0.5, 0.4, 0.3],
        "margin": [0.4, 0.4, 0.4], "chosen_type": ["yesno", "factoid", "list"],
        "chosen_profile": ["domain"] * n, "chosen": ["Q1 $a?", "Q2?", "Q3?"],
        "rejected_type": ["yesno", "summary", "list"], "rejected_profile": ["general"] * n,
        "rejected": ["R1?", "R2?", "R3?"], "title": ["T $1", "", "T3"],
        "abstract": ["A1 {x}", "A2", "A3"],
        "names": pa.array([["Neoplasms", "Humans"], None, []], pa.list_(pa.string())),
        "majors": pa.array([[True, False], None, []], pa.list_(pa.bool_())),
    })
    info = {"C04": (["Diseases", "Neoplasms"], "Tumours of any kind."),
            "C14.280": ([], None)}
    table = pair_table(rows, info).to_pylist()
    for i, r in enumerate(rows.to_pylist()):
        ancestry, scope = info[r["subtree"]]
        article = ArticleInput(pmid=str(r["source_pmid"]), title=r["title"],
                               abstract=r["abstract"],
                               mesh=tuple(MeshHeading(nm, mj) for nm, mj in zip(
                                   r["names"] or [], r["majors"] or [], strict=True)),
                               ancestry=tuple(ancestry), scope_note=scope)
        types = (r["chosen_type"] if r["chosen_type"] == r["rejected_type"]
                 else f"{r['chosen_type']} or {r['rejected_type']}")
        rendered = prompts.render(QUESTION, {
            "types": types, "ancestry": format_ancestry(article),
            "scope_note": scope or "(not given)", "title": article.title,
            "mesh": format_mesh(article), "pmid": article.pmid,
            "abstract": article.abstract}).messages
        assert table[i]["prompt"] == [{"role": m["role"], "content": m["content"]}
                                      for m in rendered]
        assert table[i]["chosen"] == [{"role": "assistant", "content": r["chosen"]}]
        assert table[i]["rejected"] == [{"role": "assistant", "content": r["rejected"]}]
        assert table[i]["metadata"]["margin"] == 0.4


def test_a_message_without_variables_repeats_the_template_text() -> None:
    pool = Pool()
    system, user = segments(ANSWER_CLOSED, {"question": pool.add(pa.array(["a?", "b?"]))},
                            pool)
    texts = pool.texts(2, [system, user]).to_pylist()
    rendered = [prompts.render(ANSWER_CLOSED, {"question": q}).messages for q in ("a?", "b?")]
    assert texts == [m["content"] for r in rendered for m in r]
    assert texts[0] == texts[2]
