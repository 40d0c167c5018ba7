"""LLaMA Pro block expansion on the real tiny model (torch, no Ray): identity blocks, the trained-layer rule, refusals."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from orchestrator.llama_pro import INFO_FILE, expand_model, expansion_plan, llama_pro_trainable_layers

ATOL = 1e-6  # measured: the expanded model's logits equal the original's exactly (max |diff| 0.0) on this CPU


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def layer_state(model, index: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{index}."
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def four_layer_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model's architecture with 4 random-init layers (and its tokenizer files), to expand in groups of 2."""
    from transformers import AutoConfig, LlamaForCausalLM

    folder = str(tmp_path_factory.mktemp("tiny4") / "tiny-llama-4")
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers = 4
    torch.manual_seed(4)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_model, name), folder)
    return folder


@pytest.mark.parametrize("num_expand", [1, 2])
def test_expanded_tiny_model_computes_the_same_logits(tiny_model, tmp_path, num_expand):
    target = str(tmp_path / "pro")
    summary = expand_model(tiny_model, target, num_expand)
    assert summary["num_layers_before"] == 2 and summary["num_layers_after"] == 2 + num_expand
    assert summary["new_layers"] == ([2] if num_expand == 1 else [1, 3])
    assert json.load(open(os.path.join(target, "config.json")))["num_hidden_layers"] == 2 + num_expand
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", INFO_FILE):
        assert os.path.isfile(os.path.join(target, name)), name
    original, expanded = load(tiny_model), load(target)
    ids = torch.randint(5, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(expanded, ids), logits(original, ids), atol=ATOL, rtol=0)
    # the new blocks: zero output projections, everything else a copy of the group's last block
    for new, source in summary["copied_from"].items():
        copied, block = layer_state(original, source), layer_state(expanded, new)
        assert block.keys() == copied.keys()
        for name, tensor in block.items():
            if name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                assert not tensor.any(), name
            else:
                assert torch.equal(tensor, copied[name]), name
    # the original blocks keep their weights under their new numbers
    old_blocks = [i for i in range(summary["num_layers_after"]) if i not in summary["new_layers"]]
    for old, new in enumerate(old_blocks):
        assert all(torch.equal(t, layer_state(original, old)[n]) for n, t in layer_state(expanded, new).items())
    assert llama_pro_trainable_layers(expanded.config.num_hidden_layers, num_expand) == summary["new_layers"]


def test_groups_of_two_copy_each_groups_last_block(four_layer_model, tmp_path):
    summary = expand_model(four_layer_model, str(tmp_path / "pro"), 2)
    assert summary["new_layers"] == [2, 5] and summary["copied_from"] == {2: 1, 5: 3}
    assert llama_pro_trainable_layers(6, 2) == [2, 5]
    original, expanded = load(four_layer_model), load(str(tmp_path / "pro"))
    assert torch.equal(
        layer_state(expanded, 2)["self_attn.q_proj.weight"], layer_state(original, 1)["self_attn.q_proj.weight"]
    )
    assert torch.equal(layer_state(expanded, 4)["mlp.up_proj.weight"], layer_state(original, 3)["mlp.up_proj.weight"])
    ids = torch.randint(5, original.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(expanded, ids), logits(original, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_layers", range(1, 13))
def test_trainable_rule_is_exactly_the_inserted_blocks(num_layers):
    for num_expand in [k for k in range(1, num_layers + 1) if num_layers % k == 0]:
        plan = expansion_plan(num_layers, num_expand)
        inserted = [i for i, (_, new) in enumerate(plan) if new]
        assert llama_pro_trainable_layers(len(plan), num_expand) == inserted


def test_trainable_rule_examples_and_refusals():
    assert llama_pro_trainable_layers(40, 8) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert llama_pro_trainable_layers(4, 4) == [0, 1, 2, 3]
    for layers, trainable in [(6, 4), (4, 0), (4, -2), (4, 5)]:
        with pytest.raises(ValueError, match="freeze_trainable_layers"):
            llama_pro_trainable_layers(layers, trainable)


def test_refusals_leave_nothing_behind(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="cannot be split into num_expand=3"):
        expand_model(tiny_model, str(tmp_path / "a"), 3)
    with pytest.raises(ValueError, match="at least 1"):
        expand_model(tiny_model, str(tmp_path / "b"), 0)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        expand_model(tiny_model, str(busy), 1)
    assert os.listdir(busy) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["busy"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert expand_model(tiny_model, str(empty), 1)["num_layers_after"] == 3  # an empty folder is fine


def test_unrecognized_layer_naming_is_refused(tmp_path):
    from safetensors.torch import save_file

    source = tmp_path / "gpt2ish"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_hidden_layers": 2}))
    tensors = {f"transformer.h.{i}.attn.c_proj.weight": torch.ones(2, 2) for i in range(2)}
    save_file(tensors, str(source / "model.safetensors"))
    with pytest.raises(ValueError, match="unrecognized layer naming"):
        expand_model(str(source), str(tmp_path / "out"), 1)
    assert sorted(os.listdir(tmp_path)) == ["gpt2ish"]


def test_per_layer_config_lists_follow_the_expansion(tmp_path):
    """Qwen2-style layer_types and max_window_layers (and a sharded checkpoint) are expanded consistently."""
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(str(tmp_path / "src"), max_shard_size="8KB")
    assert os.path.isfile(tmp_path / "src" / "model.safetensors.index.json")
    summary = expand_model(str(tmp_path / "src"), str(tmp_path / "pro"), 2)
    expanded_config = AutoConfig.from_pretrained(str(tmp_path / "pro"))
    assert expanded_config.layer_types == ["full_attention"] * 4 + ["sliding_attention"] * 2
    assert expanded_config.max_window_layers == 4 and summary["new_layers"] == [2, 5]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(load(str(tmp_path / "pro")), ids), logits(model, ids), atol=ATOL, rtol=0)


def test_a_failed_write_leaves_no_target_and_no_scratch(tiny_model, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        expand_model(tiny_model, str(tmp_path / "pro"), 2)
    assert os.listdir(tmp_path) == []


def test_one_step_moves_only_the_new_blocks(tiny_model, tmp_path):
    """Freeze tuning with use_llama_pro: only the inserted blocks train; the original blocks stay bit-identical."""
    target = str(tmp_path / "pro")
    summary = expand_model(tiny_model, target, 2)
    model = load(target).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = llama_pro_trainable_layers(model.config.num_hidden_layers, 2)
    pattern = re.compile(r"\.(\d+)\.")
    for name, param in model.named_parameters():
        match = pattern.search(name)
        param.requires_grad_(bool(match) and int(match.group(1)) in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name, tensor in after.items():
        match = pattern.search(name)
        if match and int(match.group(1)) in summary["new_layers"]:
            continue
        assert torch.equal(tensor, before[name]), f"{name} changed"
    for index in summary["new_layers"]:
        # with zero output projections only those receive a gradient at the first step, and they move off zero
        assert after[f"model.layers.{index}.self_attn.o_proj.weight"].any()
        assert after[f"model.layers.{index}.mlp.down_proj.weight"].any()
