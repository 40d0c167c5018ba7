"""GaLore, APOLLO, BAdam and Adam-mini on the tiny model, no Ray: each steps, its state goes through a checkpoint
file that loads with weights_only=True, and a resumed copy takes exactly the step the original takes."""

from __future__ import annotations

import copy

import pytest
import torch

from orchestrator.errors import ConfigError
from orchestrator.optimizers import optimizer_problems
from orchestrator.preflight import model_problems
from tests.helpers import tiny_config
from workers.checkpoint import load_state
from workers.model import build_model
from workers.optim import build_optimizer

FAMILIES = {
    "galore": {"use_galore": True, "galore_rank": 4, "galore_update_interval": 2, "galore_target": "q_proj,up_proj"},
    "galore_layerwise": {"use_galore": True, "galore_rank": 4, "galore_layerwise": True, "ray_num_workers": 1},
    "apollo": {"use_apollo": True, "apollo_rank": 4, "apollo_update_interval": 2},
    "apollo_svd_tensor": {"use_apollo": True, "apollo_rank": 4, "apollo_proj": "svd", "apollo_scale_type": "tensor"},
    "badam_layer": {"use_badam": True, "badam_switch_interval": 2},
    "badam_random": {"use_badam": True, "badam_switch_interval": 1, "badam_switch_mode": "random"},
    "badam_ratio": {"use_badam": True, "badam_mode": "ratio", "badam_update_ratio": 0.5, "ray_num_workers": 1},
    "adam_mini": {"use_adam_mini": True},
}
BATCH = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "labels": torch.tensor([[5, 6, 7, 8, 9, 10]])}


def train_steps(model, optimizer, steps: int) -> None:
    for _ in range(steps):
        model(**BATCH).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_state_survives_a_checkpoint_and_the_next_steps_are_identical(tiny_model, tmp_path, family):
    cfg = tiny_config(tiny_model, finetuning_type="full", disable_gradient_checkpointing=True, learning_rate=1e-2,
                      **FAMILIES[family])  # fmt: skip
    assert optimizer_problems(cfg) == []
    torch.manual_seed(0)
    model = build_model(cfg)
    start = copy.deepcopy(model.state_dict())
    optimizer = build_optimizer(cfg, model)
    train_steps(model, optimizer, 3)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    weights = copy.deepcopy(model.state_dict())
    assert any(not torch.equal(start[k], weights[k]) for k in start)  # it trained

    torch.manual_seed(0)
    resumed = build_model(cfg)
    resumed.load_state_dict(weights)
    restored = build_optimizer(cfg, resumed)
    restored.load_state_dict(load_state(str(tmp_path / "optimizer.pt")))  # tensors and plain values only
    rng = torch.get_rng_state()
    train_steps(model, optimizer, 2)
    torch.set_rng_state(rng)
    train_steps(resumed, restored, 2)
    worst = max(float((model.state_dict()[k] - resumed.state_dict()[k]).abs().max()) for k in weights)
    assert worst == 0.0, f"{family}: the resumed optimizer's steps differ by {worst}"


def test_galore_projects_only_the_target_matrices(tiny_model):
    cfg = tiny_config(tiny_model, finetuning_type="full", **FAMILIES["galore"])
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    projected = [group for group in optimizer.param_groups if "rank" in group]
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(projected) == 1 and projected[0]["rank"] == 4 and projected[0]["update_proj_gap"] == 2
    assert {names[id(p)].split(".")[-2] for p in projected[0]["params"]} == {"q_proj", "up_proj"}
    train_steps(model, optimizer, 1)
    moments = {names[id(p)]: state["exp_avg"] for p, state in optimizer.state.items() if "exp_avg" in state}
    q_proj = next(n for n in moments if n.endswith("q_proj.weight"))
    weight = dict(model.named_parameters())[q_proj]
    assert min(moments[q_proj].shape) == 4 < min(weight.shape)  # the moments live in the rank-4 projection


def test_badam_trains_one_block_at_a_time_in_its_switch_order(tiny_model):
    cfg = tiny_config(tiny_model, finetuning_type="full", use_badam=True, badam_switch_interval=1,
                      badam_switch_mode="descending", disable_gradient_checkpointing=True)  # fmt: skip
    model = build_model(cfg)
    layers = model.config.num_hidden_layers
    optimizer = build_optimizer(cfg, model)
    changed_layers = []
    for _ in range(layers + 1):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_steps(model, optimizer, 1)
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        assert moved and all(".layers." in n for n in moved)  # embeddings and head stay as they are
        changed_layers.append({int(n.split(".layers.")[1].split(".")[0]) for n in moved})
    expected = [{i} for i in range(layers - 1, -1, -1)] + [{layers - 1}]
    assert changed_layers == expected


def test_the_driver_refuses_what_cannot_work(tiny_model):
    with pytest.raises(ConfigError) as refused:
        tiny_config(tiny_model, use_galore=True, galore_layerwise=True, ray_num_workers=2, finetuning_type="lora",
                    gradient_accumulation_steps=4, badam_mode="ratio", galore_target="q_proj,nope")  # fmt: skip
    text = str(refused.value)
    assert "galore_layerwise" in text and "ray_num_workers 1, not 2" in text
    assert "gradient_accumulation_steps must be 1, not 4" in text
    assert "use_galore" in text and "needs finetuning_type full, not 'lora'" in text
    assert "badam_mode" in text and "only used with use_badam: true" in text
    with pytest.raises(ConfigError) as both:
        tiny_config(tiny_model, finetuning_type="full", use_galore=True, use_adam_mini=True)
    assert "choose one" in str(both.value)
    targets = model_problems(tiny_config(tiny_model, finetuning_type="full", use_apollo=True,
                                         apollo_target="q_proj,nope"))  # fmt: skip
    assert [(p.key, p.message.split(";")[0]) for p in targets] == [
        ("apollo_target", "module 'nope' is not a linear module of the model")]  # fmt: skip


def test_badam_never_switching_is_minus_one_and_layerwise_clipping_is_refused_when_asked_for(tiny_model):
    with pytest.raises(ConfigError) as refused:
        tiny_config(tiny_model, finetuning_type="full", use_badam=True, badam_switch_interval=0)
    assert "badam_switch_interval" in str(refused.value) and "-1 for never" in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        tiny_config(tiny_model, finetuning_type="full", use_galore=True, galore_layerwise=True, ray_num_workers=1,
                    max_grad_norm=0.5)  # fmt: skip
    assert "before the whole gradient exists to be clipped" in str(refused.value)
    # LLaMA-Factory's configs leave max_grad_norm at its default: accepted (the worker says it does not clip)
    tiny_config(tiny_model, finetuning_type="full", use_galore=True, galore_layerwise=True, ray_num_workers=1)
