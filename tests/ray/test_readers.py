"""Reading every file type with Ray Data (in Ray tasks), on the session's local cluster."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.data.formats import convert
from orchestrator.data.readers import DatasetReadError, column_names, read_dataset, sample_indexes
from orchestrator.data.registry import DatasetSpec, HubSource, resolve_datasets

pytestmark = pytest.mark.ray

ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(6)]


def prompts(spec: DatasetSpec) -> list[str]:
    return [convert(row, spec, "sft")["prompt"][-1]["content"] for row in read_dataset(spec).take_all()]


@pytest.fixture
def data_dir(tmp_path):
    """One small dataset per file type, a folder of JSON lines, and their dataset_info.json."""
    table = pa.Table.from_pylist(ROWS)
    (tmp_path / "array.json").write_text(json.dumps(ROWS))
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "data.csv").write_text(table.to_pandas().to_csv(index=False))
    pq.write_table(table, tmp_path / "data.parquet")
    with pa.OSFile(str(tmp_path / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "text.txt").write_text("first line\n\nthird line\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    (shards / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[3:]))
    entries = {name: {"file_name": name} for name in ("array.json", "lines.jsonl", "data.csv", "data.parquet",
                                                       "data.arrow", "shards")}  # fmt: skip
    entries["text.txt"] = {"file_name": "text.txt", "columns": {"prompt": "text"}}
    entries["sampled"] = {"file_name": "shards", "num_samples": 9}
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    return tmp_path


def resolved(data_dir, name: str) -> DatasetSpec:
    (spec,), problems = resolve_datasets([name], str(data_dir), seed=3)
    assert problems == []
    return spec


def test_every_file_type_reads_in_order(ray_cluster, data_dir):
    for name in ("array.json", "lines.jsonl", "data.csv", "data.parquet", "data.arrow", "shards"):
        assert prompts(resolved(data_dir, name)) == [f"q{i}" for i in range(6)], name
    assert prompts(resolved(data_dir, "text.txt")) == ["first line", "", "third line"]
    assert column_names(resolved(data_dir, "data.parquet")) == ["instruction", "input", "output"]


def test_rows_of_differing_structure_read_as_one_dataset(ray_cluster, tmp_path):
    """Optional keys, nulls and a value that is text here and a list there, in different files and blocks."""
    rows = [
        {"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": None},
        {"messages": [{"from": "human", "value": "q", "weight": 1}, {"from": "gpt", "value": "a"}], "tools": "[]"},
        {"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "extra": {"k": [1]}}],
         "tools": [{"name": "f"}], "only_here": 1},
    ]  # fmt: skip
    for index, row in enumerate(rows):
        (tmp_path / f"{index}.jsonl").write_text(json.dumps(row) + "\n")
    files = tuple(str(tmp_path / f"{i}.jsonl") for i in range(3))
    spec = DatasetSpec("mixed", files, "json", "sharegpt", {"messages": "messages", "tools": "tools"})
    examples = [convert(row, spec, "sft") for row in read_dataset(spec).take_all()]
    assert [e["tools"] for e in examples] == ["", "[]", '[{"name": "f"}]'] and not any(e["invalid"] for e in examples)
    assert column_names(spec) == ["messages", "only_here", "tools"]


def test_a_row_or_file_that_is_not_json_is_reported(ray_cluster, tmp_path):
    """One line naming the file or row (tests/unit/test_formats_registry.py: without a failed task's traceback)."""
    (tmp_path / "bad.jsonl").write_text('{"instruction": "q"}\n{"instruction": \n')
    (tmp_path / "bad.json").write_text('[{"instruction": "q"},\n{"instruction": }]\n')
    with pytest.raises(DatasetReadError, match="a row is not valid JSON"):
        column_names(DatasetSpec("bad", (str(tmp_path / "bad.jsonl"),), "json"))
    with pytest.raises(DatasetReadError, match=r"bad.json is not valid JSON: Expecting value: line 2"):
        column_names(DatasetSpec("bad", (str(tmp_path / "bad.json"),), "json"))


def test_num_samples_picks_rows_as_llamafactory(ray_cluster, data_dir):
    expected = [f"q{i}" for i in sample_indexes(6, 9, seed=3)]
    assert prompts(resolved(data_dir, "sampled")) == expected


def test_hub_dataset_loads_with_datasets_in_a_task(ray_cluster, data_dir):
    hub_dir = data_dir / "hub"
    hub_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), hub_dir / "train.parquet")
    spec = DatasetSpec("hub", (), "hub", hub=HubSource("hf_hub", str(hub_dir)), num_samples=2, seed=0)
    assert prompts(spec) == [f"q{i}" for i in sample_indexes(6, 2, seed=0)]


def test_each_part_of_a_big_file_is_read_and_tokenized_by_its_own_task(ray_cluster, tiny_model, tmp_path):
    """A file of several parts gives one block per part all the way through tokenizing (before, Ray fused every
    part's reading and tokenizing into one task once the tokenizing batches were larger than the number of parts)."""
    from orchestrator.config import validate_config
    from orchestrator.data.pipeline import TokenizeJob, examples_only, tokenize_dataset
    from orchestrator.data.readers import file_parts

    rows = [
        {"instruction": f"question {i} " + "word " * 20, "input": "", "output": f"answer {i}"} for i in range(12000)
    ]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate_config({"model_name_or_path": tiny_model, "dataset": "big.jsonl", "dataset_dir": str(tmp_path),
                           "template": "default", "cutoff_len": 64, "preprocessing_batch_size": 1000})  # fmt: skip
    (spec,), _ = resolve_datasets(["big.jsonl"], str(tmp_path))
    parts = file_parts(spec)
    assert len(parts) >= 2
    tokenized = examples_only(tokenize_dataset(spec, TokenizeJob.from_config(cfg), cfg)).materialize()
    assert tokenized.num_blocks() >= len(parts)
    assert tokenized.count() == len(rows)
