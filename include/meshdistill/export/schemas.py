"""The Arrow schema of each export format: what a shard's columns are, exactly.

Shards are written from these schemas (never inferred), so every shard of a format has
the same columns and types whatever its rows hold, Parquet files carry no pandas
metadata, and the dataset card's ``features`` are derived from the same objects.
docs/export.md describes each column.
"""

from __future__ import annotations

import pyarrow as pa

from meshdistill.export.settings import FORMATS, JUDGE_CRITERIA

__all__ = ["FORMATS", "JUDGE_CRITERIA", "SCHEMAS"]

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
SHAREGPT_TURN = pa.struct([("from", pa.string()), ("value", pa.string())])
JUDGE_SCORES = pa.struct([(c, pa.int8()) for c in JUDGE_CRITERIA])

ITEM_METADATA = pa.struct([
    ("item_id", pa.int64()),
    ("source_pmid", pa.int64()),
    ("subtree", pa.string()),
    ("question_type", pa.string()),
    ("label", pa.string()),
    ("hierarchy_score", pa.float64()),
    ("judge", JUDGE_SCORES),
])
"""Filter columns of every item format (``metadata``), so no join with ``qca`` is needed."""

PAIR_METADATA = pa.struct([
    ("chosen_id", pa.int64()),
    ("rejected_id", pa.int64()),
    ("source_pmid", pa.int64()),
    ("subtree", pa.string()),
    ("question_type", pa.string()),
    ("chosen_profile", pa.string()),
    ("rejected_profile", pa.string()),
    ("chosen_score", pa.float64()),
    ("rejected_score", pa.float64()),
    ("margin", pa.float64()),
])

CONTEXT = pa.struct([
    ("pmid", pa.int64()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("rank", pa.int32()),
    ("retrieval", pa.float64()),
    ("hierarchy", pa.float64()),
    ("blend", pa.float64()),
    ("is_source", pa.bool_()),
])
MESH_TERM = pa.struct([("ui", pa.string()), ("tree_numbers", pa.list_(pa.string()))])
PROMPT_VERSIONS = pa.struct([("generate", pa.string()), ("judge", pa.string()),
                             ("answer", pa.string())])

SCHEMAS: dict[str, pa.Schema] = {
    "sft": pa.schema([("messages", MESSAGES), ("metadata", ITEM_METADATA)]),
    "prompt_completion": pa.schema([("prompt", MESSAGES), ("completion", MESSAGES),
                                    ("metadata", ITEM_METADATA)]),
    "dpo": pa.schema([("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES),
                      ("metadata", PAIR_METADATA)]),
    "alpaca": pa.schema([("instruction", pa.string()), ("input", pa.string()),
                         ("output", pa.string()), ("metadata", ITEM_METADATA)]),
    "sharegpt": pa.schema([("conversations", pa.list_(SHAREGPT_TURN)),
                           ("metadata", ITEM_METADATA)]),
    "qca": pa.schema([
        ("id", pa.int64()),
        ("subtree", pa.string()),
        ("source_pmid", pa.int64()),
        ("profile", pa.string()),
        ("ordinal", pa.int32()),
        ("question_type", pa.string()),
        ("question", pa.string()),
        ("answer_hint", pa.string()),
        ("evidence", pa.string()),
        ("contexts", pa.list_(CONTEXT)),
        ("context_pmids", pa.list_(pa.int64())),
        ("answer", pa.string()),
        ("label", pa.string()),
        ("cited_pmids", pa.list_(pa.int64())),
        ("answer_evidence", pa.list_(pa.string())),
        ("question_mesh", pa.list_(MESH_TERM)),
        ("retrieval_score", pa.float64()),
        ("hierarchy_score", pa.float64()),
        ("blend_score", pa.float64()),
        ("judge", JUDGE_SCORES),
        ("judge_rationale", pa.string()),
        ("backend", pa.string()),
        ("model", pa.string()),
        ("prompt_versions", PROMPT_VERSIONS),
        ("run_id", pa.string()),
        ("params", pa.string()),
        ("metadata", ITEM_METADATA),
    ]),
}
"""One schema per format; ``qca.params`` is the run's settings as JSON text (their keys
vary with the settings' version, which a fixed struct could not follow)."""
