"""Load a YAML/JSON config plus key=value overrides and validate it, collecting every problem at once."""

from __future__ import annotations

import json
import os
import sys
import typing
from typing import Any

import yaml
from pydantic import ValidationError

from ..environment import enabled
from ..errors import ConfigError, Problem
from ..suggest import did_you_mean
from .checks import cross_field_problems, support_problems
from .schema import LoomConfig, shown


def read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError([Problem("config", f"file {path!r} does not exist")], source=path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise ConfigError([Problem("config", f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} on "
                                             f"line {line}); save it as UTF-8")], source=path) from None  # fmt: skip
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError([Problem("config", f"cannot parse {path}: {error}")], source=path) from None
    if data is None:
        raise ConfigError([Problem("config", f"{path} is empty: a config is a mapping of LLaMA-Factory keys "
                                             "(at least model_name_or_path and dataset)")], source=path)  # fmt: skip
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem("config", f"{path} must hold a mapping of keys, got {type(data).__name__}")], source=path
        )
    return data


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[Problem]]:
    """`key=value` pairs; values read as YAML scalars so `lora_rank=16` is an int and `bf16=true` a bool."""
    values, problems = {}, []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(item, "an override must look like key=value"))
            continue
        values[key.strip()] = _scalar(raw)
    return values, problems


def _scalar(raw: str) -> Any:
    """YAML's reading of a value, except that `1e-4` (a string to YAML 1.1) is the float it looks like."""
    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            return value
    return value


def load_config(path: str | None, overrides: list[str] | None = None, purpose: str = "train") -> LoomConfig:
    raw = read_config_file(path) if path else {}
    extra, problems = parse_overrides(overrides or [])
    raw.update(extra)
    return validate_config(raw, source=path or "command line", problems=problems, purpose=purpose)


def validate_config(
    raw: dict[str, Any], source: str = "config", problems: list[Problem] | None = None, purpose: str = "train"
) -> LoomConfig:
    """A LoomConfig, or one ConfigError listing every unknown key, bad value and contradiction.

    `purpose` (checks.PURPOSES): `train`; `data` (loom data: any stage's data, trainable or not); `infer` (chat, api,
    serve, export: no training data needed).
    """
    problems = list(problems or [])
    fields = LoomConfig.model_fields
    known = {}
    extra_allowed = enabled(os.environ, "ALLOW_EXTRA_ARGS")
    for key, value in raw.items():
        if isinstance(key, str) and key in fields:
            known[key] = value
        elif extra_allowed:  # LLaMA-Factory's ALLOW_EXTRA_ARGS: an unknown key is dropped, said once
            print(f"{source}: {key}: {_unknown_key_message(str(key), value)}; dropped (ALLOW_EXTRA_ARGS)",
                  file=sys.stderr)  # fmt: skip
        else:
            problems.append(Problem(str(key), _unknown_key_message(str(key), value)))
    bad_keys: set[str] = set()
    try:
        LoomConfig.model_validate(known)
    except ValidationError as error:
        for item in error.errors():
            key = str(item["loc"][0]) if item["loc"] else "config"
            if key in bad_keys:
                continue
            bad_keys.add(key)
            problems.append(Problem(key, _value_message(key, known.get(key), item)))
    cfg = LoomConfig.model_validate({k: v for k, v in known.items() if k not in bad_keys})
    later = cross_field_problems(cfg, purpose) + support_problems(cfg)
    problems += [p for p in later if p.key not in bad_keys]
    if problems:
        raise ConfigError(dedupe(problems), source=source, partial=cfg)
    return cfg


def dedupe(problems: list[Problem]) -> list[Problem]:
    seen, unique = set(), []
    for problem in problems:
        if problem.key not in seen:
            seen.add(problem.key)
            unique.append(problem)
    return unique


def _unknown_key_message(key: str, value: Any) -> str:
    hint = did_you_mean(key, LoomConfig.model_fields)
    return f"unknown key (given {shown(key, value)}){hint or '; see docs/FEATURES.md for every key'}"


def allowed_values(key: str) -> list[Any] | None:
    """The choices of a Literal (or Optional[Literal]) field."""
    annotation = LoomConfig.model_fields[key].annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is typing.Literal:
            return list(typing.get_args(candidate))
    return None


def _value_message(key: str, value: Any, error: dict) -> str:
    choices = allowed_values(key)
    if choices is not None and error["type"] == "literal_error":
        return f"given {value!r}; allowed: {', '.join(str(c) for c in choices)}" + did_you_mean(value, choices, 0.5)
    field = LoomConfig.model_fields[key]
    expected = _type_name(field.annotation)
    return f"given {shown(key, value)}; {error['msg'].lower()} (expected {expected}, default {field.default!r})"


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
