"""dataset_info.json -> DatasetSpec: where a dataset's files are and which columns mean what."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field

from ..errors import Problem

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": None, "history": None}
FILE_TYPES = {".json": "json", ".jsonl": "json", ".txt": "text"}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset, resolved: absolute file paths, format and column mapping."""

    name: str
    files: tuple[str, ...]
    file_type: str  # json | text
    formatting: str = "alpaca"
    columns: dict = field(default_factory=dict)

    def column(self, role: str) -> str | None:
        return self.columns.get(role, ALPACA_COLUMNS.get(role))


def load_registry(dataset_dir: str) -> tuple[dict, list[Problem]]:
    path = os.path.join(dataset_dir, "dataset_info.json")
    if not os.path.isfile(path):
        return {}, []
    try:
        with open(path, encoding="utf-8") as handle:
            registry = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        return {}, [Problem("dataset_dir", f"cannot read {path}: {error}")]
    if not isinstance(registry, dict):
        return {}, [Problem("dataset_dir", f"{path} must hold a JSON object of dataset entries")]
    return registry, []


def resolve_datasets(
    names: list[str], dataset_dir: str, key: str = "dataset"
) -> tuple[list[DatasetSpec], list[Problem]]:
    """Specs for every name, or the problems that stop the run (unknown name, missing file, unsupported entry)."""
    if not os.path.isdir(dataset_dir):
        return [], [Problem("dataset_dir", f"folder {dataset_dir!r} does not exist")]
    registry, problems = load_registry(dataset_dir)
    specs = []
    for name in names:
        if name in registry:
            spec, entry_problems = _from_entry(name, registry[name], dataset_dir, key)
        else:
            spec, entry_problems = _from_file(name, dataset_dir, registry, key)
        problems += entry_problems
        if spec:
            specs.append(spec)
    return specs, problems


def _from_entry(name: str, entry: dict, dataset_dir: str, key: str) -> tuple[DatasetSpec | None, list[Problem]]:
    where = f"{key} ({name!r} in {os.path.join(dataset_dir, 'dataset_info.json')})"
    if not isinstance(entry, dict):
        return None, [Problem(where, "the entry must be a JSON object")]
    for remote in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
        if remote in entry:
            return None, [Problem(where, f"{remote} datasets are not supported yet; download it and use file_name")]
    formatting = entry.get("formatting", "alpaca")
    if formatting != "alpaca":
        return None, [Problem(where, f"formatting {formatting!r} is not supported yet (supported: alpaca)")]
    if entry.get("ranking"):
        return None, [Problem(where, "ranking datasets need the rm/dpo stages, which are not built yet")]
    if "file_name" not in entry:
        return None, [Problem(where, "the entry has no file_name")]
    spec, problems = _from_file(entry["file_name"], dataset_dir, {}, where, display=name)
    if spec:
        spec = DatasetSpec(name, spec.files, spec.file_type, formatting, dict(entry.get("columns") or {}))
    return spec, problems


def _from_file(
    file_name: str, dataset_dir: str, registry: dict, key: str, display: str | None = None
) -> tuple[DatasetSpec | None, list[Problem]]:
    path = os.path.abspath(os.path.join(dataset_dir, file_name))
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
    elif os.path.isfile(path):
        files = [path]
    else:
        hint = difflib.get_close_matches(file_name, list(registry) + _listdir(dataset_dir), n=1, cutoff=0.6)
        known = ", ".join(sorted(registry)) or "none"
        message = (
            f"{file_name!r} is neither an entry of dataset_info.json (known: {known}) nor a file in {dataset_dir!r}"
        )
        if hint:
            message += f"; did you mean {hint[0]!r}?"
        return None, [Problem(key, message)]
    types = {FILE_TYPES.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in types or len(types) != 1:
        exts = sorted({os.path.splitext(f)[1] for f in files})
        return None, [
            Problem(key, f"file types {exts} are not supported (supported: .json, .jsonl, .txt, one kind per dataset)")
        ]
    return DatasetSpec(display or file_name, tuple(files), types.pop()), []


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []
