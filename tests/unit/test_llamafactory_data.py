"""LLaMA-Factory's own demo datasets resolve, convert and tokenize (skipped when ../shared is absent)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from orchestrator.data.formats import convert, required_columns
from orchestrator.data.processors import ProcessorOptions, pretrain_batch, supervised_batch
from orchestrator.data.readers import FILE_READERS
from orchestrator.data.registry import MEDIA_ROLES, ROW_COLUMN, resolve_datasets
from orchestrator.data.templates import get_template
from tests.helpers import LLAMAFACTORY_DATA

pytestmark = pytest.mark.skipif(not LLAMAFACTORY_DATA.is_dir(), reason="../shared/data/llamafactory is absent")


def registry() -> dict:
    return json.loads((LLAMAFACTORY_DATA / "dataset_info.json").read_text()) if LLAMAFACTORY_DATA.is_dir() else {}


def local_names(multimodal: bool) -> list[str]:
    """Entries with a local file_name, with or without media columns."""
    return [name for name, entry in registry().items()
            if "file_name" in entry and multimodal == any(r in entry.get("columns", {}) for r in MEDIA_ROLES)]  # fmt: skip


def resolve(name: str, stage: str | None = None):
    (spec,), problems = resolve_datasets([name], str(LLAMAFACTORY_DATA), stage=stage)
    assert problems == []
    return spec


def rows(spec, limit=None):
    """Rows as the Ray readers produce them (the same functions, run here without Ray)."""
    table = pa.concat_tables(table for path in spec.files for table in FILE_READERS[spec.file_type](path))
    return table.to_pylist()[:limit]


def stage_of(name: str) -> str:
    entry = registry()[name]
    if entry.get("ranking"):
        return "dpo"
    if "kto_tag" in entry.get("columns", {}):
        return "kto"
    return "pt" if entry.get("columns", {}).get("prompt") == "text" else "sft"


@pytest.mark.parametrize("name", local_names(multimodal=False))
def test_every_local_text_dataset_converts_without_invalid_rows(name):
    stage = stage_of(name)
    spec = resolve(name, stage)
    examples = [convert(row, spec, stage) for row in rows(spec)]
    assert examples and [e["invalid"] for e in examples if e["invalid"]] == []
    raw = [json.loads(row[ROW_COLUMN]) if ROW_COLUMN in row else row for row in rows(spec)]
    assert set(required_columns(spec, stage)) <= set().union(*raw)
    expected_responses = {"dpo": 2, "pt": None}.get(stage, 1)
    if expected_responses:
        assert all(len(e["prompt"]) % 2 == 1 and len(e["response"]) == expected_responses for e in examples)
    if stage == "kto":
        assert {e["kto_tag"] for e in examples} == {True, False}


@pytest.mark.parametrize("name", local_names(multimodal=True))
def test_multimodal_datasets_are_refused_by_column(name):
    _, problems = resolve_datasets([name], str(LLAMAFACTORY_DATA))
    assert problems and all("multimodal datasets are not supported" in p.message for p in problems)


def test_glaive_toolcall_keeps_tools_and_function_turns():
    spec = resolve("glaive_toolcall_en_demo", "sft")
    examples = [convert(row, spec, "sft") for row in rows(spec)]
    assert all(e["tools"] for e in examples[:20])
    roles = {turn["role"] for e in examples for turn in e["prompt"] + e["response"]}
    assert roles == {"user", "assistant", "function", "observation"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("name", ["alpaca_en_demo", "alpaca_zh_demo", "identity"])
def test_alpaca_demo_sets_prepare_for_sft(name, tokenizer):
    spec = resolve(name, "sft")
    examples = [convert(row, spec, "sft") for row in rows(spec, 40)]
    result = supervised_batch(tokenizer, get_template("default"), examples, ProcessorOptions(cutoff_len=256))
    assert len(result.columns["input_ids"]) == len(examples) and not result.dropped
    assert all(len(ids) <= 256 for ids in result.columns["input_ids"])
    assert all(any(label != -100 for label in labels) for labels in result.columns["labels"])


def test_c4_demo_packs_for_pretraining(tokenizer):
    spec = resolve("c4_demo", "pt")
    assert spec.column("prompt") == "text"
    examples = [convert(row, spec, "pt") for row in rows(spec, 40)]
    packed = pretrain_batch(
        tokenizer, get_template("default"), examples, ProcessorOptions(cutoff_len=128, packing=True)
    )
    total = sum(
        len(tokenizer.encode(e["prompt"][0]["content"] + tokenizer.eos_token, add_special_tokens=False))
        for e in examples
    )
    assert [len(b) for b in packed.columns["input_ids"]] == [128] * (total // 128)


def test_unknown_names_suggest_a_close_one():
    _, problems = resolve_datasets(["alpaca_en_dmeo"], str(LLAMAFACTORY_DATA))
    assert any("did you mean 'alpaca_en_demo'" in p.message for p in problems)


@pytest.mark.parametrize(
    ("name", "stage", "processor", "template"),
    [("dpo_en_demo", "dpo", "pairwise", "llama3"), ("kto_en_demo", "kto", "feedback", "qwen"),
     ("glaive_toolcall_en_demo", "sft", "supervised", "qwen"), ("glaive_toolcall_en_demo", "sft", "supervised",
     "default")],
)  # fmt: skip
def test_preference_and_tool_sets_tokenize_with_their_processor(name, stage, processor, template, tokenizer):
    from orchestrator.data.processors import IGNORE_INDEX, PROCESSORS, id_columns
    from orchestrator.data.templates import resolve_template

    spec = resolve(name, stage)
    examples = [convert(row, spec, stage) for row in rows(spec, 64)]
    tok = copy_with_template_tokens(tokenizer, template)
    out = PROCESSORS[processor](tok, resolve_template(template), examples, ProcessorOptions(cutoff_len=512))
    assert not out.dropped
    columns = id_columns(processor, False)
    assert all(len(out.columns[c]) == len(examples) for c in columns)
    label_columns = [c for c in columns if c.endswith("labels")]
    assert all(any(t != IGNORE_INDEX for t in labels) for c in label_columns for labels in out.columns[c])
    if processor == "feedback":
        assert set(out.columns["kto_tags"]) == {True, False}


def copy_with_template_tokens(tokenizer, template: str):
    """The tiny tokenizer plus the chat tokens a template spells (a real model's tokenizer has them)."""
    import copy

    from orchestrator.data.templates import get_template

    tok = copy.deepcopy(tokenizer)
    words = [w for w in get_template(template).stop_words if tok.convert_tokens_to_ids(w) in (None, tok.unk_token_id)]
    tok.add_tokens(words + ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"], special_tokens=True)
    return tok
