"""A cooperative model for :class:`tests.fakes.openai_server.FakeOpenAI`.

``realistic_responder(body)`` answers each stage's request the way a model that follows
the prompt would, reading what it needs from the rendered prompt text (the structure of
``include/meshdistill/llm/prompts/*.md``), not from side channels:

- generate: the asked number of questions, of the asked types in turn, each with an
  ``evidence`` sentence copied verbatim from the abstract in the prompt;
- judge: every score 4 (passes the default thresholds) and a short rationale;
- answer: cites the PMIDs of the prompt's contexts (``[PMID n]`` headings), quotes their
  first sentences verbatim, and labels ``yesno`` questions ``yes``.

Deterministic (the same body gives the same text) and robust to JSON mode (the schema
instruction appended to the system message) and to repair rounds (later messages are
ignored: the first system and user messages carry the prompt).

``weak_responder`` is the same model with the questions a small model often writes
(:func:`weak_question`: words of the prompt and of the abstract in no order), their
evidence still quoted verbatim, so they reach retrieval and the later stages.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from typing import Any

from meshdistill.llm.schemas import Question

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])|\n+")
_N_TYPES = re.compile(
    r"Write exactly (\d+) questions, using only these types: ([a-z]+(?:, [a-z]+)*)")
_ABSTRACT = re.compile(r"^Abstract \(PMID (\d+)\):\n", re.MULTILINE)
_CONTEXT = re.compile(r"^\[PMID (\d+)\] [^\n]*\n", re.MULTILINE)
_QTYPE = re.compile(r"^Question type: (\w+)$", re.MULTILINE)
_QUESTION = re.compile(r"^Question: (.*)$", re.MULTILINE)
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9-]+")
# The schema's limit on a question's length, so that weak questions pass validation and
# reach retrieval.
_QUESTION_CHARS = next(m.max_length for m in Question.model_fields["question"].metadata
                       if getattr(m, "max_length", None))
_SCORES = {"groundedness": 4, "relevance": 4, "clarity": 4, "informativeness": 4,
           "safety": 4}


def _first(body: dict[str, Any], role: str) -> str:
    return next((str(m.get("content", "")) for m in body.get("messages", [])
                 if m.get("role") == role), "")


def sentences(text: str) -> list[str]:
    """Sentences of ``text`` long enough to quote (each occurs verbatim in ``text``)."""
    parts = [p.strip() for p in _SENTENCE_END.split(text)]
    usable = [p for p in parts if len(p) >= 20 and not p.endswith(":")]
    return usable or ([text.strip()] if text.strip() else [])


def weak_question(prompt: str, abstract: str, seed: int, max_chars: int | None = None) -> str:
    """10 to 150 words drawn from ``prompt`` and ``abstract`` (a third to two thirds from
    the abstract), shuffled, ending in a question mark: the output of a model too small to
    follow the prompt, from a terse jumble to a ramble. The prompt's words are common ones
    ("questions", "abstract", "evidence") and long questions have many words: what makes
    such questions expensive to retrieve for. ``max_chars`` keeps whole words up to that
    length (question mark included), as a model held to the schema's limit would."""
    rng = random.Random(seed)
    prompt_words, abstract_words = _WORD.findall(prompt), _WORD.findall(abstract)
    n = rng.randint(10, 150)
    from_abstract = min(len(abstract_words), rng.randint(n // 3, 2 * n // 3))
    words = rng.sample(abstract_words, from_abstract) + (
        rng.sample(prompt_words, min(len(prompt_words), n - from_abstract)))
    rng.shuffle(words)
    if max_chars is not None:
        kept, length = [], 0
        for w in words:
            if length + len(w) + 1 >= max_chars:
                break
            kept.append(w)
            length += len(w) + 1
        words = kept or words[:1]
    return " ".join(words).capitalize() + "?"


def _generate(system: str, user: str, *, weak: bool = False) -> dict[str, Any]:
    match = _N_TYPES.search(system)
    n, types = (int(match[1]), match[2].split(", ")) if match else (1, ["factoid"])
    found = _ABSTRACT.search(user)
    abstract = user[found.end():] if found else user
    quotes = sentences(abstract) or ["(empty abstract)"]
    # the two profiles quote different sentences (domain from the start, general from the
    # end), so their candidates differ as two models' would
    general = "reading-comprehension" in system
    questions = []
    for i in range(n):
        kind = types[i % len(types)]
        evidence = quotes[-1 - i % len(quotes)] if general else quotes[i % len(quotes)]
        topic = " ".join(evidence.rstrip(".").split()[:12])
        stem = {"yesno": "Is it reported that", "factoid": "What is reported about",
                "list": "Which findings are listed regarding",
                "summary": "Summarize what is known about"}.get(kind, "What about")
        if general:
            stem = f"For students: {stem[0].lower()}{stem[1:]}"
        question = f"{stem} {topic} (item {i + 1})?"
        if weak:
            question = weak_question(system, abstract, zlib.crc32(
                f"{general} {i} {abstract}".encode()), max_chars=_QUESTION_CHARS)
        questions.append({
            "type": kind,
            "question": question,
            "answer_hint": "yes" if kind == "yesno" else None,
            "evidence": evidence,
        })
    return {"questions": questions}


def _answer(user: str) -> dict[str, Any]:
    qtype = (m[1] if (m := _QTYPE.search(user)) else "factoid")
    heads = list(_CONTEXT.finditer(user))
    cited, evidence = [], []
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(user)
        quotes = sentences(user[head.end():end])
        cited.append(head[1])
        if quotes:
            evidence.append(quotes[0])
    question = (m[1] if (m := _QUESTION.search(user)) else "the question")
    return {
        "answer": f"According to the contexts: {evidence[0] if evidence else question}",
        "label": "yes" if qtype == "yesno" else None,
        "cited_pmids": cited[:20],
        "evidence": evidence[:20],
    }


def realistic_responder(body: dict[str, Any], *, weak: bool = False) -> str:
    """The assistant message content for one chat-completions request body."""
    system, user = _first(body, "system"), _first(body, "user")
    if "You are a strict reviewer" in system:
        out: dict[str, Any] = {**_SCORES, "rationale": "Grounded in the contexts and on topic."}
    elif "You answer biomedical questions" in system:
        out = _answer(user)
    elif "questions" in system and "Abstract (PMID" in user:
        out = _generate(system, user, weak=weak)
    else:
        out = {}
    return json.dumps(out)


def weak_responder(body: dict[str, Any]) -> str:
    """:func:`realistic_responder` whose questions are :func:`weak_question`s."""
    return realistic_responder(body, weak=True)
