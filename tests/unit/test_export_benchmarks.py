"""Benchmark files and the contamination index the export drops overlapping items with.

The readers run on small hand-written files in ``tests/fixtures/benchmarks`` (PQA-L and
ground-truth shaped, BioASQ with both PubMed URL forms, JSON lines), plain and gzip and
under misleading names; damaged files must raise :class:`BenchmarkError` naming the file
and the fault. The index runs on the real PubMedQA-L in ``data/``: its questions and PMIDs
are caught, unrelated questions are not, and a hit needs a 13-word run, or the whole of a
benchmark question shorter than that.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from meshdistill.errors import ConfigError
from meshdistill.export.benchmarks import (
    NGRAM,
    Benchmark,
    BenchmarkError,
    ContaminationIndex,
    benchmark_name,
    default_benchmarks,
    read_benchmark,
    read_bioasq,
    read_ground_truth,
    read_jsonl,
    read_pqal,
)
from meshdistill.export.text import words

from tests.support import PQAL, PUBMEDQA_DIR

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
PQAL_SMALL = FIXTURES / "pqal_small.json"
GROUND_TRUTH_SMALL = FIXTURES / "ground_truth_small.json"
BIOASQ_SMALL = FIXTURES / "bioasq_small.json"
JSONL_SMALL = FIXTURES / "questions.jsonl"
TEST_GROUND_TRUTH = PUBMEDQA_DIR / "test_ground_truth.json.gz"

Reader = Callable[[Path], Benchmark]
READERS: dict[Path, Reader] = {
    PQAL_SMALL: read_pqal,
    GROUND_TRUTH_SMALL: read_ground_truth,
    BIOASQ_SMALL: read_bioasq,
    JSONL_SMALL: read_jsonl,
}

# Words that occur in no PubMedQA-L question, to pad runs taken from one.
FILLER = ["zebrafish", "xylophone", "quokka"]


def _pqal_questions() -> dict[int, str]:
    data = json.loads(gzip.decompress(PQAL.read_bytes()))
    return {int(pmid): record["QUESTION"] for pmid, record in data.items()}


@pytest.fixture(scope="module")
def pubmedqa() -> ContaminationIndex:
    return ContaminationIndex(default_benchmarks())


@pytest.fixture(scope="module")
def questions() -> dict[int, str]:
    return _pqal_questions()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- the readers ---------------------------------------------------------------------------


def test_read_pqal() -> None:
    bench = read_pqal(PQAL_SMALL)
    assert bench.name == "pqal_small"
    assert bench.path == str(PQAL_SMALL)
    assert bench.pmids == {90000001, 90000002, 90000003}
    assert bench.questions == (
        "Does early mobilisation after hip fracture surgery reduce the length of hospital "
        "stay in elderly patients?",
        "Is serum ferritin a marker of disease activity?",
        "Are antibiotics overprescribed for acute bronchitis in primary care clinics across "
        "rural and urban regions?",
    )


def test_read_ground_truth_gives_pmids_only() -> None:
    bench = read_ground_truth(GROUND_TRUTH_SMALL, name="labels")
    assert bench == Benchmark("labels", str(GROUND_TRUTH_SMALL),
                              frozenset({90000001, 90000003, 90000007}), ())


def test_read_bioasq_takes_pmids_from_both_url_forms() -> None:
    bench = read_bioasq(BIOASQ_SMALL)
    # http and https, www.ncbi.nlm.nih.gov/pubmed/ and pubmed.ncbi.nlm.nih.gov/, slash or not
    assert bench.pmids == {91000001, 91000002, 91000003, 91000004}
    assert bench.questions == (
        "Is the protein Papilin secreted?",
        "Which gene is mutated in the majority of patients with hereditary haemorrhagic "
        "telangiectasia type 1?",
        "What is the mechanism of action of bortezomib?",  # no documents: a question only
    )


def test_read_jsonl_with_and_without_pmid() -> None:
    bench = read_jsonl(JSONL_SMALL)
    assert bench.name == "questions"
    assert bench.pmids == {92000001, 92000002}  # an int and a digit string; none, null
    assert len(bench.questions) == 4  # the blank line is skipped
    assert bench.questions[3] == "Can metformin delay the onset of type 2 diabetes?"


@pytest.mark.parametrize("fixture", list(READERS), ids=lambda p: p.name)
def test_readers_take_plain_and_gzip_alike(fixture: Path, tmp_path: Path) -> None:
    read = READERS[fixture]
    expected = read(fixture)
    gz = tmp_path / (fixture.name + ".gz")
    gz.write_bytes(gzip.compress(fixture.read_bytes()))
    gzip_plain_name = tmp_path / "gzip" / fixture.name  # gzip under a plain name
    gzip_plain_name.parent.mkdir()
    shutil.copyfile(gz, gzip_plain_name)
    plain_gz_name = tmp_path / "plain" / gz.name  # plain under a .gz name
    plain_gz_name.parent.mkdir()
    shutil.copyfile(fixture, plain_gz_name)
    for path in (gz, gzip_plain_name, plain_gz_name):
        for got in (read(path), read_benchmark(path)):
            assert got.path == str(path)
            assert (got.name, got.pmids, got.questions) == (
                expected.name, expected.pmids, expected.questions), path


@pytest.mark.parametrize("fixture", list(READERS), ids=lambda p: p.name)
def test_read_benchmark_detects_the_kind_by_content(fixture: Path) -> None:
    assert read_benchmark(fixture) == READERS[fixture](fixture)


def test_a_bioasq_file_named_jsonl_is_read_as_bioasq(tmp_path: Path) -> None:
    misnamed = tmp_path / "bioasq.jsonl"
    shutil.copyfile(BIOASQ_SMALL, misnamed)
    bench = read_benchmark(misnamed)
    assert bench.name == "bioasq"
    assert (bench.pmids, bench.questions) == (read_bioasq(BIOASQ_SMALL).pmids,
                                              read_bioasq(BIOASQ_SMALL).questions)


def test_a_one_line_jsonl_file_is_read_as_json_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.json", '{"question": "Is it safe?", "pmid": 7}\n')
    assert read_benchmark(path) == Benchmark("one", str(path), frozenset({7}), ("Is it safe?",))


def test_names_default_to_the_stem_without_data_endings() -> None:
    assert benchmark_name("/x/bioasq_task12b.jsonl.gz") == "bioasq_task12b"
    assert benchmark_name("ori_pqal.json.gz") == "ori_pqal"
    assert benchmark_name("BioASQ-training12b.v2.json") == "BioASQ-training12b.v2"
    assert read_benchmark(JSONL_SMALL, name="mine").name == "mine"


# --- malformed files -----------------------------------------------------------------------


def test_benchmark_errors_are_config_errors() -> None:
    assert issubclass(BenchmarkError, ConfigError)


MALFORMED: dict[str, tuple[str, str]] = {
    # file content, what the message must say besides the file
    "empty": ("", "is empty"),
    "blank": ("\n  \n\n", "is empty"),
    "not-json": ("QUESTION: is it?\n", r"line 1 is not JSON"),
    "jsonl-bad-line": ('{"question": "Is A B?"}\n\n{"question": "Is C D?"\n', "line 3 is not JSON"),
    "jsonl-no-question": ('{"question": "Is A B?"}\n{"pmid": 5}\n', "line 2 has no question"),
    "jsonl-not-object": ('{"question": "Is A B?"}\n["Is C D?"]\n', "line 2 is not a JSON object"),
    "jsonl-bad-pmid": ('{"question": "Is A B?", "pmid": "PMC123"}\n', "line 1 pmid 'PMC123'"),
    "bioasq-no-body": ('{"questions": [{"body": "Is A B?"}, {"documents": []}]}',
                       r"question 2 \(body\) has no question"),
    "bioasq-bad-url": ('{"questions": [{"body": "Is A B?", "documents": ["doi:10.1/x"]}]}',
                       "question 1 document 'doi:10.1/x' is not a PubMed URL"),
    "bioasq-not-list": ('{"questions": {"body": "Is A B?"}}', '"questions" is not a list'),
    "pqal-no-question": ('{"1": {"QUESTION": "Is A B?"}, "2": {"CONTEXTS": []}}',
                         r"PMID 2 \(QUESTION\) has no question"),
    "pqal-bad-key": ('{"PMID1": {"QUESTION": "Is A B?"}}', "key 'PMID1' is not a PMID"),
    "json-array": ('[{"question": "Is A B?"}]', "not PubMedQA, BioASQ"),
    "json-mixed-values": ('{"1": "yes", "2": {"QUESTION": "Is A B?"}}', "not PubMedQA, BioASQ"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_files_name_the_file_and_the_fault(kind: str, tmp_path: Path) -> None:
    content, fault = MALFORMED[kind]
    path = _write(tmp_path / f"{kind}.json", content)
    with pytest.raises(BenchmarkError, match=fault) as info:
        read_benchmark(path)
    assert str(path) in str(info.value)


def test_specific_readers_refuse_what_is_not_json(tmp_path: Path) -> None:
    path = _write(tmp_path / "pqal.json", "{not json")
    for read in (read_pqal, read_ground_truth, read_bioasq):
        with pytest.raises(BenchmarkError, match=rf"{path} is not JSON"):
            read(path)
    gt = _write(tmp_path / "gt.json", '{"1": ["yes"]}')
    with pytest.raises(BenchmarkError, match="PMID 1 has no label string"):
        read_ground_truth(gt)


def test_missing_and_damaged_files(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match=r"unreadable: .*missing\.json.*cannot read"):
        read_benchmark(tmp_path / "missing.json")
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(gzip.compress(PQAL_SMALL.read_bytes())[:40])
    with pytest.raises(BenchmarkError, match=r"cut\.json\.gz: truncated or corrupt gzip"):
        read_benchmark(cut)
    empty_gzip = tmp_path / "empty.jsonl.gz"
    empty_gzip.write_bytes(gzip.compress(b""))
    with pytest.raises(BenchmarkError, match=r"empty\.jsonl\.gz is empty"):
        read_jsonl(empty_gzip)


# --- the in-repo PubMedQA-L ----------------------------------------------------------------


def test_default_benchmarks_are_the_in_repo_pubmedqa_l(questions: dict[int, str]) -> None:
    pqal, test = default_benchmarks()
    assert (pqal.name, pqal.path) == ("pubmedqa_l", str(PQAL))
    assert len(pqal.pmids) == 1000 and len(pqal.questions) == 1000
    assert pqal.pmids == set(questions)
    assert (test.name, test.path) == ("pubmedqa_l_test", str(TEST_GROUND_TRUTH))
    assert len(test.pmids) == 500 and test.questions == ()
    assert test.pmids < pqal.pmids  # the test split lies within PQA-L


def test_default_benchmarks_read_a_plain_data_dir(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pubmedqa").mkdir()
    for gz in (PQAL, TEST_GROUND_TRUTH):
        (tmp_path / "pubmedqa" / gz.name.removesuffix(".gz")).write_bytes(
            gzip.decompress(gz.read_bytes()))
    monkeypatch.setenv("MESHDISTILL_DATA_DIR", str(tmp_path))
    pqal, test = default_benchmarks()
    assert pqal.path == str(tmp_path / "pubmedqa" / "ori_pqal.json")
    assert (len(pqal.questions), len(test.pmids)) == (1000, 500)
    monkeypatch.setenv("MESHDISTILL_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(BenchmarkError, match=r"nowhere/pubmedqa/ori_pqal\.json\.gz"):
        default_benchmarks()


def test_summary_of_pubmedqa_l(pubmedqa: ContaminationIndex, questions: dict[int, str]) -> None:
    long_grams = {tuple(ws[i:i + NGRAM]) for q in questions.values()
                  for ws in [words(q)] for i in range(len(ws) - NGRAM + 1)}
    assert pubmedqa.summary() == [
        {"name": "pubmedqa_l", "path": str(PQAL), "pmids": 1000, "questions": 1000,
         "ngrams": len(long_grams), "ngram_size": 13},
        {"name": "pubmedqa_l_test", "path": str(TEST_GROUND_TRUTH), "pmids": 500,
         "questions": 0, "ngrams": 0, "ngram_size": 13},
    ]
    json.dumps(pubmedqa.summary())  # goes into the manifest as is


def test_every_pubmedqa_question_is_caught_verbatim(pubmedqa: ContaminationIndex,
                                                    questions: dict[int, str]) -> None:
    for question in questions.values():
        assert pubmedqa.check(question, []) == ("pubmedqa_l", "ngram"), question


def test_a_pubmedqa_question_with_changed_case_and_punctuation(
        pubmedqa: ContaminationIndex, questions: dict[int, str]) -> None:
    question = questions[24183388]
    assert question == ("Is the Hawkins sign able to predict necrosis in fractures of the "
                        "neck of the astragalus?")
    changed = "IS THE HAWKINS-SIGN ABLE TO PREDICT NECROSIS, IN FRACTURES OF THE NECK OF THE " \
              "ASTRAGALUS ?!"
    assert pubmedqa.check(changed, [1]) == ("pubmedqa_l", "ngram")
    embedded = f"In adults seen after trauma: {question.lower().rstrip('?')}, or is MRI needed?"
    assert pubmedqa.check(embedded, [1]) == ("pubmedqa_l", "ngram")


def test_a_pubmedqa_pmid_is_caught_first(pubmedqa: ContaminationIndex,
                                         questions: dict[int, str]) -> None:
    clean = "Does zebrafish xylophone quokka predict anything?"
    assert pubmedqa.check(clean, [21645374]) == ("pubmedqa_l", "pmid")  # the source
    assert pubmedqa.check(clean, [1, 2, 21645374]) == ("pubmedqa_l", "pmid")  # a context
    assert pubmedqa.check(questions[21645374], [21645374]) == ("pubmedqa_l", "pmid")
    test_pmid = min(default_benchmarks()[1].pmids)
    assert pubmedqa.check(clean, iter([test_pmid])) == ("pubmedqa_l", "pmid")  # PQA-L first


def test_an_unrelated_biomedical_question_is_clean(pubmedqa: ContaminationIndex) -> None:
    for question in (
        "What is the role of interleukin-6 signalling in the progression of chronic kidney "
        "disease in adults with type 2 diabetes?",
        "Which genetic variants of CYP2C19 are associated with reduced clopidogrel efficacy "
        "after percutaneous coronary intervention in Asian patients?",
        "Is there an association between statin use and the risk of postoperative delirium "
        "in elderly patients undergoing cardiac surgery?",
        "",
        "?",
    ):
        assert pubmedqa.check(question, [31000000, 32000000]) is None, question


def test_twelve_shared_words_are_no_hit_thirteen_are(pubmedqa: ContaminationIndex,
                                                     questions: dict[int, str]) -> None:
    tokens = words(questions[23806388])  # 22 words
    assert len(tokens) >= NGRAM + 2
    for start in range(len(tokens) - NGRAM + 1):
        run = tokens[start:start + NGRAM]
        thirteen = " ".join([*FILLER, *run, *FILLER])
        twelve = " ".join([*FILLER, *run[:-1], *FILLER])
        assert pubmedqa.check(thirteen, []) == ("pubmedqa_l", "ngram"), thirteen
        assert pubmedqa.check(twelve, []) is None, twelve


def test_short_pubmedqa_questions_are_caught_inside_longer_ones(
        pubmedqa: ContaminationIndex, questions: dict[int, str]) -> None:
    short = questions[20537205]
    assert short == "Is halofantrine ototoxic?" and len(words(short)) < NGRAM
    item = "In children treated for malaria, is halofantrine ototoxic at usual doses?"
    assert pubmedqa.check(item, []) == ("pubmedqa_l", "ngram")
    assert pubmedqa.check("Is halofantrine cardiotoxic in children?", []) is None
    assert pubmedqa.check("Is halofantrine", []) is None


def test_the_beginning_of_a_long_pubmedqa_question_is_no_hit(
        pubmedqa: ContaminationIndex, questions: dict[int, str]) -> None:
    tokens = words(questions[21645374])
    assert len(tokens) > NGRAM
    for k in range(2, NGRAM):
        assert pubmedqa.check(" ".join(tokens[:k]) + "?", []) is None, k
    assert pubmedqa.check(" ".join(tokens[:NGRAM]) + "?", []) == ("pubmedqa_l", "ngram")


# --- the index on hand-made benchmarks -----------------------------------------------------


def _bench(name: str, questions: tuple[str, ...] = (), pmids: tuple[int, ...] = ()) -> Benchmark:
    return Benchmark(name, f"/{name}.jsonl", frozenset(pmids), questions)


LONG = "does early mobilisation after hip fracture surgery reduce the length of hospital stay"


def test_the_first_benchmark_in_the_given_order_wins() -> None:
    a = _bench("a", (LONG,), (5,))
    b = _bench("b", (LONG,), (5,))
    assert ContaminationIndex([a, b]).check(LONG, [5]) == ("a", "pmid")
    assert ContaminationIndex([b, a]).check(LONG, [5]) == ("b", "pmid")
    assert ContaminationIndex([a, b]).check(LONG, []) == ("a", "ngram")
    assert ContaminationIndex([b, a]).check(LONG, []) == ("b", "ngram")


def test_a_pmid_hit_beats_an_earlier_benchmarks_ngram_hit() -> None:
    index = ContaminationIndex([_bench("words", (LONG,)), _bench("ids", pmids=(5,))])
    assert index.check(LONG, [7, 5]) == ("ids", "pmid")
    assert index.check(LONG, [7]) == ("words", "ngram")
    index = ContaminationIndex([_bench("ids", pmids=(5,)), _bench("words", (LONG,))])
    assert index.check(LONG, [7]) == ("words", "ngram")  # a later benchmark alone


def test_of_two_ngram_hits_the_earlier_benchmark_wins_wherever_it_occurs() -> None:
    late = "is serum ferritin a marker of disease activity"
    index = ContaminationIndex([_bench("first", (late,)), _bench("second", (LONG,))])
    item = f"{LONG} and {late}"  # the second benchmark's run comes first in the item
    assert index.check(item, []) == ("first", "ngram")
    index = ContaminationIndex([_bench("second", (LONG,)), _bench("first", (late,))])
    assert index.check(item, []) == ("second", "ngram")


def test_summary_counts_distinct_ngrams_of_long_questions() -> None:
    index = ContaminationIndex([read_pqal(PQAL_SMALL), read_bioasq(BIOASQ_SMALL),
                                _bench("repeated", (LONG, LONG.upper() + "?"))])
    # pqal_small: a 16-word and a 15-word question (4 + 3) and an 8-word one (matched whole,
    # no n-gram); bioasq_small: one 15-word question (3); LONG (13 words) twice counts once.
    assert len(words(LONG)) == NGRAM
    assert [(s["name"], s["pmids"], s["questions"], s["ngrams"]) for s in index.summary()] == [
        ("pqal_small", 3, 3, 7), ("bioasq_small", 4, 3, 3), ("repeated", 0, 2, 1)]


def test_short_benchmark_questions_of_any_length_match_whole() -> None:
    index = ContaminationIndex([_bench("short", ("Papilin?", "Is A1 secreted?"))])
    assert index.check("Where is papilin expressed?", []) == ("short", "ngram")
    assert index.check("Is A1 secreted in mice?", []) == ("short", "ngram")
    assert index.check("Is A1 secreted", []) == ("short", "ngram")
    assert index.check("Is A1 expressed and secreted?", []) is None
    assert index.check("Papilins?", []) is None


def test_a_smaller_ngram_size() -> None:
    index = ContaminationIndex([read_jsonl(JSONL_SMALL)], n=5)
    assert index.n == 5
    # four words shared with a benchmark question, then five
    assert index.check("Is vitamin D supplementation lower in winter?", []) is None
    assert index.check("Can vitamin D supplementation lower the risk?", []) == (
        "questions", "ngram")  # "vitamin d supplementation lower the"
    with pytest.raises(ValueError, match="at least 2"):
        ContaminationIndex([], n=1)


def test_an_empty_index_finds_nothing() -> None:
    index = ContaminationIndex([_bench("nothing")])
    assert index.check(LONG, [1, 2, 3]) is None
    assert index.summary() == [{"name": "nothing", "path": "/nothing.jsonl", "pmids": 0,
                                "questions": 0, "ngrams": 0, "ngram_size": 13}]
