"""A deterministic, network-free backend: extractive questions, answers and a heuristic judge.

It is a labelled baseline (``backend='offline'``, ``model='offline-extractive-v1'``), not
a stand-in that pretends to be a model: the demo and the tests run the whole pipeline
with it on a machine without keys or internet, and every record it makes says so.

Everything it writes is taken from the text: evidence sentences are verbatim sentences of
the abstract (or of a context), questions are built from those sentences, the title and
the MeSH headings. There is no randomness and no dependence on time or process, so the
same request always gives the same output. The two generator profiles pick sentences
differently (``domain`` by overlap with the MeSH headings, ``general`` by position and
result cues), so the MeSH-hierarchy grade has two distinct candidates to prefer between.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ValidationError

from meshdistill.llm.backend import FailureKind, LLMRequest, LLMResult, T
from meshdistill.llm.inputs import (
    AnswerInput,
    ArticleInput,
    GenerateInput,
    JudgeInput,
    Passage,
    split_sentences,
)
from meshdistill.llm.schemas import (
    Answer,
    AnswerLabel,
    GeneratedQuestions,
    Judgement,
    Question,
    QuestionType,
)

OFFLINE_MODEL = "offline-extractive-v1"

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9\-]+|[0-9]+(?:\.[0-9]+)?")
_LABEL = re.compile(r"^[A-Z][A-Z /&]{2,40}:\s*")  # structured-abstract labels: "RESULTS: "
STOPWORDS = frozenset(
    """a about after all also an and any are as at be been before being between both but by
    can could did do does during each either for from had has have how however if in into is
    it its may might more most no nor not of on or other our over such than that the their
    them then there these they this those through to under using was we were what when where
    which while who whom why will with within would was were study studies patients results
    method methods conclusion conclusions background objective objectives""".split()  # noqa: SIM905
)
_RESULT_CUES = ("significant", "associated", "increase", "decrease", "reduc", "improv",
                "higher", "lower", "risk", "%", "correlat", "predict", "effective")
_CONCLUSION_CUES = ("conclusion", "these results", "these findings", "we conclude", "suggest",
                    "in summary", "our data", "indicate")
_NEGATION = re.compile(r"\b(no|not|did not|does not|without|neither|nor|failed to)\b", re.I)
_HEDGE = re.compile(r"\b(may|might|could|possibly|unclear|uncertain|remains? to be)\b", re.I)
_UNSAFE = re.compile(
    r"\b(lethal dose|overdose|suicide method|how to (?:make|synthesi[sz]e)|weapon|bioweapon"
    r"|poison(?:ing)? someone)\b", re.I,
)
# Sentences that state an aim or a method, not a finding: "To assess ...", "The aim of this
# study was ...", "We investigated ...". A yes/no question built from them asks nothing.
_NOT_A_CLAIM = re.compile(
    r"^(?:[A-Z][A-Z /&]{2,40}:\s*)?(?:to\s|the\s(?:aim|purpose|objective|goal)s?\b|"
    r"(?:this|the present|our)\s(?:study|trial|review|paper)\s(?:aim|was designed|sought)|"
    r"we\s(?:aimed|sought|investigated|examined|evaluated|assessed|studied)\b)", re.I)
_DANGLING = re.compile(r"\b(this study|the authors|the abstract|this article|this paper)\b", re.I)


def content_words(text: str) -> set[str]:
    """Lower-cased words that carry meaning (stopwords and one-letter words dropped)."""
    return {w.lower() for w in _WORD.findall(text) if w.lower() not in STOPWORDS and len(w) > 2}


def _clause(sentence: str) -> str:
    """A sentence made into a clause: label dropped, first letter lowered, stop removed."""
    body = _LABEL.sub("", sentence).rstrip(" .!?;:")
    if len(body) > 1 and not (body[:2].isupper() or body[1].isdigit()):
        body = body[0].lower() + body[1:]
    return body


def _mesh_hits(text: str, names: Iterable[str]) -> list[str]:
    lowered = text.lower()
    return [n for n in names if n.lower() in lowered]


def _mesh_overlap(text: str, article: ArticleInput) -> float:
    """Share of the article's MeSH heading words (majors twice) that occur in ``text``."""
    words = content_words(text)
    weight = hit = 0.0
    for heading in article.mesh:
        w = 2.0 if heading.major else 1.0
        terms = content_words(heading.name)
        if not terms:
            continue
        weight += w
        hit += w * len(terms & words) / len(terms)
    return hit / weight if weight else 0.0


def _to_score(x: float) -> int:
    """Map [0, 1] to 1..5."""
    return max(1, min(5, 1 + round(4 * max(0.0, min(1.0, x)))))


class OfflineBackend:
    """Extractive generator, heuristic judge and extractive answerer, all deterministic."""

    name = "offline"

    def __init__(self, model: str = OFFLINE_MODEL) -> None:
        self.model = model

    async def complete(self, request: LLMRequest[T]) -> LLMResult[T]:
        """Serve ``request`` from its structured inputs; failures are results, not raises."""
        start = time.perf_counter()
        result: LLMResult[T] = LLMResult.for_request(
            request, self.name, self.model, attempts=1, response_format="offline")
        produced: BaseModel
        inp = request.inputs
        if isinstance(inp, GenerateInput):
            produced = generate_questions(inp)
        elif isinstance(inp, JudgeInput):
            produced = judge(inp)
        elif isinstance(inp, AnswerInput):
            produced = answer(inp)
        else:
            result.failure = FailureKind.UNSUPPORTED
            result.error = "offline backend needs the request's structured inputs"
            result.latency_ms = (time.perf_counter() - start) * 1000
            return result
        result.raw_text = produced.model_dump_json()
        try:
            result.output = request.output_model.model_validate_json(result.raw_text)
        except ValidationError as exc:  # e.g. a generate request with the judge's model
            result.failure = FailureKind.INVALID_OUTPUT
            result.error = str(exc)
        result.latency_ms = (time.perf_counter() - start) * 1000
        return result


# -- generate ------------------------------------------------------------------------------


def _is_claim(sentence: str) -> bool:
    return not _NOT_A_CLAIM.match(sentence)


def _rank_domain(sentences: Sequence[str], article: ArticleInput) -> list[int]:
    scores = [(_is_claim(s), _mesh_overlap(s, article), -i) for i, s in enumerate(sentences)]
    return [-neg for *_, neg in sorted(scores, reverse=True)]


def _rank_general(sentences: Sequence[str]) -> list[int]:
    def score(i: int) -> tuple[bool, int, int]:
        low = sentences[i].lower()
        cues = sum(c in low for c in _RESULT_CUES) + 2 * sum(c in low for c in _CONCLUSION_CUES)
        return _is_claim(sentences[i]), cues, i  # findings first; later sentences win ties

    return sorted(range(len(sentences)), key=score, reverse=True)


def _topic(article: ArticleInput) -> str:
    majors = [h.name for h in article.mesh if h.major]
    if majors:
        return majors[0]
    if article.mesh:
        return article.mesh[0].name
    return article.ancestry[-1] if article.ancestry else "this topic"


def _make_question(
    qtype: QuestionType, sentence: str, article: ArticleInput, profile: str,
    sentences: Sequence[str],
) -> Question:
    clause = _clause(sentence)
    topic = _topic(article)
    hits = _mesh_hits(article.abstract, (h.name for h in article.mesh))
    title = article.title.rstrip(" .?!")
    if qtype is QuestionType.YESNO:
        text = (f"In {topic.lower()}, is there evidence that {clause}?" if profile == "domain"
                else f"Is it true that {clause}?")
        hint: str | None = "yes"
    elif qtype is QuestionType.FACTOID:
        text = (f"Which MeSH topic is the main subject of research on \"{title}\"?"
                if profile == "domain" else f"What was investigated in the study \"{title}\"?")
        hint = topic if profile == "domain" else title
        title_words = content_words(article.title)
        sentence = max(sentences, key=lambda s: (len(content_words(s) & title_words), -len(s)))
    elif qtype is QuestionType.LIST:
        text = (f"Which {topic.lower()}-related concepts are reported together in work on "
                f"\"{title}\"?" if profile == "domain"
                else f"Which findings are reported about \"{title}\"?")
        hint = ", ".join(hits) if hits else None
        if hits:
            sentence = max(sentences, key=lambda s: (len(_mesh_hits(s, hits)), -len(s)))
    else:
        text = (f"What do the findings on \"{title}\" show about {topic.lower()}?"
                if profile == "domain" else f"What are the main findings about \"{title}\"?")
        hint = _clause(sentence)
    return Question(type=qtype, question=text[:600], answer_hint=hint, evidence=sentence)


def generate_questions(inp: GenerateInput) -> GeneratedQuestions:
    """Extractive questions of the requested types, one distinct evidence sentence each.

    Types are used round-robin up to ``n_questions``; a yes/no or summary question takes
    the next best unused sentence of the profile's ranking, so candidates differ.
    """
    article = inp.article
    sentences = split_sentences(article.abstract) or [article.abstract.strip() or article.title]
    order = (_rank_domain(sentences, article) if inp.profile == "domain"
             else _rank_general(sentences))
    types = inp.question_types
    questions: list[Question] = []
    for n in range(inp.question_count):
        sentence = sentences[order[n % len(order)]]
        questions.append(_make_question(types[n % len(types)], sentence, article, inp.profile,
                                        sentences))
    return GeneratedQuestions(questions=questions)


# -- judge ---------------------------------------------------------------------------------


def judge(inp: JudgeInput) -> Judgement:
    """Heuristic 1–5 scores; the rationale gives the measured quantities.

    groundedness: share of the question's content words found in the contexts, and
    whether its evidence sentence occurs verbatim in one; relevance: MeSH heading (and
    subtree ancestry) words in the question and evidence; clarity: length, a question
    mark, no references to "this study"; informativeness: distinct content words;
    safety: 5 unless a small list of harmful phrases occurs.
    """
    q = inp.question
    contexts = inp.contexts or (Passage(inp.article.pmid, inp.article.title, inp.article.abstract),)
    context_text = " ".join(f"{p.title} {p.text}" for p in contexts)
    q_words = content_words(q.question)
    covered = len(q_words & content_words(context_text)) / len(q_words) if q_words else 0.0
    verbatim = any(q.evidence in p.text for p in contexts)
    grounded = 0.6 * covered + (0.4 if verbatim else 0.0)

    topical = content_words(" ".join([*(h.name for h in inp.article.mesh), *inp.article.ancestry]))
    mesh_share = _mesh_overlap(f"{q.question} {q.evidence}", inp.article)
    ancestry_hit = bool(topical & content_words(q.question))
    relevance = min(1.0, mesh_share + (0.25 if ancestry_hit else 0.0))

    n_words = len(q.question.split())
    clarity = 1.0
    if not q.question.rstrip().endswith("?"):
        clarity -= 0.3
    if n_words < 6 or n_words > 45:
        clarity -= 0.3
    if _DANGLING.search(q.question):
        clarity -= 0.4
    informative = min(1.0, len(q_words) / 10)
    safety = 1 if _UNSAFE.search(f"{q.question} {q.answer_hint or ''}") else 5

    return Judgement(
        groundedness=_to_score(grounded),
        relevance=_to_score(relevance),
        clarity=_to_score(clarity),
        informativeness=_to_score(informative),
        safety=safety,
        rationale=(
            f"offline heuristic: {covered:.0%} of question words in contexts, evidence "
            f"{'verbatim' if verbatim else 'not found'} in contexts; MeSH overlap "
            f"{mesh_share:.2f}; {n_words} words; {len(q_words)} content words"
        ),
    )


# -- answer --------------------------------------------------------------------------------


def answer(inp: AnswerInput, max_evidence: int = 2) -> Answer:
    """Extractive answer: the context sentences that best overlap the question.

    The question's own evidence sentence ranks first when a context contains it. For
    ``yesno`` the label comes from the top sentence: hedging words → maybe, negation →
    no, otherwise yes.
    """
    q = inp.question
    q_words = content_words(f"{q.question} {q.answer_hint or ''}")
    scored: list[tuple[float, int, str, str]] = []
    order = 0
    for passage in inp.contexts:
        for sentence in split_sentences(passage.text) or [passage.text.strip()]:
            if not sentence:
                continue
            overlap = len(q_words & content_words(sentence)) / (len(q_words) or 1)
            bonus = 1.0 if sentence == q.evidence or q.evidence in sentence else 0.0
            scored.append((overlap + bonus, -order, passage.pmid, sentence))
            order += 1
    if not scored:
        return Answer(answer="The contexts given do not contain an answer.",
                      label=AnswerLabel.MAYBE if q.type is QuestionType.YESNO else None,
                      cited_pmids=[], evidence=[])
    best = sorted(scored, reverse=True)[:max_evidence]
    evidence = [s for *_, s in best]
    pmids = list(dict.fromkeys(p for _, _, p, _ in best))
    label: AnswerLabel | None = None
    if q.type is QuestionType.YESNO:
        top = evidence[0]
        label = (AnswerLabel.MAYBE if _HEDGE.search(top)
                 else AnswerLabel.NO if _NEGATION.search(top) else AnswerLabel.YES)
        text = f"{label.value.capitalize()}. {_LABEL.sub('', top)}"
    elif q.type is QuestionType.SUMMARY:
        text = " ".join(_LABEL.sub("", s) for s in evidence)
    else:
        text = q.answer_hint or _LABEL.sub("", evidence[0])
    return Answer(answer=text[:4000], label=label, cited_pmids=pmids, evidence=evidence)
