"""Typed configuration: one pydantic schema per stage, YAML files, and `--set a.b=c` overrides.

Every field documents itself with the docstring below it (pydantic's `use_attribute_docstrings`). Unknown keys are
rejected with the valid keys listed; values are type-checked; the resolved config is saved beside every output.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from speechless.core.errors import UsageError

Schema = TypeVar("Schema", bound="Section")


class Section(BaseModel):
    """Base of every config section: strict keys, documented fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def _section_type(annotation: Any) -> type[Section] | None:
    """The Section class inside an annotation such as `Foo`, `Foo | None`, or None when the field is a leaf."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def _check_keys(schema: type[Section], data: Any, where: str, prefix: str = "") -> None:
    """Reject unknown keys with the valid ones listed (and a 'did you mean' for near misses)."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in schema.model_fields:
            valid = sorted(schema.model_fields)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            section = prefix.rstrip(".") or "the top level"
            raise UsageError(f"{where}: unknown key '{dotted}'{hint}; valid keys under {section}: {', '.join(valid)}")
        sub = _section_type(schema.model_fields[key].annotation)
        if sub is not None:
            _check_keys(sub, value, where, f"{dotted}.")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split 'a.b=c' into (['a', 'b'], value), the value read as YAML (so 3 is int, 1e-3 float, [1,2] a list)."""
    if "=" not in item:
        raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UsageError(f"--set {item!r}: empty key; expected KEY=VALUE, e.g. --set train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: config file not found") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{path}: is a folder; pass a YAML config file") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}:{line} not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of config sections at the top level, got {type(data).__name__}")
    return data


def _fill_defaults(schema: type[Section], data: Any, default: Section | None = None) -> Any:
    """`data` with each partly given section completed from the enclosing schema's default for it, so that a key left
    out keeps that default: stage 3's `data.generate` (max_seconds 20) given only `guidance` keeps max_seconds 20
    rather than falling back to GenerateConfig's own 30."""
    if not isinstance(data, dict):
        return data
    out = {name: getattr(default, name) for name in schema.model_fields} if default is not None else {}
    for key, value in data.items():
        field = schema.model_fields.get(key)
        sub = _section_type(field.annotation) if field is not None else None
        if sub is not None and isinstance(value, dict):
            inner = getattr(default, key) if default is not None else field.default
            value = _fill_defaults(sub, value, inner if isinstance(inner, Section) else None)
        out[key] = value
    return out


def validate(schema: type[Schema], data: dict, where: str) -> Schema:
    """Validate `data` against `schema`, turning the first problem into one clear line."""
    _check_keys(schema, data, where)
    try:
        return schema.model_validate(_fill_defaults(schema, data))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        got = first.get("input")
        if isinstance(got, dict):  # a check across keys (a model validator): the section itself is no help to print
            raise UsageError(f"{where}: {'key ' + repr(key) + ': ' if key else ''}{first['msg']}") from exc
        raise UsageError(f"{where}: key '{key}': {first['msg']} (got {got!r})") from exc


def expand_includes(schema: type[Section], data: Any, where: str) -> Any:
    """A section given as a string naming a YAML file is that file's content (`stage1: configs/stage1/demo.yaml`), so
    a pipeline config reuses the stage configs instead of copying them. Paths are relative to the working folder."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for key, value in data.items():
        sub = _section_type(schema.model_fields[key].annotation) if key in schema.model_fields else None
        if sub is None:
            continue
        if isinstance(value, list):  # a list of sections: each item may be a file too
            out[key] = [expand_includes(sub, _include(item, f"{key}[{n}]", where), where) for n, item in enumerate(value)]
        else:
            out[key] = expand_includes(sub, _include(value, key, where), where)
    return out


def _include(value: Any, key: str, where: str) -> Any:
    if not (isinstance(value, str) and value.endswith((".yaml", ".yml"))):
        return value
    if not Path(value).is_file():
        raise UsageError(f"{where}: key '{key}': included config {value} not found (paths are relative to the working folder)")
    return read_yaml(value)


def load_config(schema: type[Schema], path: str | os.PathLike | None, overrides: list[str] | None = None) -> Schema:
    """Load a YAML file (or the schema's defaults when `path` is None), apply overrides, validate."""
    data = expand_includes(schema, read_yaml(path), str(path)) if path is not None else {}
    where = str(path) if path is not None else "defaults"
    if overrides:
        _check_keys(schema, apply_overrides({}, overrides), "--set")
        data = expand_includes(schema, apply_overrides(data, overrides), f"{where} with --set")  # --set stage1=F.yaml too
        where += " with --set"
    return validate(schema, data, where)


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def describe(schema: type[Section], prefix: str = "", defaults: Section | None = None) -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf key: the config reference printed by `speechless config show`.

    Defaults come from the enclosing section's default instance, so `Stage1Config.run.out_dir` shows stage 1's
    value rather than the generic `RunConfig` one."""
    defaults = defaults if defaults is not None else schema()
    rows = []
    for name, field in schema.model_fields.items():
        value = getattr(defaults, name)
        sub = _section_type(field.annotation)
        doc = " ".join((field.description or "").split())
        if sub is not None and isinstance(value, Section):
            rows.extend(describe(sub, f"{prefix}{name}.", value))
        else:
            shown = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            if isinstance(shown, list):
                shown = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in shown]
            rows.append((f"{prefix}{name}", repr(shown), doc))
    return rows
