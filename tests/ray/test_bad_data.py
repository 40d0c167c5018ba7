"""The bad-input battery, data tier: dataset files whose problems only reading them shows, and resources the cluster
does not have. Each runs `loom train` against the session's Ray cluster and is held to the same promises as the
driver tier (tests/bad_inputs.py): non-zero exit, the file or dataset named, no traceback, nothing written.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main
from tests.bad_inputs import Bad, alpaca_rows, check_refused, files_under, jsonl, registry, write_project

OWN = {"dataset_dir": "{project}/data", "dataset": "mine"}


def entry(file_name: str = "rows.jsonl", **extra) -> str:
    return registry(mine={"file_name": file_name, **extra})


def sharegpt(turns: list[tuple[str, str]]) -> dict:
    return {"conversations": [{"from": role, "value": text} for role, text in turns]}


SHAREGPT = {"formatting": "sharegpt", "columns": {"messages": "conversations"}}
GOOD = jsonl(alpaca_rows(8))

DATA_CASES = [
    Bad(
        "data file is a broken JSON array",
        ("rows.json",),
        config=OWN,
        files={"data/dataset_info.json": entry("rows.json"), "data/rows.json": '[{"instruction": "a", "output": "b"},'},
    ),  # fmt: skip
    Bad(
        "data file with a broken JSONL line",
        ("rows.jsonl", "not valid JSON", '{"instruction": "x", "output": '),
        config=OWN,
        files={
            "data/dataset_info.json": entry(),
            "data/rows.jsonl": "\n".join(
                line if i != 2 else '{"instruction": "x", "output": ' for i, line in enumerate(GOOD.splitlines())
            ),
        },
    ),  # fmt: skip
    Bad(
        "data file not UTF-8",
        ("rows.jsonl",),
        config=OWN,
        files={"data/dataset_info.json": entry(), "data/rows.jsonl": b'{"instruction": "\xff\xfe", "output": "b"}\n'},
    ),  # fmt: skip
    Bad("data file empty", ("mine",), config=OWN, files={"data/dataset_info.json": entry(), "data/rows.jsonl": ""}),
    Bad(
        "data file without the mapped columns",
        ("mine", "question"),
        config=OWN,
        files={
            "data/dataset_info.json": entry(columns={"prompt": "question", "response": "answer"}),
            "data/rows.jsonl": GOOD,
        },
    ),  # fmt: skip
    Bad(
        "every conversation in the wrong role order",
        ("mine", "dropped"),
        config=OWN,
        files={
            "data/dataset_info.json": entry(**SHAREGPT),
            "data/rows.jsonl": jsonl([sharegpt([("gpt", "hi"), ("human", "hello")])] * 6),
        },
    ),  # fmt: skip
    Bad(
        "no conversation has an answer",
        ("mine", "dropped"),
        config=OWN,
        files={
            "data/dataset_info.json": entry(**SHAREGPT),
            "data/rows.jsonl": jsonl([sharegpt([("human", f"hello {i}")]) for i in range(6)]),
        },
    ),  # fmt: skip
    Bad(
        "fewer rows than workers",
        ("mine", "fewer than 2 workers"),
        config=OWN,
        files={"data/dataset_info.json": entry(), "data/rows.jsonl": jsonl(alpaca_rows(1))},
    ),  # fmt: skip
    Bad(
        "rows that are not objects",
        ("rows.jsonl",),
        config=OWN,
        files={"data/dataset_info.json": entry(), "data/rows.jsonl": "[1, 2]\n[3, 4]\n"},
    ),  # fmt: skip
    Bad(
        "eval file broken",
        ("eval.jsonl",),
        config={**OWN, "eval_dataset": "held", "eval_strategy": "steps", "eval_steps": 1},
        files={
            "data/dataset_info.json": registry(mine={"file_name": "rows.jsonl"}, held={"file_name": "eval.jsonl"}),
            "data/rows.jsonl": GOOD,
            "data/eval.jsonl": "{not json\n",
        },
    ),  # fmt: skip
    Bad(
        "more CPUs per worker than any node has",
        ("resources_per_worker",),
        config={"resources_per_worker": {"CPU": 64}},
    ),  # fmt: skip
    Bad(
        "a resource the cluster lacks",
        ("resources_per_worker", "TPU"),
        config={"resources_per_worker": {"CPU": 1, "TPU": 1}},
    ),  # fmt: skip
]


@pytest.mark.parametrize("case", DATA_CASES, ids=str)
def test_bad_data_stops_before_training(case, ray_cluster, tiny_model, tmp_path, capfd, monkeypatch):
    project = tmp_path / "project"
    argv = write_project(case, project, tiny_model)
    monkeypatch.chdir(project)
    before = files_under(project)
    code = main([*argv, "--address", ray_cluster.gcs_address])
    captured = capfd.readouterr()
    check_refused(case, project, code, captured.out + captured.err, before)


def test_a_huge_single_row_is_truncated_not_fatal(ray_cluster, tiny_model, tmp_path, capfd, monkeypatch):
    """Not an error: a 4 MB row is read and cut to cutoff_len like any other (the data summary counts it)."""
    project = tmp_path / "project"
    rows = alpaca_rows(7) + [{"instruction": "x " * 2_000_000, "input": "", "output": "y"}]
    case = Bad("huge row", (), config={**OWN, "max_steps": 1},
               files={"data/dataset_info.json": entry(), "data/rows.jsonl": jsonl(rows)})  # fmt: skip
    argv = write_project(case, project, tiny_model)
    monkeypatch.chdir(project)
    code = main([*argv, "--address", ray_cluster.gcs_address])
    output = "".join(capfd.readouterr())
    assert code == 0 and "Traceback" not in output, output[-3000:]
    summary = json.loads(output.split("data          ", 1)[1].splitlines()[0])
    assert summary["datasets"]["mine"]["truncated"] >= 1, summary
