"""Model knobs on real tiny models (torch, no Ray): RoPE scaling, the MoE router loss, torch_compile's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.errors import ConfigError
from orchestrator.preflight import preflight
from tests.helpers import tiny_config, tiny_moe, tiny_variant
from workers.context import single_process_context
from workers.model import build_model, load_tokenizer_for
from workers.stages import make_stage

SHORT = 64  # the short-context variant's pretrained positions


@pytest.fixture(scope="module")
def short_model(tiny_model, tmp_path_factory) -> str:
    return tiny_variant(tiny_model, tmp_path_factory.mktemp("short") / "short", max_position_embeddings=SHORT)


@pytest.fixture(scope="module")
def moe_model(tiny_model, tmp_path_factory) -> str:
    return tiny_moe(tiny_model, tmp_path_factory.mktemp("moe") / "moe")


def rotary(model):
    return model.get_base_model().model.rotary_emb if hasattr(model, "get_base_model") else model.model.rotary_emb


def test_linear_rope_scaling_divides_every_frequency_by_the_factor_that_covers_cutoff_len(short_model):
    plain = rotary(build_model(tiny_config(short_model)))
    model = build_model(tiny_config(short_model, rope_scaling="linear", cutoff_len=150))
    scaled = rotary(model)
    factor = math.ceil(150 / SHORT)  # 3: the whole multiple of 64 positions that covers 150
    assert torch.allclose(scaled.inv_freq, plain.inv_freq / factor)
    config = model.get_base_model().config
    assert config.rope_parameters["factor"] == factor and config.max_position_embeddings == SHORT * factor


@pytest.mark.parametrize("kind", ["dynamic", "yarn", "llama3"])
def test_other_rope_scalings_are_transformers_own_with_the_pretrained_length_kept(short_model, kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = build_model(tiny_config(short_model, rope_scaling=kind, cutoff_len=100, finetuning_type="full"))
    config = model.config
    assert config.rope_parameters["rope_type"] == kind and config.rope_parameters["factor"] == 2.0
    assert config.rope_parameters["original_max_position_embeddings"] == SHORT
    expected, attention_scaling = ROPE_INIT_FUNCTIONS[kind](config)
    assert torch.allclose(model.model.rotary_emb.inv_freq, expected)
    assert model.model.rotary_emb.attention_scaling == attention_scaling
    if kind == "yarn":  # YaRN's attention temperature: 0.1 ln(factor) + 1
        assert attention_scaling == pytest.approx(0.1 * math.log(2.0) + 1)
    if kind == "llama3":  # the highest frequencies (short wavelengths) are kept, the lowest divided by the factor
        plain = build_model(tiny_config(short_model, finetuning_type="full")).model.rotary_emb.inv_freq
        assert model.model.rotary_emb.inv_freq[0] == plain[0]
        assert torch.isclose(model.model.rotary_emb.inv_freq[-1], plain[-1] / 2)


def test_a_saved_scaled_model_reloads_without_scaling_twice(short_model, tmp_path):
    cfg = tiny_config(short_model, rope_scaling="linear", cutoff_len=100, finetuning_type="full")
    build_model(cfg).save_pretrained(tmp_path / "saved")
    again = build_model(tiny_config(str(tmp_path / "saved"), rope_scaling="linear", cutoff_len=100,
                                    finetuning_type="full"))  # fmt: skip
    assert again.config.rope_parameters["factor"] == 2.0 and again.config.max_position_embeddings == 2 * SHORT


def test_rope_scaling_is_refused_when_cutoff_len_fits_the_model(short_model):
    with pytest.raises(ConfigError) as error:
        preflight(tiny_config(short_model, rope_scaling="yarn", cutoff_len=SHORT), "test")
    assert "rope_scaling" in str(error.value) and f"fits in the model's {SHORT} positions" in str(error.value)


def router_loss_parts(moe_model: str, coefficient: float | None):
    cfg = tiny_config(moe_model, finetuning_type="full", moe_aux_loss_coef=coefficient)
    model = build_model(cfg)
    stage = make_stage(cfg, single_process_context(), load_tokenizer_for(cfg))
    torch.manual_seed(0)
    ids = torch.randint(5, 500, (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    output = stage.forward(model, batch)
    output.loss_sum.backward()
    gate = model.model.layers[0].mlp.gate.weight.grad.clone()
    with torch.no_grad():
        aux = model(input_ids=ids, attention_mask=batch["attention_mask"], output_router_logits=True).aux_loss
    return model, output.loss_sum.detach(), stage.count(batch), aux, gate


def test_moe_aux_loss_coef_adds_the_weighed_router_loss_and_trains_the_router_by_it(moe_model):
    plain_model, plain, units, aux, plain_gate = router_loss_parts(moe_model, None)
    model, weighed, _, _, gate = router_loss_parts(moe_model, 0.5)
    assert model.config.output_router_logits and model.config.router_aux_loss_coef == 0.5
    assert not plain_model.config.output_router_logits  # off unless asked: no router loss is computed
    assert float(aux) > 0
    # per unit (labelled token): cross-entropy + 0.5 x the load-balancing loss
    assert float(weighed) == pytest.approx(float(plain) + 0.5 * float(aux) * units, rel=1e-5)
    assert not torch.allclose(gate, plain_gate)  # the router's gradient now includes the balancing term


def test_moe_aux_loss_coef_is_refused_for_a_dense_model_and_for_value_head_stages(tiny_model, moe_model):
    with pytest.raises(ConfigError) as error:
        preflight(tiny_config(tiny_model, moe_aux_loss_coef=0.01), "test")
    assert "moe_aux_loss_coef" in str(error.value) and "'llama' has no router loss" in str(error.value)
    with pytest.raises(ConfigError) as error:
        tiny_config(moe_model, moe_aux_loss_coef=0.01, stage="rm", dataset="loom_demo_pref")
    assert "not rm's value head" in str(error.value)


def test_torch_compile_is_refused_where_it_is_not_built(tiny_model):
    with pytest.raises(ConfigError) as error:
        tiny_config(tiny_model, torch_compile=True, stage="ppo", reward_model="http://127.0.0.1:1/score",
                    reward_model_type="api", dataset="loom_demo_sft")  # fmt: skip
    assert "torch_compile" in str(error.value) and "stage ppo" in str(error.value)


def test_shift_attn_and_llama_pro_reach_the_built_model(tiny_model, tmp_path):
    from orchestrator.llama_pro import expand_model
    from workers.shift_attn import shift_attn_enabled

    assert shift_attn_enabled(build_model(tiny_config(tiny_model, shift_attn=True)))
    assert not shift_attn_enabled(build_model(tiny_config(tiny_model)))
    expand_model(tiny_model, str(tmp_path / "pro"), 2)  # 4 layers, blocks 1 and 3 new
    lora = build_model(tiny_config(str(tmp_path / "pro"), use_llama_pro=True, freeze_trainable_layers=2))
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, p in lora.named_parameters() if p.requires_grad}
    assert layers == {1, 3}  # LoRA on the inserted blocks only


def test_shift_attn_and_llama_pro_refusals(tiny_model, moe_model, tmp_path):
    from orchestrator.llama_pro import expand_model

    with pytest.raises(ConfigError) as error:
        preflight(tiny_config(moe_model, shift_attn=True), "test")
    assert "shift_attn" in str(error.value) and "this model is 'mixtral'" in str(error.value)
    with pytest.raises(ConfigError) as error:
        tiny_config(tiny_model, use_llama_pro=True, finetuning_type="full")
    assert "finetuning_type freeze (or lora), not full" in str(error.value)
    expand_model(tiny_model, str(tmp_path / "pro"), 2)
    with pytest.raises(ConfigError) as error:
        preflight(tiny_config(str(tmp_path / "pro"), use_llama_pro=True, finetuning_type="freeze",
                              freeze_trainable_layers=1), "test")  # fmt: skip
    assert "expanded by `loom llama-pro` with 2 new blocks: set freeze_trainable_layers: 2" in str(error.value)
    with pytest.raises(ConfigError) as error:
        preflight(tiny_config(str(tmp_path / "pro"), use_llama_pro=True, freeze_trainable_layers=3), "test")
    assert "freeze_trainable_layers" in str(error.value)


def test_loom_llama_pro_refuses_without_a_traceback(tiny_model, tmp_path, capsys):
    from orchestrator.cli import main

    assert main(["llama-pro", tiny_model, str(tmp_path / "x"), "--num-expand", "3"]) == 2
    assert "--num-expand" in capsys.readouterr().err and not (tmp_path / "x").exists()
