"""What an export is asked to do, validated once for the DAG form, the CLI and the library.

:class:`ExportSettings` is the whole request: which items (subtrees, minimum scores,
question types), how they are cleaned (near-duplicate threshold, benchmarks, caps,
strict splits) and how they are written (formats, file format, splits, shard size,
location). The ``export_shards`` DAG's Params are generated from these fields and the
CLI validates its options with the same model, so the two cannot disagree; the settings
are stored with each export (its manifest and its ``export`` row).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshdistill.distill.settings import JUDGE_CRITERIA
from meshdistill.llm.schemas import QuestionType
from meshdistill.mesh.tree import SubtreePrefix

SPLITS = ("train", "validation", "test")
DEFAULT_SEED = 20250127
"""The split hash's salt unless one is given: fixed, so an article keeps its split across
exports, and recorded in every manifest."""

WHAT, QUALITY, CLEAN, BALANCE, OUTPUT = (
    "What to export", "Quality thresholds", "Cleaning", "Balance", "Output")

Format = Literal["sft", "prompt_completion", "dpo", "alpaca", "sharegpt", "qca"]
FORMATS: tuple[Format, ...] = get_args(Format)
"""Every export format; ``dpo`` rows are preference pairs, the others accepted items."""
FileFormat = Literal["parquet", "jsonl", "jsonl.gz", "both"]


def _form(section: str, **extra: Any) -> dict[str, Any]:
    return {"section": section, **extra}


class JudgeMinimums(BaseModel):
    """Minimum 1–5 judge score per criterion an exported item must have (1 = any)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groundedness: int = Field(default=1, ge=1, le=5)
    relevance: int = Field(default=1, ge=1, le=5)
    clarity: int = Field(default=1, ge=1, le=5)
    informativeness: int = Field(default=1, ge=1, le=5)
    safety: int = Field(default=1, ge=1, le=5)

    def active(self) -> dict[str, int]:
        """The criteria that filter anything (minimum above 1)."""
        return {c: getattr(self, c) for c in JUDGE_CRITERIA if getattr(self, c) > 1}


class ExportSettings(BaseModel):
    """One export; defaults give every accepted item in every format as Parquet."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FORM: ClassVar[tuple[str, ...]] = (
        "subtrees", "question_types", "formats", "closed_book", "min_hierarchy",
        "min_judge", "near_dup_threshold", "benchmarks", "default_benchmarks",
        "strict_splits", "split_ratios", "max_per_subtree", "max_per_type",
        "max_label_share", "file_format", "shard_rows", "out")
    """The fields the DAG's Params form offers, in its order."""

    subtrees: tuple[SubtreePrefix, ...] = Field(
        default=(), title="MeSH subtrees", description="export items distilled over these "
        "tree numbers or under them, one per line: C04 (Neoplasms), C14.280 (Heart "
        "Diseases); empty = all", json_schema_extra=_form(WHAT))
    question_types: tuple[QuestionType, ...] = Field(
        default=tuple(QuestionType), min_length=1, title="Question types",
        description="yesno, factoid, list, summary",
        json_schema_extra=_form(WHAT, uniqueItems=True))
    formats: tuple[Format, ...] = Field(
        default=FORMATS, min_length=1, title="Formats",
        description="sft (TRL messages), prompt_completion, dpo (preference pairs), "
        "alpaca, sharegpt, qca (items with full provenance)",
        json_schema_extra=_form(WHAT, uniqueItems=True))
    closed_book: bool = Field(
        default=False, title="Closed book", description="leave the retrieved contexts out "
        "of the prompts (the model must answer from what it knows)",
        json_schema_extra=_form(WHAT))
    min_hierarchy: float = Field(
        default=0.0, ge=0.0, le=1.0, title="Minimum MeSH-hierarchy score",
        description="export only items whose hierarchy score (0-1) is at least this",
        json_schema_extra=_form(QUALITY))
    min_judge: JudgeMinimums = Field(
        default_factory=JudgeMinimums, title="Minimum judge scores",
        description="minimum 1-5 judge score per criterion (1 = no filter)",
        json_schema_extra=_form(QUALITY))
    near_dup_threshold: float = Field(
        default=0.8, gt=0.0, le=1.0, title="Near-duplicate threshold",
        description="questions whose estimated word 5-gram Jaccard similarity is at "
        "least this are one cluster; the best-scored item of each is kept (1 = exact "
        "duplicates only)",
        json_schema_extra=_form(CLEAN))
    benchmarks: tuple[str, ...] = Field(
        default=(), title="Benchmark files", description="PubMedQA JSON, BioASQ JSON or "
        "JSON lines with a question (and pmid) field, plain or gzip: items sharing a PMID "
        "or a 13-word run with them are dropped", json_schema_extra=_form(CLEAN))
    default_benchmarks: bool = Field(
        default=True, title="Decontaminate against PubMedQA-L",
        description="also drop items that overlap PubMedQA-L (shipped in data/)",
        json_schema_extra=_form(CLEAN))
    strict_splits: bool = Field(
        default=False, title="Strict splits", description="drop items whose contexts "
        "include a source article of another split (counted either way)",
        json_schema_extra=_form(CLEAN))
    split_ratios: tuple[float, float, float] = Field(
        default=(0.9, 0.05, 0.05), title="Split ratios",
        description="train, validation, test shares of the source articles (sum 1)",
        json_schema_extra=_form(BALANCE))
    seed: int = Field(default=DEFAULT_SEED, ge=0, lt=2**63,
                      description="salt of the split hash (keep it to keep the splits)")
    max_per_subtree: int | None = Field(
        default=None, ge=1, title="Cap per subtree", description="at most this many "
        "items per subtree, the best-scored kept (empty = no cap)",
        json_schema_extra=_form(BALANCE))
    max_per_type: int | None = Field(
        default=None, ge=1, title="Cap per question type", description="at most this "
        "many items per question type, the best-scored kept (empty = no cap)",
        json_schema_extra=_form(BALANCE))
    max_label_share: float | None = Field(
        default=None, gt=0.0, lt=1.0, title="Cap on the majority label",
        description="largest share one yes/no/maybe label may have among yesno items; "
        "the lowest-scored of the majority label are dropped (empty = no cap)",
        json_schema_extra=_form(BALANCE))
    file_format: FileFormat = Field(
        default="parquet", title="File format", description="parquet, jsonl, jsonl.gz, "
        "or both (Parquet and gzip JSON lines)", json_schema_extra=_form(OUTPUT))
    shard_rows: int = Field(default=100_000, ge=1, title="Rows per shard",
                            description="rows per shard file",
                            json_schema_extra=_form(OUTPUT))
    out: str | None = Field(
        default=None, title="Output location", description="a directory or URL "
        "(file://, s3://, gs://, memory://) under which each export gets its own folder; "
        "empty = MESHDISTILL_HOME/exports", json_schema_extra=_form(OUTPUT))

    @field_validator("question_types", "formats", "subtrees", "benchmarks")
    @classmethod
    def _unique(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(dict.fromkeys(value))

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in value) or abs(sum(value) - 1.0) > 1e-6 or value[0] <= 0:
            raise ValueError("three non-negative shares adding up to 1, train above 0")
        return value

    def file_formats(self) -> tuple[str, ...]:
        """The file formats written: ``both`` is Parquet and gzip JSON lines."""
        return ("parquet", "jsonl.gz") if self.file_format == "both" else (self.file_format,)

    def stored(self) -> dict[str, Any]:
        """The settings as JSON, as the manifest and the ``export`` row keep them."""
        return self.model_dump(mode="json")
