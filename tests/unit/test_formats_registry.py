"""dataset_info.json entries, format conversion and file reading, checked on hand-written rows (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.data.formats import convert, required_columns
from orchestrator.data.readers import FILE_READERS, file_parts, sample_indexes
from orchestrator.data.registry import ROW_COLUMN, DatasetSpec, resolve_datasets


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def spec(formatting="alpaca", columns=None, tags=None, ranking=False):
    return DatasetSpec("d", ("d.json",), "json", formatting, columns or {}, tags or {}, ranking)


def registry_spec(entry):
    """The spec that an entry of a real dataset_info.json resolves to (LLaMA-Factory's column semantics)."""
    from orchestrator.data.registry import _spec

    return _spec("d", ("d.json",), "json", entry, 42, None)


# ---- alpaca --------------------------------------------------------------------------------------------------------


def test_alpaca_history_system_tools():
    entry = {"columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                         "system": "system", "tools": "tools"}}  # fmt: skip
    row = {"instruction": "Do it", "input": "now", "output": "done", "history": [["q", "a"]], "system": "be brief",
           "tools": [{"name": "f"}]}  # fmt: skip
    assert convert(row, registry_spec(entry), "sft") == {
        "prompt": [user("q"), assistant("a"), user("Do it\nnow")],
        "response": [assistant("done")],
        "system": "be brief",
        "tools": '[{"name": "f"}]',
        "kto_tag": None,
        "invalid": None,
    }


def test_alpaca_empty_input_and_unset_columns():
    row = {"instruction": "Do it", "input": "", "output": "done"}
    assert convert(row, spec(), "sft")["prompt"] == [user("Do it")]
    # As in LLaMA-Factory, an entry that gives columns leaves the others unset: "input" is not read here.
    only = registry_spec({"columns": {"prompt": "instruction", "response": "output"}})
    assert convert({"instruction": "a", "input": "b", "output": "c"}, only, "sft")["prompt"] == [user("a")]


def test_alpaca_ranking_and_kto():
    ranking = spec(columns={"chosen": "good", "rejected": "bad"}, ranking=True)
    example = convert({"instruction": "q", "good": "yes", "bad": "no"}, ranking, "dpo")
    assert example["response"] == [assistant("yes"), assistant("no")]
    kto = spec(columns={"kto_tag": "label"})
    assert convert({"instruction": "q", "output": "a", "label": False}, kto, "kto")["kto_tag"] is False
    desirable = convert({"instruction": "q", "output": "a", "label": True}, kto, "kto")
    assert desirable["response"] == [assistant("a")] and desirable["kto_tag"] is True
    assert convert({"instruction": "q", "output": "a", "label": "yes"}, kto, "kto")["kto_tag"] is None


def test_alpaca_broken_history_and_missing_output():
    broken = convert({"instruction": "q", "output": "a", "h": [["only one"]]}, spec(columns={"history": "h"}), "sft")
    assert broken["invalid"] == "history entry 1 is not a [prompt, response] pair"
    assert convert({"instruction": "q", "output": None}, spec(), "sft")["response"] == []


# ---- sharegpt ------------------------------------------------------------------------------------------------------

GLAIVE = {
    "conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."},
    ],
    "tools": '[{"name": "w"}]',
}


def test_sharegpt_system_tools_function_and_observation():
    example = convert(GLAIVE, spec("sharegpt", {"messages": "conversations", "tools": "tools"}), "sft")
    assert example["system"] == "S" and example["tools"] == '[{"name": "w"}]'
    assert example["prompt"] == [
        user("weather?"),
        {"role": "function", "content": '{"name": "w"}'},
        {"role": "observation", "content": "sunny"},
    ]
    assert example["response"] == [assistant("It is sunny.")] and example["invalid"] is None


def test_sharegpt_custom_tags_and_system_column():
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    entry = {"formatting": "sharegpt", "columns": {"messages": "messages", "system": "sys"}, "tags": tags}
    row = {"messages": [user("hi"), assistant("yo")], "sys": "column system"}
    example = convert(row, registry_spec(entry), "sft")
    assert (example["prompt"], example["response"], example["system"]) == (
        [user("hi")],
        [assistant("yo")],
        "column system",
    )


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "message 1 has role 'gpt'"),
        ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "message 2 has role 'human'"),
        ([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}], "message 2 has role 'bot'"),
        ([{"from": "human", "value": "q"}], "odd number of messages"),
        ([], "no messages"),
        ("not a list", "does not hold a list of messages"),
    ],
)
def test_sharegpt_broken_conversations_are_invalid_with_a_reason(messages, reason):
    example = convert({"conversations": messages}, spec("sharegpt"), "sft")
    assert reason in example["invalid"] and example["prompt"] == [] and example["response"] == []


def test_sharegpt_ranking_and_kto():
    ranking = spec("sharegpt", {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}, ranking=True)
    row = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
           "rejected": {"from": "gpt", "value": "bad"}}  # fmt: skip
    example = convert(row, ranking, "dpo")
    assert example["prompt"] == [user("q")] and example["response"] == [assistant("good"), assistant("bad")]
    assert "role 'human'" in convert({**row, "rejected": {"from": "human", "value": "x"}}, ranking, "dpo")["invalid"]
    even = {**row, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert "ranking conversation must end with a user" in convert(even, ranking, "dpo")["invalid"]
    kto = spec("sharegpt", {"messages": "conversations", "kto_tag": "label"})
    tagged = convert({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                      "label": False}, kto, "kto")  # fmt: skip
    assert tagged["response"] == [assistant("a")] and tagged["kto_tag"] is False


# ---- openai --------------------------------------------------------------------------------------------------------


def test_openai_tool_calls_and_tool_results():
    call = {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            user("weather in Oslo and Bergen?"),
            {"role": "assistant", "content": None, "tool_calls": [call, call]},
            {"role": "tool", "content": "rain"},
            {"role": "tool", "content": "sun"},
            assistant("Rain in Oslo, sun in Bergen."),
        ],
        "tools": [{"type": "function", "function": {"name": "w"}}],
    }
    example = convert(row, spec("openai", {"messages": "messages", "tools": "tools"}), "sft")
    function = {"role": "function", "content": json.dumps([call["function"]] * 2)}
    observation = {"role": "observation", "content": "rain\n</tool_response>\n<tool_response>\nsun"}
    assert example["prompt"] == [user("weather in Oslo and Bergen?"), function, observation]
    assert example["response"] == [assistant("Rain in Oslo, sun in Bergen.")]
    assert example["tools"] == json.dumps(row["tools"]) and example["system"] == "S\n"  # LLaMA-Factory's newline


def test_openai_system_prompt_marks_thinking_off_as_llamafactory_does():
    chat = {"messages": [user("hi"), assistant("yo")]}
    openai = spec("openai", {"messages": "messages", "system": "system"})
    assert convert(chat, openai, "sft")["system"] == "detailed thinking off"
    assert convert({**chat, "system": "Be kind."}, openai, "sft")["system"] == "Be kind.\ndetailed thinking off"
    assert convert({**chat, "system": "detailed thinking on"}, openai, "sft")["system"] == "detailed thinking on"


def test_openai_wrong_order_and_unknown_role():
    openai = spec("openai", {"messages": "messages"})
    assert "turn 2 has role 'user'" in convert({"messages": [user("a"), user("b")]}, openai, "sft")["invalid"]
    assert (
        "unknown role 'robot'" in convert({"messages": [{"role": "robot", "content": "x"}]}, openai, "sft")["invalid"]
    )


# ---- rows as JSON text, required columns ---------------------------------------------------------------------------


def test_rows_read_as_json_text_convert_the_same():
    row = {"instruction": "q", "output": "a"}
    assert convert({ROW_COLUMN: json.dumps(row)}, spec(), "sft") == convert(row, spec(), "sft")
    with pytest.raises(ValueError, match="not valid JSON"):
        convert({ROW_COLUMN: "{broken"}, spec(), "sft")


def test_required_columns():
    assert required_columns(spec(), "sft") == ["instruction", "output"]
    assert required_columns(spec(), "pt") == ["instruction"]
    text = registry_spec({"columns": {"prompt": "text"}})
    assert required_columns(text, "pt") == ["text"]
    glaive = registry_spec({"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}})
    assert required_columns(glaive, "sft") == ["conversations", "tools"]


# ---- registry ------------------------------------------------------------------------------------------------------


def write_registry(folder, entries, files=("data.json",)):
    for name in files:
        (folder / name).write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    (folder / "dataset_info.json").write_text(json.dumps(entries))
    return str(folder)


def problems_of(folder, entries, names=None, **kwargs):
    _, problems = resolve_datasets(names or list(entries), write_registry(folder, entries), **kwargs)
    return " | ".join(p.message for p in problems)


def test_registry_problems_are_named(tmp_path):
    entries = {
        "missing": {"file_name": "nope.json"},
        "bad_format": {"file_name": "data.json", "formatting": "chatml"},
        "script": {"script_url": "my_script"},
        "cloud": {"cloud_file_name": "s3://bucket/data.json"},
        "images": {"file_name": "data.json", "formatting": "sharegpt", "columns": {"messages": "m", "images": "pics"}},
        "samples": {"file_name": "data.json", "num_samples": 0},
        "split": {"file_name": "data.json", "split": "validation"},
    }
    message = problems_of(tmp_path, entries)
    assert "file_name 'nope.json' does not exist" in message
    assert "formatting 'chatml' is not one of alpaca, sharegpt, openai" in message
    assert "script_url datasets are not supported" in message and "cloud_file_name datasets" in message
    assert "column 'images' ('pics') holds images" in message and "multimodal" in message
    assert "num_samples must be a positive integer" in message and "split 'validation'" in message


def test_unknown_name_suggests_a_close_one(tmp_path):
    assert "did you mean 'alpaca'?" in problems_of(tmp_path, {"alpaca": {"file_name": "data.json"}}, ["alpacca"])


def test_stage_must_fit_ranking_and_kto(tmp_path):
    entries = {"pairs": {"file_name": "data.json", "ranking": True, "columns": {"chosen": "c", "rejected": "r"}},
               "plain": {"file_name": "data.json"}}  # fmt: skip
    assert "for stage rm or dpo, not sft" in problems_of(tmp_path, entries, ["pairs"], stage="sft")
    assert "needs ranking datasets" in problems_of(tmp_path, entries, ["plain"], stage="dpo")
    assert "stage kto needs a kto_tag column" in problems_of(tmp_path, entries, ["plain"], stage="kto")
    assert problems_of(tmp_path, entries, ["pairs"], stage="dpo") == ""


def test_hub_datasets_offline_are_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = problems_of(tmp_path, {"remote": {"hf_hub_url": "loom-tests/not-cached-anywhere"}})
    assert "hf_hub_url 'loom-tests/not-cached-anywhere' cannot be downloaded: offline mode" in message
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    both = {"remote": {"hf_hub_url": "a/b", "ms_hub_url": "c/d"}}
    assert "ms_hub dataset 'c/d' needs the modelscope package" in problems_of(tmp_path, both)


def test_hub_spec_keeps_subset_split_and_folder(tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    entries = {"local_hub": {"hf_hub_url": str(folder), "subset": "en", "split": "test", "folder": "python",
                             "num_samples": 5}}  # fmt: skip
    (dataset,), problems = resolve_datasets(["local_hub"], write_registry(tmp_path, entries), seed=7)
    assert problems == [] and dataset.file_type == "hub" and (dataset.num_samples, dataset.seed) == (5, 7)
    assert (dataset.hub.load_from, dataset.hub.subset, dataset.hub.split, dataset.hub.folder) == (
        "hf_hub", "en", "test", "python")  # fmt: skip


def test_file_types_and_folders_resolve(tmp_path):
    pq.write_table(pa.table({"instruction": ["q"], "output": ["a"]}), tmp_path / "data.parquet")
    (tmp_path / "data.csv").write_text("instruction,output\nq,a\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(2):
        (shards / f"part{index}.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    (shards / ".hidden").write_text("skipped")
    entries = {"p": {"file_name": "data.parquet"}, "c": {"file_name": "data.csv"}, "s": {"file_name": "shards"}}
    specs, problems = resolve_datasets(list(entries), write_registry(tmp_path, entries))
    assert problems == [] and [s.file_type for s in specs] == ["parquet", "csv", "json"]
    assert [f.rsplit("/", 1)[1] for f in specs[2].files] == ["part0.jsonl", "part1.jsonl"]
    (shards / "notes.md").write_text("x")
    assert "file types ['.jsonl', '.md'] are not supported" in problems_of(tmp_path, entries, ["s"])


# ---- file readers (the functions Ray tasks run) ----------------------------------------------------------------------


def read(path, file_type):
    return pa.concat_tables(FILE_READERS[file_type](str(path))).to_pylist()


def test_json_arrays_and_json_lines_become_json_text_rows(tmp_path):
    rows = [{"a": 1, "m": [{"x": 1}]}, {"a": None, "m": [{"x": 1, "y": "\u2028"}]}]
    (tmp_path / "array.json").write_text(json.dumps(rows, ensure_ascii=False))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    for name in ("array.json", "lines.json"):
        assert [json.loads(r[ROW_COLUMN]) for r in read(tmp_path / name, "json")] == rows


def test_text_lines_split_as_datasets_does(tmp_path):
    (tmp_path / "t.txt").write_text("one\r\ntwo\n\nthree\u2028still three\n", encoding="utf-8", newline="")
    assert [r["text"] for r in read(tmp_path / "t.txt", "text")] == ["one", "two", "", "three\u2028still three"]


@pytest.mark.parametrize("file_type", ["json", "text"])
def test_big_files_are_read_in_parts_cut_at_line_ends(tmp_path, file_type):
    lines = [json.dumps({"text": "x" * (i % 13), "i": i}) for i in range(200)] + ["", "\u00e9\u2028last"]
    path = tmp_path / "big.txt"
    path.write_text("\r\n".join(lines), encoding="utf-8", newline="")
    spec = DatasetSpec("big", (str(path),), file_type)
    parts = file_parts(spec, part_bytes=97)
    assert len(parts) > 50 and parts[-1]["part"] == len(parts) - 1
    tables = [t for p in parts for t in FILE_READERS[file_type](p["path"], p["start"], p["end"])]
    column = ROW_COLUMN if file_type == "json" else "text"
    read_lines = [line.rstrip("\r") for line in pa.concat_tables(tables).column(column).to_pylist()]
    assert read_lines == (lines[:200] + lines[201:] if file_type == "json" else lines)


def test_csv_parquet_and_arrow_tables(tmp_path):
    (tmp_path / "d.csv").write_text('instruction,input,output\nq,,a\n"x, y",NA,b\n')
    assert read(tmp_path / "d.csv", "csv") == [
        {"instruction": "q", "input": None, "output": "a"},
        {"instruction": "x, y", "input": None, "output": "b"},
    ]
    table = pa.table({"messages": [[{"role": "user", "content": "hi"}]], "n": [1]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    for path, file_type in (("d.parquet", "parquet"), ("stream.arrow", "arrow"), ("file.arrow", "arrow")):
        assert read(tmp_path / path, file_type) == table.to_pylist()


def test_num_samples_follows_llamafactory():
    picks = sample_indexes(10, 4, seed=42)
    np.random.seed(42)  # what LLaMA-Factory's set_seed leaves for its own draws
    assert picks.tolist() == np.random.permutation(10)[:4].tolist()
    over = sample_indexes(3, 8, seed=1)
    assert sorted(over[:3].tolist()) == [0, 1, 2] and len(over) == 8 and set(over.tolist()) <= {0, 1, 2}
    assert sample_indexes(10, 4, seed=42).tolist() == picks.tolist()


def test_a_file_or_row_that_is_not_json_is_reported_as_data_not_raised(tmp_path):
    """In the reading task a bad file or row becomes a READ_ERROR row or key instead of an exception, so no Ray task
    fails and no worker traceback is printed before the driver's one-line message (readers.column_names)."""
    from orchestrator.data.readers import _row_keys, json_tables
    from orchestrator.data.registry import READ_ERROR, ROW_COLUMN

    (tmp_path / "bad.json").write_text('[{"instruction": "q"},\n{"instruction": }]\n')
    rows = [row for table in json_tables(str(tmp_path / "bad.json")) for row in table.column(ROW_COLUMN).to_pylist()]
    assert len(rows) == 1 and rows[0].startswith(READ_ERROR) and "bad.json is not valid JSON" in rows[0]
    keys = _row_keys(pa.table({ROW_COLUMN: ['{"a": 1}', '{"b": ']})).column("key").to_pylist()
    assert "a" in keys and any(k.startswith(READ_ERROR + "a row is not valid JSON") for k in keys)
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        convert({ROW_COLUMN: rows[0]}, spec(), "sft")  # never trained on silently
