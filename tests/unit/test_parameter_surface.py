"""Every key in the seed's parameter tables is a LoomConfig field whose default is the seed's default."""

import json
import re
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

SEED = Path(__file__).resolve().parents[2].parent / "shared/reference/PARAMETERS.md"
if not SEED.is_file():
    pytest.skip(f"seed parameter table not found at {SEED}", allow_module_level=True)

ROW = re.compile(r"^\|\s*`(?P<name>[^`]+)`\s*\|(?P<type>[^|]*)\|(?P<default>[^|]*)\|[^|]*\|\s*$")
NUMBER = re.compile(r"-?(\d+\.\d*|\d*\.\d+|\d+)([eE][-+]?\d+)?")
ENUM_MEMBER = re.compile(r"[A-Z][A-Za-z]*\.(?P<member>[A-Z][A-Z0-9_]*)")


def seed_rows(text: str) -> dict[str, str]:
    """Map each key of the seed's config tables to its raw default cell, skipping the environment-variable table."""
    rows: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line.lower()
            continue
        match = ROW.match(line)
        if match is None or "environment variables" in section:
            continue
        name = match["name"]
        assert name not in rows, f"{name} appears twice in the seed tables"
        rows[name] = match["default"].strip()
    return rows


def seed_default(raw: str) -> Any:
    text = raw.replace("\u201c", '"').replace("\u201d", '"').strip()
    if text in ("True", "true", "False", "false"):
        return text.lower() == "true"
    if text == "None":
        return None
    if product := re.fullmatch(r"(\d+)\s*x\s*(\d+)", text):
        return int(product[1]) * int(product[2])
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if NUMBER.fullmatch(text):
        return float(text)
    if text.startswith("{"):
        return json.loads(text)
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    if member := ENUM_MEMBER.fullmatch(text):
        return member["member"].lower()
    return text


def field_default(field: Any) -> Any:
    value = field.get_default(call_default_factory=True)
    return value.value if isinstance(value, Enum) else value


def same_default(actual: Any, expected: Any) -> bool:
    if isinstance(expected, dict) and isinstance(actual, str):
        actual = json.loads(actual)
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual is expected
    return actual == expected


SEED_TEXT = SEED.read_text(encoding="utf-8")
SEED_ROWS = seed_rows(SEED_TEXT)


@pytest.fixture(scope="module")
def fields() -> dict[str, Any]:
    from orchestrator.config.schema import LoomConfig

    return LoomConfig.model_fields


def test_seed_tables_parse() -> None:
    assert len(SEED_ROWS) > 150
    assert "model_name_or_path" in SEED_ROWS and "placement_strategy" in SEED_ROWS
    assert not any(name.isupper() for name in SEED_ROWS), "environment variables leaked into the config keys"
    assert seed_default(SEED_ROWS["image_max_pixels"]) == 768 * 768
    assert seed_default(SEED_ROWS["resources_per_worker"]) == {"GPU": 1}
    assert seed_default(SEED_ROWS["download_mode"]) == "reuse_dataset_if_exists"
    assert seed_default(SEED_ROWS["dataset_dir"]) == "data"
    assert seed_default(SEED_ROWS["data_shared_file_system"]) is False
    assert seed_default(SEED_ROWS["loraplus_lr_embedding"]) == 1e-6
    assert seed_default(SEED_ROWS["task"]) is None


def test_every_seed_key_is_a_field(fields: dict[str, Any]) -> None:
    missing = sorted(name for name in SEED_ROWS if name not in fields)
    assert not missing, f"seed keys missing from LoomConfig: {missing}"


def test_every_default_matches_the_seed(fields: dict[str, Any]) -> None:
    wrong = {
        name: (field_default(fields[name]), seed_default(raw))
        for name, raw in SEED_ROWS.items()
        if name in fields and not same_default(field_default(fields[name]), seed_default(raw))
    }
    assert not wrong, "defaults differing from the seed, as (ours, seed): " + ", ".join(
        f"{name}={pair!r}" for name, pair in sorted(wrong.items())
    )


def test_named_training_arguments_are_fields(fields: dict[str, Any]) -> None:
    listed = re.search(r"configs use\s*\((?P<keys>[^)]*)\)", SEED_TEXT)
    assert listed is not None, "the seed no longer lists the TrainingArguments keys configs use"
    names = [name.strip() for name in listed["keys"].split(",")]
    names = [name for name in names if name and name != "..."]
    assert "output_dir" in names and "seed" in names
    missing = sorted(name for name in names if name not in fields)
    assert not missing, f"TrainingArguments keys named by the seed missing from LoomConfig: {missing}"
