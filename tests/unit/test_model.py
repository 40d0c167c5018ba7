"""Fine-tuning methods on the real tiny model (torch, no Ray): which parameters train, and name checks."""

from __future__ import annotations

import pytest

from orchestrator.errors import ConfigError
from orchestrator.preflight import preflight
from tests.helpers import tiny_config
from workers.model import build_model, linear_module_names


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_lora_all_targets_every_linear_layer_but_the_head(tiny_model):
    model = build_model(tiny_config(tiny_model, lora_rank=4))
    names = trainable(model)
    assert names and all("lora_" in n for n in names)
    targeted = {n.split(".lora_")[0].split(".")[-1] for n in names}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8


def test_lora_with_additional_target_and_dora(tiny_model):
    model = build_model(
        tiny_config(tiny_model, lora_target="q_proj,v_proj", additional_target="lm_head", use_dora=True)
    )
    names = trainable(model)
    assert any("lm_head" in n and "modules_to_save" in n for n in names)
    assert any("lora_magnitude_vector" in n for n in names)
    assert not any("k_proj" in n for n in names)


def test_freeze_trains_the_last_layers_and_extra_modules(tiny_model):
    model = build_model(
        tiny_config(
            tiny_model, finetuning_type="freeze", freeze_trainable_layers=1, freeze_extra_modules="embed_tokens"
        )
    )
    names = trainable(model)
    assert names and all(".layers.1." in n or "embed_tokens" in n for n in names)
    assert any("embed_tokens" in n for n in names)
    first = build_model(
        tiny_config(tiny_model, finetuning_type="freeze", freeze_trainable_layers=-1, freeze_trainable_modules="mlp")
    )
    assert trainable(first) and all(".layers.0.mlp." in n for n in trainable(first))


def test_full_trains_everything(tiny_model):
    model = build_model(tiny_config(tiny_model, finetuning_type="full"))
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_wrong_module_names_stop_at_the_driver(tiny_model):
    with pytest.raises(ConfigError) as caught:
        preflight(tiny_config(tiny_model, lora_target="q_proj,qkv_proj"), "cfg.yaml")
    message = str(caught.value)
    assert "lora_target" in message and "'qkv_proj' is not in the model" in message and "q_proj" in message
    with pytest.raises(ConfigError, match="freeze_trainable_modules"):
        preflight(tiny_config(tiny_model, finetuning_type="freeze", freeze_trainable_modules="attention"), "cfg.yaml")


def test_linear_names_exclude_the_output_head(tiny_model):
    model = build_model(tiny_config(tiny_model, finetuning_type="full"))
    assert "lm_head" not in linear_module_names(model)
