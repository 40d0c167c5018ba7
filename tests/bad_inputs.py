"""The bad-input battery's harness: a project folder with one mistake in it, `loom train` on it, and the promises.

Every case must stop the run at the driver with a non-zero exit, one message that names the key or file (and what
was given), no traceback anywhere in the output, and nothing written: the project folder holds exactly the files
the case wrote, and neither output_dir nor ray_storage_path exists.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import DEMO_DATA

KEEP = object()  # a base key the case leaves out


@dataclass(frozen=True)
class Bad:
    id: str
    names: tuple[str, ...]  # each must appear in the error output (the key, file, dataset or row it is about)
    config: dict[str, Any] = field(default_factory=dict)  # merged into the valid base; KEEP removes a key
    text: str | bytes | None = None  # the config file's raw content instead (YAML syntax, empty file, ...)
    files: dict[str, str | bytes] = field(default_factory=dict)  # project-relative path -> content
    args: tuple[str, ...] = ()  # key=value overrides on the command line
    model: Callable[[Path], None] | None = None  # edits a copy of the tiny model at <project>/model
    config_name: str = "cfg.yaml"

    def __str__(self) -> str:
        return self.id


def base_config(project: Path, tiny_model: str) -> dict[str, Any]:
    return {
        "model_name_or_path": tiny_model, "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
        "template": "default", "cutoff_len": 64, "max_samples": 16, "output_dir": str(project / "out"),
        "ray_storage_path": str(project / "saves"), "ray_run_name": "bad", "ray_num_workers": 2,
        "resources_per_worker": {"CPU": 1}, "per_device_train_batch_size": 2, "max_steps": 2,
    }  # fmt: skip


def write_project(case: Bad, project: Path, tiny_model: str) -> list[str]:
    """The case's files; returns argv for `loom train`."""
    project.mkdir(parents=True, exist_ok=True)
    raw = base_config(project, tiny_model)
    if case.model:
        shutil.copytree(tiny_model, project / "model")
        case.model(project / "model")
        raw["model_name_or_path"] = str(project / "model")
    for name, value in case.config.items():
        if value is KEEP:
            raw.pop(name, None)
        else:
            raw[name] = value.replace("{project}", str(project)) if isinstance(value, str) else value
    for relative, content in case.files.items():
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{project}", str(project)), encoding="utf-8")
    config = project / case.config_name
    if case.text is not None:
        config.write_bytes(case.text if isinstance(case.text, bytes) else case.text.encode())
    elif case.config_name.endswith(".json"):
        config.write_text(json.dumps(raw))
    else:
        config.write_text(yaml.safe_dump(raw))
    return ["train", str(config), *case.args]


def files_under(folder: Path) -> set[str]:
    return {str(Path(root, name).relative_to(folder)) for root, _, names in os.walk(folder) for name in names}


def check_refused(case: Bad, project: Path, code: int, output: str, before: set[str]) -> None:
    assert code != 0, f"{case}: exit 0\n{output[-2000:]}"
    assert "Traceback" not in output, f"{case}: a traceback in the output\n{output[-4000:]}"
    for name in case.names:
        assert name in output, f"{case}: {name!r} is not named in\n{output[-2000:]}"
    assert files_under(project) == before, f"{case}: wrote {sorted(files_under(project) - before)}"
    assert not (project / "out").exists() and not (project / "saves").exists(), case


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def alpaca_rows(count: int) -> list[dict[str, str]]:
    return [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(count)]


def registry(**entries: dict[str, Any]) -> str:
    return json.dumps(entries)
