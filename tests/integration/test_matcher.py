"""MeSH(question): descriptor names and entry terms found in question text.

Most tests use the session database with the 2023 trees, 2017 UIs and the desc-samples
entry terms; a few use a plain dict to pin the matching rules.
"""

from __future__ import annotations

import itertools

import pytest
from meshdistill.mesh.matcher import MeshMatcher, load_tree_numbers
from meshdistill.mesh.similarity import TreeIndex, hierarchy_score
from meshdistill.store import connect
from sqlalchemy import Connection, text

pytestmark = pytest.mark.integration

QUESTIONS = [
    "Is tamoxifen effective for breast neoplasms in postmenopausal women?",
    "Does paracetamol reduce fever in children with influenza?",
    "Which genes are mutated in hereditary breast and ovarian cancer?",
    "What is the role of insulin resistance in type 2 diabetes mellitus?",
    "Can A-23187 induce apoptosis in human lymphocytes?",
    "Is ampicillin used to treat neonatal sepsis?",
    "Are statins associated with a lower risk of myocardial infarction in the elderly?",
    "What are the side effects of ofloxacin in patients with renal failure?",
]


@pytest.fixture(scope="module")
def matcher(mesh_loaded_url: str) -> MeshMatcher:
    with connect(mesh_loaded_url) as conn:
        return MeshMatcher.from_db(conn)


def ui_of(conn: Connection, name: str) -> str:
    return str(
        conn.execute(
            text("SELECT ui FROM mesh_descriptor WHERE name = :n"), {"n": name}
        ).scalar_one()
    )


@pytest.fixture(scope="module")
def uis(mesh_loaded_url: str) -> dict[str, str]:
    with connect(mesh_loaded_url) as conn:
        return {
            n: ui_of(conn, n)
            for n in ["Breast Neoplasms", "Neoplasms", "Breast", "Tamoxifen", "Calcimycin"]
        }


def test_longest_match_wins(matcher: MeshMatcher, uis: dict[str, str]) -> None:
    q = "Is tamoxifen effective for breast neoplasms in postmenopausal women?"
    found = matcher.find(q)
    by_text = {m.text.lower(): m.uis for m in found}
    assert by_text["breast neoplasms"] == (uis["Breast Neoplasms"],)
    assert by_text["tamoxifen"] == (uis["Tamoxifen"],)
    got = matcher.uis(q)
    assert uis["Neoplasms"] not in got and uis["Breast"] not in got
    for m in found:
        assert q[m.start : m.end] == m.text
    # spans never overlap
    assert all(a.end <= b.start for a, b in itertools.pairwise(found))


def test_shorter_terms_match_alone_case_and_plural(
    matcher: MeshMatcher, uis: dict[str, str]
) -> None:
    got = matcher.uis("Are NEOPLASMS of the Breast hereditary?")
    assert uis["Neoplasms"] in got and uis["Breast"] in got
    assert uis["Breast Neoplasms"] not in got  # words not adjacent
    assert matcher.uis("Is a breast neoplasm always malignant?")[:1] == [uis["Breast Neoplasms"]]
    # whole words only: no match inside a longer word
    assert uis["Neoplasms"] not in matcher.uis("Is it antineoplasmsx?")


def test_entry_terms_map_to_their_descriptor(matcher: MeshMatcher, uis: dict[str, str]) -> None:
    calcimycin = uis["Calcimycin"]
    assert calcimycin == "D000001"
    for q, spelled in [
        ("Can A-23187 raise calcium?", "A-23187"),  # 'calcium' is matched too (Calcium)
        ("Is a23187 toxic?", "a23187"),
        ("Does A 23187 work?", "A 23187"),
    ]:
        first = matcher.find(q)[0]
        assert (first.text, first.uis) == (spelled, (calcimycin,)), q
    m = matcher.find("What does antibiotic A23187 do?")
    assert [(x.text, x.uis) for x in m] == [("antibiotic A23187", (calcimycin,))]
    with_cancer = matcher.uis("Does paracetamol cause cancer?")
    assert with_cancer == ["D000082", uis["Neoplasms"]]  # Acetaminophen, Neoplasms


def test_unrelated_sentence_has_no_match(matcher: MeshMatcher) -> None:
    assert matcher.find("Please send the invoice before Friday afternoon.") == []
    assert matcher.find("") == []


def test_subset_and_tree_numbers_feed_the_score(mesh_loaded_url: str, uis: dict[str, str]) -> None:
    subset = [uis["Breast Neoplasms"], uis["Tamoxifen"]]
    with connect(mesh_loaded_url) as conn:
        small = MeshMatcher.from_db(conn, uis=subset)
        trees = load_tree_numbers(conn, uis=[*subset, uis["Neoplasms"]])
        all_trees = load_tree_numbers(conn)
    q = "Is tamoxifen effective for breast neoplasms and other cancer?"
    assert small.uis(q) == [uis["Tamoxifen"], uis["Breast Neoplasms"]]  # no 'cancer' here
    assert small.names[uis["Breast Neoplasms"]] == "Breast Neoplasms"
    assert sorted(trees[uis["Breast Neoplasms"]]) == ["C04.588.180", "C17.800.090.500"]
    assert trees[uis["Neoplasms"]] == ["C04"]
    assert len(all_trees) > 25_000
    index = TreeIndex(trees)
    # source {BN}, contexts {Neoplasms}: BMA = sim = 2·1/(1+3) = 0.5;
    # question {Tamoxifen, BN} vs source {BN}: rows T 0, BN 1 -> 1/2; col BN 1 -> 1; BMA 3/4
    score = hierarchy_score([uis["Breast Neoplasms"]], [uis["Neoplasms"]], small.uis(q), index)
    assert score == pytest.approx(0.5 * 0.5 + 0.5 * 0.75)


def test_dict_built_matcher_rules() -> None:
    m = MeshMatcher.from_terms(
        {
            "D1": ["Neoplasms", "Cancer"],
            "D2": ["Breast Neoplasms"],
            "D3": ["AIDS", "Acquired Immunodeficiency Syndrome"],
            "D4": ["Aid"],  # an exact term wins over another term's number variant
            "D5": ["Sjögren's Syndrome"],
            "D6": ["T"],  # too short to index
        }
    )
    assert m.uis("Breast neoplasms, and other neoplasm types") == ["D2", "D1"]
    assert m.uis("first aid for aids") == ["D4", "D3"]
    assert m.uis("Is sjogren's syndrome autoimmune?") == ["D5"]
    assert m.uis("T cells") == []
    assert m.term_count >= 6


def test_every_sample_question_names_a_descriptor(matcher: MeshMatcher) -> None:
    assert matcher.term_count > 50_000  # spellings of the names and entry terms loaded
    assert all(matcher.find(q) for q in QUESTIONS), [q for q in QUESTIONS if not matcher.find(q)]
