"""The benchmark task files `loom eval` reads: LLaMA-Factory's `evaluation/` layout, read directly (no dataset script).

`task_dir/<name>/` holds `mapping.json` (subject -> {"name", "category"}) and the questions, either in `<name>.zip`
(as LLaMA-Factory ships them) or already extracted beside it. Each benchmark names its files its own way (TASKS).
When `task_dir/<name>` is not on disk and `task_dir` names a Hugging Face dataset repository (`owner/repo`) holding
that layout, the task is fetched into the Hub cache as `download_mode` says; offline, the error says what is missing
where. Everything here is pure file reading: no model, no Ray.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.errors import Problem
from orchestrator.suggest import did_you_mean

CHOICES = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")  # the order LLaMA-Factory reports them in
SPLIT_FOLDERS = {"train": "dev", "validation": "val", "test": "test"}  # the few-shot examples are the dev split


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # a letter of CHOICES ("" where the split publishes none, e.g. C-Eval's test)


@dataclass(frozen=True)
class TaskLayout:
    """Where one benchmark keeps a subject's split, and how its CSV rows read."""

    splits: tuple[str, ...]
    path: Callable[[str, str], str]  # (subject, split folder) -> path inside the archive
    read: Callable[[str], list[Question]]


def _rows(text: str) -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(text)) if row]


def _mmlu(text: str) -> list[Question]:  # no header: question, A, B, C, D, answer
    return [Question(r[0], (r[1], r[2], r[3], r[4]), r[5].strip()) for r in _rows(text)]


def _named(question: str, answer: str) -> Callable[[str], list[Question]]:
    def read(text: str) -> list[Question]:
        rows = list(csv.DictReader(io.StringIO(text)))
        return [Question(r[question], (r["A"], r["B"], r["C"], r["D"]), (r.get(answer) or "").strip()) for r in rows]

    return read


TASKS = {
    "mmlu": TaskLayout(("test", "validation", "train"), lambda s, f: f"data/{f}/{s}_{f}.csv", _mmlu),
    "ceval": TaskLayout(("validation", "test", "train"), lambda s, f: f"{f}/{s}_{f}.csv", _named("question", "answer")),
    "cmmlu": TaskLayout(("test", "train"), lambda s, f: f"{f}/{s}.csv", _named("Question", "Answer")),
}


@dataclass(frozen=True)
class Subject:
    key: str
    name: str
    category: str
    questions: list[Question]
    examples: list[Question]  # the dev split: where the few-shot examples come from


def parse_task(task: str | None) -> tuple[str, str] | Problem:
    """`mmlu_test` -> ("mmlu", "test"), or the problem with it."""
    known = [f"{name}_{split}" for name, layout in TASKS.items() for split in layout.splits]
    if task in known:
        name, split = task.split("_", 1)
        return name, split
    given = "is required" if not task else f"given {task!r}"
    return Problem("task", f"{given}; one of {', '.join(known)}{did_you_mean(task, known) if task else ''}")


class TaskFiles:
    """One task's folder: mapping.json, and the CSVs from its zip or from the extracted files beside it."""

    def __init__(self, folder: str, name: str):
        self.folder, self.name = folder, name
        archive = os.path.join(folder, f"{name}.zip")
        self._zip = zipfile.ZipFile(archive) if os.path.isfile(archive) else None
        self._names = {n: n for n in self._zip.namelist()} if self._zip else {}

    def mapping(self) -> dict[str, dict[str, str]]:
        with open(os.path.join(self.folder, "mapping.json"), encoding="utf-8") as handle:
            return json.load(handle)

    def read(self, relative: str) -> str | None:
        """A file's text by its path inside the archive (any top folder the zip adds is allowed), else on disk."""
        if self._zip is not None:
            member = self._names.get(relative) or next((n for n in self._names if n.endswith("/" + relative)), None)
            if member is not None:
                return self._zip.read(member).decode("utf-8-sig")
        on_disk = os.path.join(self.folder, relative)
        if os.path.isfile(on_disk):
            with open(on_disk, encoding="utf-8-sig") as handle:
                return handle.read()
        return None


def task_folder(task_dir: str, name: str, download_mode: str) -> tuple[str | None, list[Problem]]:
    """The folder holding the task: on disk, else fetched from a Hub dataset repository named by task_dir."""
    local = os.path.join(os.path.abspath(task_dir), name)
    if os.path.isfile(os.path.join(local, "mapping.json")):
        return local, []
    missing = f"{local} has no mapping.json"
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", task_dir) or os.path.exists(task_dir):
        return None, [
            Problem(
                "task_dir",
                f"{missing}; put LLaMA-Factory's evaluation/{name} folder there "
                f"(mapping.json and {name}.zip), or name a Hub dataset repo that holds it",
            )
        ]
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None, [Problem("task_dir", f"{missing}, and HF_HUB_OFFLINE is set: {name}/ cannot be fetched from "
                                          f"the Hub dataset {task_dir!r}")]  # fmt: skip
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(task_dir, repo_type="dataset", allow_patterns=[f"{name}/*"],
                                 force_download=download_mode == "force_redownload")  # fmt: skip
    except Exception as error:  # the Hub's errors are many (network, auth, missing repo): each is this one problem
        return None, [Problem("task_dir", f"{missing}, and fetching {name}/ from the Hub dataset {task_dir!r} "
                                          f"failed: {type(error).__name__}: {error}")]  # fmt: skip
    fetched = os.path.join(root, name)
    if not os.path.isfile(os.path.join(fetched, "mapping.json")):
        return None, [Problem("task_dir", f"the Hub dataset {task_dir!r} has no {name}/mapping.json")]
    return fetched, []


def load_subjects(folder: str, name: str, split: str) -> tuple[list[Subject], list[Problem]]:
    """Every subject of mapping.json with its questions and dev examples; every missing or bad file named."""
    layout, files = TASKS[name], TaskFiles(folder, name)
    try:
        mapping = files.mapping()
    except (OSError, ValueError) as error:
        return [], [Problem("task_dir", f"{folder}/mapping.json cannot be read: {error}")]
    subjects, problems = [], []
    for key, info in mapping.items():
        parts = {}
        for part, wanted in (("questions", split), ("examples", "train")):
            relative = layout.path(key, SPLIT_FOLDERS[wanted])
            text = files.read(relative)
            if text is None:
                problems.append(Problem("task_dir", f"{name}: subject {key!r} has no {relative} in {folder}"))
                continue
            try:
                parts[part] = layout.read(text)
            except (KeyError, IndexError, csv.Error) as error:
                problems.append(Problem("task_dir", f"{name}: {relative} is not a {name} CSV ({error!r} missing)"))
        bad = [q.answer for q in parts.get("questions", []) if q.answer not in CHOICES + ("",)]
        if bad:
            problems.append(Problem("task_dir", f"{name}: subject {key!r} has answers {sorted(set(bad))[:3]}; "
                                                "expected A, B, C or D"))  # fmt: skip
        if len(parts) == 2 and not bad:
            subjects.append(Subject(key, info.get("name", key), info.get("category", "Other"), parts["questions"],
                                    parts["examples"]))  # fmt: skip
    return subjects, problems
