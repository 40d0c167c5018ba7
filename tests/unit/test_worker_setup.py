"""Model options and run-directory rules that need torch or files but no Ray."""

from __future__ import annotations

import json
import os

import pytest
import torch

from orchestrator.errors import PlanError
from orchestrator.plan import make_plan
from orchestrator.preflight import clear_earlier_run, decide_run_start
from tests.helpers import tiny_config
from workers.model import build_model
from workers.optim import build_optimizer, build_scheduler


def saved_adapter(tiny_model: str, folder) -> None:
    """A rank-4 LoRA adapter of the tiny model whose B matrices are all 0.5, saved in `folder`."""
    first = build_model(tiny_config(tiny_model, lora_rank=4))
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    first.save_pretrained(folder)


def test_continue_training_from_an_adapter(tiny_model, tmp_path):
    saved_adapter(tiny_model, tmp_path / "adapter")
    second = build_model(tiny_config(tiny_model, adapter_name_or_path=str(tmp_path / "adapter")))
    b_weights = [p for n, p in second.named_parameters() if "lora_B" in n]
    assert b_weights and all(p.requires_grad and torch.all(p == 0.5) for p in b_weights)


def test_create_new_adapter_merges_the_given_adapters_and_trains_a_fresh_one(tiny_model, tmp_path):
    from orchestrator.stages import reference_source

    saved_adapter(tiny_model, tmp_path / "adapter")
    cfg = tiny_config(tiny_model, adapter_name_or_path=str(tmp_path / "adapter"), create_new_adapter=True)
    fresh = build_model(cfg)
    b_weights = [p for n, p in fresh.named_parameters() if "lora_B" in n]
    assert b_weights and all(p.requires_grad and torch.all(p == 0) for p in b_weights)  # a new adapter
    merged = fresh.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    original = build_model(tiny_config(tiny_model)).base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(merged, original)  # the earlier adapter is in the base now
    assert reference_source(cfg) == (tiny_model, str(tmp_path / "adapter"))  # the reference: base + merged adapter
    assert reference_source(tiny_config(tiny_model, adapter_name_or_path=str(tmp_path / "adapter"))) == (
        tiny_model, None)  # continuing the adapter: its reference is the base  # fmt: skip


def test_pissa_rslora_and_pure_bf16(tiny_model):
    pissa = build_model(tiny_config(tiny_model, pissa_init=True, pissa_iter=2, use_rslora=True, lora_rank=4))
    config = pissa.peft_config["default"]
    assert config.init_lora_weights == "pissa_niter_2" and config.use_rslora
    assert any(
        float(p.detach().abs().sum()) > 0 for n, p in pissa.named_parameters() if "lora_B" in n
    )  # PiSSA: B is not zero
    bf16 = build_model(tiny_config(tiny_model, pure_bf16=True, finetuning_type="full"))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_gradient_checkpointing_follows_the_seed_default(tiny_model):
    assert build_model(tiny_config(tiny_model)).base_model.model.is_activation_checkpointing
    off = build_model(tiny_config(tiny_model, disable_gradient_checkpointing=True))
    assert not off.base_model.model.is_activation_checkpointing


def test_gradient_checkpointing_kwargs_reach_torch_checkpoint(tiny_model):
    def checkpoint_keywords(model) -> dict:
        return model.base_model.model.model.layers[0]._gradient_checkpointing_func.keywords

    assert checkpoint_keywords(build_model(tiny_config(tiny_model))) == {"use_reentrant": True}
    cfg = tiny_config(tiny_model, gradient_checkpointing_kwargs='{"use_reentrant": false, "preserve_rng_state": false}')
    assert checkpoint_keywords(build_model(cfg)) == {"use_reentrant": False, "preserve_rng_state": False}


@pytest.mark.parametrize(
    "optim", ["adamw_torch", "adamw_torch_fused", "adamw_hf", "adafactor", "sgd", "adagrad", "rmsprop"]
)
def test_every_offered_optimizer_steps(tiny_model, optim):
    cfg = tiny_config(tiny_model, optim=optim, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=1)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, warmup_steps=1, total_steps=4)
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays == [0.0, 0.1]
    loss = model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(cfg.learning_rate)  # warm-up done, cosine at its peak


def test_loraplus_puts_the_b_matrices_at_ratio_times_the_learning_rate(tiny_model):
    cfg = tiny_config(tiny_model, loraplus_lr_ratio=16, learning_rate=1e-3, weight_decay=0.1, lora_rank=4,
                      additional_target="norm")  # a 1-D trainable parameter too  # fmt: skip
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert {name: (g["lr"], g["weight_decay"]) for name, g in groups.items()} == {
        "loraplus_a": (1e-3, 0.1), "loraplus_b": (pytest.approx(1.6e-2), 0.1),
        "loraplus_b_no_decay": (pytest.approx(1.6e-2), 0.0)}  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_B" in names[id(p)] for p in groups["loraplus_b"]["params"])
    assert all("lora_A" in names[id(p)] for p in groups["loraplus_a"]["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_neftune_adds_bounded_noise_to_the_embeddings_in_training_only(tiny_model):
    plain, noisy = build_model(tiny_config(tiny_model)), build_model(tiny_config(tiny_model, neftune_noise_alpha=5))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    clean = plain.get_input_embeddings()(ids)
    noisy.train()
    trained = noisy.get_input_embeddings()(ids)
    bound = 5 / (ids.shape[1] * clean.shape[-1]) ** 0.5
    difference = (trained - clean).abs()
    assert 0 < float(difference.max()) <= bound + 1e-6 and float(difference.mean()) > bound / 4
    noisy.eval()
    assert torch.equal(noisy.get_input_embeddings()(ids), clean)  # evaluation and generation: no noise
    with torch.no_grad():
        assert torch.equal(noisy(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)


def marker(folder, status, run_name):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "loom_run.json"), "w") as handle:
        json.dump({"status": status, "run_name": run_name, "step": 8}, handle)


def test_run_directory_rules(tiny_model, tmp_path):
    cfg = tiny_config(
        tiny_model, output_dir=str(tmp_path / "out"), ray_storage_path=str(tmp_path / "saves"), ray_run_name="r"
    )
    plan = make_plan(cfg)
    overwrite = cfg.model_copy(update={"overwrite_output_dir": True})
    assert decide_run_start(cfg, plan).describe == "fresh"
    assert decide_run_start(overwrite, plan).describe.startswith("fresh (overwrite_output_dir: there was no earlier")
    marker(plan.output_dir, "running", "r")
    assert decide_run_start(cfg, plan).describe.startswith("fresh (an earlier attempt")
    marker(plan.output_dir, "finished", "r")
    with pytest.raises(PlanError, match="already finished"):
        decide_run_start(cfg, plan)
    os.makedirs(os.path.join(plan.run_dir, "checkpoint-000008"))
    start = decide_run_start(overwrite, plan)
    assert start.describe.startswith("overwrite") and start.clears_earlier
    assert os.path.isdir(plan.run_dir) and os.path.isdir(plan.output_dir)  # deciding removes nothing
    clear_earlier_run(overwrite, plan)
    assert not os.path.exists(plan.run_dir) and not os.path.exists(plan.output_dir)


def test_foreign_output_dir_is_not_touched(tiny_model, tmp_path):
    cfg = tiny_config(
        tiny_model, output_dir=str(tmp_path / "mine"), ray_storage_path=str(tmp_path / "saves"), ray_run_name="r"
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(PlanError, match="not written by a Loom run"):
        decide_run_start(cfg, make_plan(cfg))
    marker(str(tmp_path / "mine"), "running", "someone-else")
    with pytest.raises(PlanError, match="belongs to run 'someone-else'"):
        decide_run_start(cfg, make_plan(cfg))
    overwrite = cfg.model_copy(update={"overwrite_output_dir": True})
    (tmp_path / "mine" / "loom_run.json").unlink()
    clear_earlier_run(overwrite, make_plan(overwrite))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"  # only folders Loom wrote are deleted


def test_generate_uses_template_and_generation_keys(tiny_model):
    from inference.commands import answer

    cfg = tiny_config(tiny_model, do_sample=False, max_new_tokens=6, max_length=4096)
    text = answer(cfg, tiny_model, "Add 12 and 35.")
    assert isinstance(text, str) and text == answer(cfg, tiny_model, "Add 12 and 35.")  # greedy: deterministic
    capped = cfg.model_copy(update={"max_length": 12})  # prompt "Human: ...\nAssistant:" alone is longer than 11
    short = answer(capped, tiny_model, "Add 12 and 35.")
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tiny_model).encode(short, add_special_tokens=False)) <= 1
