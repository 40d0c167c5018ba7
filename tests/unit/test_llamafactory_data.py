"""LLaMA-Factory's own demo datasets resolve and tokenize (skipped when ../shared is absent)."""

from __future__ import annotations

import json

import pytest

from orchestrator.data.formats import convert
from orchestrator.data.processors import ProcessorOptions, pretrain_batch, supervised_batch
from orchestrator.data.registry import resolve_datasets
from orchestrator.data.templates import get_template
from tests.helpers import LLAMAFACTORY_DATA

pytestmark = pytest.mark.skipif(not LLAMAFACTORY_DATA.is_dir(), reason="../shared/data/llamafactory is absent")


def rows(spec, limit=40):
    path = spec.files[0]
    with open(path) as handle:
        if path.endswith(".jsonl"):
            return [json.loads(next(handle)) for _ in range(limit)]
        return json.load(handle)[:limit]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("name", ["alpaca_en_demo", "alpaca_zh_demo", "identity"])
def test_alpaca_demo_sets_prepare_for_sft(name, tokenizer):
    (spec,), problems = resolve_datasets([name], str(LLAMAFACTORY_DATA))
    assert problems == []
    examples = [convert(row, spec, "sft") for row in rows(spec)]
    result = supervised_batch(tokenizer, get_template("default"), examples, ProcessorOptions(cutoff_len=256))
    assert len(result["columns"]["input_ids"]) == len(examples) and not result["dropped"]
    assert all(len(ids) <= 256 for ids in result["columns"]["input_ids"])
    assert all(any(label != -100 for label in labels) for labels in result["columns"]["labels"])


def test_c4_demo_packs_for_pretraining(tokenizer):
    (spec,), problems = resolve_datasets(["c4_demo"], str(LLAMAFACTORY_DATA))
    assert problems == [] and spec.column("prompt") == "text"
    examples = [convert(row, spec, "pt") for row in rows(spec)]
    packed = pretrain_batch(tokenizer, examples, ProcessorOptions(cutoff_len=128, packing=True))
    total = sum(
        len(tokenizer.encode(e["prompt"][0]["content"] + tokenizer.eos_token, add_special_tokens=False))
        for e in examples
    )
    assert [len(b) for b in packed["columns"]["input_ids"]] == [128] * (total // 128)


def test_formats_not_built_yet_are_refused_by_name():
    _, problems = resolve_datasets(["glaive_toolcall_en_demo", "dpo_en_demo", "alpaca_en_dmeo"], str(LLAMAFACTORY_DATA))
    messages = [p.message for p in problems]
    assert any("sharegpt" in m and "not supported yet" in m for m in messages)
    assert any("did you mean 'alpaca_en_demo'" in m for m in messages)
