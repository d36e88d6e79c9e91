"""Airflow Params generated from the pipeline's pydantic settings.

A DAG's form takes each field's default, bounds, choices, title, description and form
section from the same pydantic model the CLI and the library validate with, so the form
can never offer a value the pipeline refuses, nor refuse one it takes. Optional fields
(``int | None``) become ``type: ["null", ...]`` (an empty form field), as Airflow's form
expects.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from airflow.sdk import Param
from pydantic import BaseModel


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with every ``$ref`` to ``#/$defs/...`` replaced by its definition."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = _resolve(defs[ref.rsplit("/", 1)[-1]], defs)
            return {**target, **{k: _resolve(v, defs) for k, v in node.items() if k != "$ref"}}
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, {"type": "null"}]`` as X with ``null`` added to its type (and enum)."""
    options = schema.get("anyOf")
    if not options or {"type": "null"} not in options or len(options) != 2:
        return schema
    (inner,) = [o for o in options if o != {"type": "null"}]
    out = {k: v for k, v in schema.items() if k != "anyOf"} | inner
    out["type"] = ["null", inner["type"]]
    if "enum" in inner:
        out["enum"] = [None, *inner["enum"]]
    return out


@cache
def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema, built once per model (read, never changed, by callers)."""
    return model.model_json_schema()


@cache
def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s default values as JSON, built once per model."""
    return model().model_dump(mode="json")


def field_schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The JSON schema of one field of ``model``, self-contained (no ``$ref``)."""
    schema = _model_schema(model)
    if name not in schema["properties"]:
        raise KeyError(f"{model.__name__} has no field {name!r}")
    field = _resolve(schema["properties"][name], schema.get("$defs", {}))
    return _nullable(field)


def field_param(model: type[BaseModel], name: str, **overrides: Any) -> Param:
    """A ``Param`` for one field: its default (as JSON) and its schema; ``overrides``
    replace schema keys (e.g. a description that names the DAG's own behaviour)."""
    schema = field_schema(model, name) | overrides
    schema.pop("default", None)
    return Param(copy.deepcopy(_defaults(model)[name]), **schema)


def model_params(model: type[BaseModel], names: tuple[str, ...] | None = None,
                 **overrides: dict[str, Any]) -> dict[str, Param]:
    """``field_param`` for each of ``names`` (default: every field), in that order;
    ``overrides`` maps a field name to its schema overrides."""
    chosen = names if names is not None else tuple(model.model_fields)
    return {name: field_param(model, name, **overrides.get(name, {})) for name in chosen}
