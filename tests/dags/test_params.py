"""Params generated from pydantic fields: the form and the pipeline accept the same values."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError
from meshdistill.distill.settings import DistillRequest, DistillSettings, JudgeThresholds
from meshdistill_airflow.params import field_param, field_schema, model_params
from pydantic import BaseModel, Field, ValidationError


class _Example(BaseModel):
    count: int | None = Field(default=3, ge=1, le=9, title="Count", description="how many")
    mode: str = Field(default="a", pattern="^[ab]$", json_schema_extra={"section": "S"})


def test_optional_field_becomes_a_nullable_type_with_its_bounds() -> None:
    schema = field_schema(_Example, "count")
    assert schema["type"] == ["null", "integer"]
    assert (schema["minimum"], schema["maximum"]) == (1, 9)
    assert (schema["title"], schema["description"]) == ("Count", "how many")
    param = field_param(_Example, "count")
    assert param.value == 3
    assert field_schema(_Example, "mode")["section"] == "S"


def test_enums_and_nested_models_are_resolved_without_refs() -> None:
    backend = field_schema(DistillRequest, "backend")
    assert backend["type"] == ["null", "string"]
    assert backend["enum"] == [None, "offline", "openai"]
    types = field_schema(DistillSettings, "question_types")
    assert types["items"]["enum"] == ["yesno", "factoid", "list", "summary"]
    thresholds = field_schema(DistillSettings, "thresholds")
    assert set(thresholds["properties"]) == set(JudgeThresholds.model_fields)
    assert "$ref" not in repr(thresholds) and "$ref" not in repr(types)
    with pytest.raises(KeyError, match="no field"):
        field_schema(DistillSettings, "temperature")


def _pydantic_accepts(name: str, value: Any) -> bool:
    model = DistillRequest if name in DistillRequest.model_fields else DistillSettings
    try:
        model.model_validate({name: value})
    except ValidationError:
        return False
    return True


# Values at and beyond every bound and choice of the form's fields.
PROBES: dict[str, list[Any]] = {
    "subtrees": [["C04"], ["C04", "C14.280"], ["C"], [], ["neoplasms"], ["C4"], ["c04"]],
    "max_articles": [None, 1, 100, 0, -3],
    "questions_per_article": [1, 20, 0, 21],
    "question_types": [["yesno"], ["list", "summary"], [], ["essay"]],
    "retrieval": ["fts", "vector", "bm25"],
    "k_contexts": [1, 20, 0, 21],
    "contexts_in_subtree": [True, False],
    "min_hierarchy": [0, 0.5, 1, -0.1, 1.5],
    "thresholds": [JudgeThresholds().model_dump(), {**JudgeThresholds().model_dump(),
                                                   "safety": 6},
                   {**JudgeThresholds().model_dump(), "tone": 3}],
    "preference_margin": [0, 1, -0.01, 1.01],
    "redo": [True, False],
    "processes": [1, 16, 0, 17],
    "backend": [None, "offline", "openai", "anthropic"],
    "model": [None, "gpt-4o-mini"],
    "budget_usd": [None, 0, 2.5, -1],
    "budget_tokens": [None, 1, 0],
}


def _disagreements(params: dict[str, Any], probes: dict[str, list[Any]],
                   accepts: Any) -> list[tuple[str, Any, bool]]:
    """(field, value, the form's verdict) wherever the form and pydantic disagree."""
    found = []
    for name, values in probes.items():
        for value in values:
            form = ParamsDict({name: copy.deepcopy(params[name])})
            try:
                form[name] = value
                form_ok = True
            except ParamValidationError:
                form_ok = False
            if form_ok != accepts(name, value):
                found.append((name, value, form_ok))
    return found


def test_the_form_and_the_settings_agree_on_every_probe() -> None:
    params = {**model_params(DistillRequest), **model_params(DistillSettings,
                                                              DistillSettings.FORM)}
    assert set(PROBES) == set(params), "every form field is probed"
    assert _disagreements(params, PROBES, _pydantic_accepts) == []
    # Each default is the settings' default, and valid for both.
    for name, param in params.items():
        model = DistillRequest if name in DistillRequest.model_fields else DistillSettings
        assert param.value == model().model_dump(mode="json")[name]


# The export_shards form: values at and beyond every bound and choice.
EXPORT_PROBES: dict[str, list[Any]] = {
    "subtrees": [[], ["C04"], ["C14.280", "C04"], ["neoplasms"]],
    "question_types": [["yesno"], [], ["essay"]],
    "formats": [["sft"], ["dpo", "qca"], [], ["csv"]],
    "closed_book": [True, False],
    "min_hierarchy": [0, 1, -0.1, 1.5],
    "min_judge": [{"safety": 5}, {"safety": 6}, {"tone": 2}],
    "near_dup_threshold": [0.8, 1, 0, 1.2],
    "benchmarks": [[], ["bioasq.json"]],
    "default_benchmarks": [True, False],
    "strict_splits": [True, False],
    "split_ratios": [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1, 0.0], [0.5]],
    "max_per_subtree": [None, 1, 0],
    "max_per_type": [None, 5, -1],
    "max_label_share": [None, 0.5, 0, 1],
    "file_format": ["parquet", "jsonl", "jsonl.gz", "both", "csv"],
    "shard_rows": [1, 100000, 0],
    "out": [None, "s3://bucket/exports", "/data/exports"],
}


def test_the_export_form_and_the_settings_agree_on_every_probe() -> None:
    from meshdistill.export.settings import ExportSettings

    params = model_params(ExportSettings, ExportSettings.FORM)
    assert set(EXPORT_PROBES) == set(params), "every form field is probed"

    def accepts(name: str, value: Any) -> bool:
        try:
            ExportSettings.model_validate({name: value})
        except ValidationError:
            return False
        return True

    assert _disagreements(params, EXPORT_PROBES, accepts) == []
    for name, param in params.items():
        assert param.value == ExportSettings().model_dump(mode="json")[name]
