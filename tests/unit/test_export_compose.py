"""A pool's gathered texts equal the pieces joined in Python, whatever their runs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from meshdistill.export.compose import Joined, Pool


def _joined_in_python(values: list[str], ids: list[list[int]], sep: str, empty: str) -> list[str]:
    return [sep.join(values[i] for i in row) if row else empty for row in ids]


@pytest.mark.parametrize("seed", range(5))
def test_gathered_texts_equal_python_joins(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 40))
    words = ["", "é", "β-blocker", "x" * 300, "[PMID 1] T\nA", "$a {b}"]
    questions = [str(rng.choice(words)) + str(i) for i in range(n)]
    answers = [None if rng.random() < 0.2 else str(rng.choice(words)) for _ in range(n)]
    blocks = [f"block {j} " + str(rng.choice(words)) for j in range(7)]
    runs = [list(rng.integers(0, 7, size=int(rng.integers(0, 4)))) for _ in range(n)]
    pool = Pool()
    block_ids = pool.add(pa.array(blocks))
    q_ids = pool.add(pa.array(questions, pa.string()))
    a_ids = pool.add(pa.array(answers, pa.string()))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(r) for r in runs], out=offsets[1:])
    flat = np.asarray([j for r in runs for j in r], dtype=np.int64)
    joined = Joined(block_ids[flat] if len(flat) else np.zeros(0, np.int64), offsets,
                    pool.literal("\n\n"), pool.literal("(none)"))
    messages = [[pool.literal("You are terse.")],
                [pool.literal("Q: "), q_ids, pool.literal("\nCtx:\n"), joined],
                [a_ids]]
    got = pool.texts(n, messages)
    assert got.type == pa.string() and len(got) == 3 * n
    contexts = _joined_in_python(blocks, [[int(j) for j in r] for r in runs], "\n\n", "(none)")
    want = []
    for i in range(n):
        want += ["You are terse.", f"Q: {questions[i]}\nCtx:\n{contexts[i]}", answers[i] or ""]
    assert got.to_pylist() == want
    got.validate(full=True)


def test_joined_runs_may_start_inside_their_ids() -> None:
    pool = Pool()
    ids = pool.add(pa.array(["a", "b", "c", "d"]))
    runs = Joined(ids, np.array([1, 3, 3, 4], dtype=np.int64), pool.literal("+"),
                  pool.literal("-"))
    assert pool.texts(3, [[runs]]).to_pylist() == ["b+c", "-", "d"]


def test_literals_are_pooled_once() -> None:
    pool = Pool()
    assert pool.literal("x") == pool.literal("x") != pool.literal("y")
    assert pool.texts(2, [[pool.literal("x"), pool.literal("y")]]).to_pylist() == ["xy", "xy"]
