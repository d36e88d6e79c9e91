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
"""

from __future__ import annotations

import json
import re
from typing import Any

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])|\n+")
_N_TYPES = re.compile(
    r"Write exactly (\d+) questions, using only these types: ([a-z]+(?:, [a-z]+)*)")
_ABSTRACT = re.compile(r"^Abstract \(PMID (\d+)\):\n", re.MULTILINE)
_CONTEXT = re.compile(r"^\[PMID (\d+)\] [^\n]*\n", re.MULTILINE)
_QTYPE = re.compile(r"^Question type: (\w+)$", re.MULTILINE)
_QUESTION = re.compile(r"^Question: (.*)$", re.MULTILINE)
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


def _generate(system: str, user: str) -> dict[str, Any]:
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
        questions.append({
            "type": kind,
            "question": f"{stem} {topic} (item {i + 1})?",
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


def realistic_responder(body: dict[str, Any]) -> str:
    """The assistant message content for one chat-completions request body."""
    system, user = _first(body, "system"), _first(body, "user")
    if "You are a strict reviewer" in system:
        out: dict[str, Any] = {**_SCORES, "rationale": "Grounded in the contexts and on topic."}
    elif "You answer biomedical questions" in system:
        out = _answer(user)
    elif "questions" in system and "Abstract (PMID" in user:
        out = _generate(system, user)
    else:
        out = {}
    return json.dumps(out)
