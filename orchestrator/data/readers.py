"""Reading a dataset's files into Ray Data rows, in Ray tasks (never on the driver)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ray

from .registry import DatasetSpec

# Tokenization work per Ray task: big enough to amortise a task, small enough to spread over the cluster.
BYTES_PER_BLOCK = 16 * 1024 * 1024


def _blocks_for(files: list[str]) -> int:
    return max(1, min(200, math.ceil(sum(os.path.getsize(f) for f in files) / BYTES_PER_BLOCK)))


def _json_array_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        data = json.loads(row["bytes"])
    except json.JSONDecodeError as error:
        raise ValueError(f"{row['path']} is not valid JSON: {error}") from None
    if not isinstance(data, list):
        raise ValueError(f"{row['path']} must hold a JSON array of rows (or use .jsonl, one row per line)")
    return data


def read_dataset(spec: DatasetSpec) -> ray.data.Dataset:
    """Raw rows of a dataset's files: text lines, JSON lines, or JSON arrays (parsed one file per task)."""
    files = list(spec.files)
    if spec.file_type == "text":
        return ray.data.read_text(files, override_num_blocks=_blocks_for(files))
    parts = []
    lines = [f for f in files if f.endswith(".jsonl")]
    arrays = [f for f in files if not f.endswith(".jsonl")]
    if lines:
        parts.append(ray.data.read_json(lines, lines=True, override_num_blocks=_blocks_for(lines)))
    if arrays:
        parts.append(ray.data.read_binary_files(arrays, include_paths=True).flat_map(_json_array_rows))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
