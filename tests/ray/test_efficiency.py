"""Efficiency knobs on 2 CPU workers: a mixture-of-experts model trained past its pretrained context with RoPE scaling
and its router loss, keeping the best checkpoint; a PiSSA adapter converted to plain LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import tiny_moe
from tests.ray.test_train import logged, run


def weights(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_moe_past_its_context_with_rope_scaling_router_loss_and_the_best_checkpoint(ray_cluster, train_config,
                                                                                   tiny_model, tmp_path):  # fmt: skip
    """A tiny Mixtral pretrained for 48 positions trains on 128-token rows: linear RoPE scaling by 3 (so the rows fit
    its positions), the router's balancing loss weighed in, and output_dir holding the checkpoint the metric picks.
    The metric here asks for the highest eval loss, which on a falling curve is an early checkpoint, not the last."""
    model = tiny_moe(tiny_model, tmp_path / "moe", max_position_embeddings=48)
    raw = train_config(model_name_or_path=model, finetuning_type="full", cutoff_len=128, rope_scaling="linear",
                       moe_aux_loss_coef=0.02, max_steps=6, save_steps=2, eval_steps=2, eval_strategy="steps",
                       val_size=16, do_eval=True, load_best_model_at_end=True, greater_is_better=True,
                       save_total_limit=1, learning_rate=2e-3, ray_run_name="moe-best")  # fmt: skip
    outcome = run(raw, ray_cluster)
    with open(os.path.join(outcome.output_dir, "config.json")) as handle:
        config = json.load(handle)
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 3.0
    assert config["max_position_embeddings"] == 144 and config["router_aux_loss_coef"] == 0.02
    records = logged(outcome.output_dir)
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 6]
    best = max(evals, key=evals.get)
    assert best != 6, evals  # training lowered the eval loss: the "best" by this metric is an earlier checkpoint
    # Ray kept the best checkpoint and the latest (save_total_limit 1 removed the one in between)
    kept = sorted(n for n in os.listdir(outcome.plan.run_dir) if n.startswith("checkpoint-"))
    assert kept == sorted({f"checkpoint-{best:06d}", "checkpoint-000006"})
    saved = weights(outcome.output_dir)
    chosen = weights(os.path.join(outcome.plan.run_dir, f"checkpoint-{best:06d}", "model"))
    last = weights(os.path.join(outcome.plan.run_dir, "checkpoint-000006", "model"))
    assert all(bool((saved[k] == chosen[k]).all()) for k in chosen)
    assert any(not bool((saved[k] == last[k]).all()) for k in last)
    with open(os.path.join(outcome.output_dir, "loom_run.json")) as handle:
        assert json.load(handle)["best_model"] == {"step": best, "value": evals[best]}


def test_pissa_convert_on_two_workers_writes_the_lora_difference_of_the_trained_adapter(ray_cluster, train_config):
    """The converted adapter's update B'A' equals the trained PiSSA adapter's minus the initial one's, for every
    target module: applied to the original base, it gives the trained model."""
    from safetensors.torch import load_file

    raw = train_config(finetuning_type="lora", lora_rank=4, pissa_init=True, pissa_iter=-1, pissa_convert=True,
                       max_steps=3, save_steps=3, learning_rate=1e-2, ray_run_name="pissa")  # fmt: skip
    out = run(raw, ray_cluster).output_dir

    def updates(folder: str) -> dict:
        with open(os.path.join(folder, "adapter_config.json")) as handle:
            config = json.load(handle)
        tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
        scale = config["lora_alpha"] / config["r"]
        return {k.replace(".lora_A.weight", ""): scale * (tensors[k.replace("lora_A", "lora_B")] @ tensors[k])
                for k in tensors if "lora_A" in k}  # fmt: skip

    trained, initial, converted = (updates(os.path.join(out, name)) for name in ("", "pissa_init", "pissa_converted"))
    assert trained.keys() == initial.keys() == converted.keys()
    worst = max(float((converted[k] - (trained[k] - initial[k])).abs().max()) for k in trained)
    assert worst < 1e-5, worst
    assert max(float((trained[k] - initial[k]).abs().max()) for k in trained) > 1e-4  # training moved it


def test_llama_pro_trains_only_the_inserted_blocks_with_shift_attn(ray_cluster, train_config, tiny_model, tmp_path):
    """`loom llama-pro` inserts one identity block after each layer of the tiny model (2 -> 4 layers); a freeze run
    with use_llama_pro (and S²-Attn over its 128-token rows) on 2 workers changes those blocks and nothing else."""
    from orchestrator.cli import main

    expanded = str(tmp_path / "pro")
    assert main(["llama-pro", tiny_model, expanded, "--num-expand", "2"]) == 0
    raw = train_config(model_name_or_path=expanded, finetuning_type="freeze", use_llama_pro=True,
                       freeze_trainable_layers=2, shift_attn=True, max_steps=3, save_steps=3, learning_rate=1e-3,
                       ray_run_name="llama-pro")  # fmt: skip
    before, after = weights(expanded), weights(run(raw, ray_cluster).output_dir)
    changed = {k.split(".")[2] for k in before if not bool((before[k] == after[k]).all()) and ".layers." in k}
    assert changed == {"1", "3"}  # the inserted blocks
    assert all(bool((before[k] == after[k]).all()) for k in before if ".layers." not in k)  # embeddings, norm, head


@pytest.mark.slow
def test_torch_compile_trains_the_same_steps_as_eager(ray_cluster, train_config):
    """torch_compile (inductor on CPU, about a minute of compilation per worker here) on 2 DDP workers: the same
    losses as the eager run, step by step."""
    base = {"finetuning_type": "lora", "max_steps": 3, "save_steps": 3, "disable_gradient_checkpointing": True}
    eager = logged(run(train_config(**base, ray_run_name="eager"), ray_cluster).output_dir)
    raw = train_config(**base, torch_compile=True, ray_run_name="compiled",
                       output_dir=str(Path(train_config()["output_dir"]).parent / "out-compiled"))  # fmt: skip
    compiled = logged(run(raw, ray_cluster).output_dir)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)


def test_qlora_on_two_workers_learns_through_evaluations_and_its_adapter_fits_the_unquantized_base(
    ray_cluster, train_config, tiny_model
):
    """QLoRA (4-bit nf4 base, LoRA on top) on 2 DDP workers, evaluated every 2 steps: the loss keeps falling after
    each evaluation (bitsandbytes' CPU weight repacking, which an evaluation pass would trigger, is kept off: with it
    every LoRA gradient after the first evaluation is None), and the saved adapter loads onto the plain base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    raw = train_config(finetuning_type="lora", quantization_bit=4, max_steps=6, save_steps=6, learning_rate=1e-2,
                       max_samples=8, eval_dataset="loom_demo_sft", do_eval=True, eval_strategy="steps",
                       eval_steps=2, ray_run_name="qlora")  # fmt: skip
    out = run(raw, ray_cluster).output_dir
    evals = [r["eval_loss"] for r in logged(out) if "eval_loss" in r]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2], evals  # still learning after each evaluation
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 17, 42, 99, 123, 7]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, out)(input_ids=ids).logits
    assert float((tuned - plain).abs().mean()) > 0.05  # the adapter, trained on the 4-bit base, moves the plain one


def test_badam_on_two_workers_updates_one_block_per_step_in_its_switch_order(ray_cluster, train_config, tiny_model):
    """BAdam's layer mode under DDP (inactive blocks have no gradient: find_unused_parameters), switching every step
    in descending order: the checkpoints of steps 1, 2, 3 differ from the step before in layer 1, then 0, then 1
    only; embeddings, norm and head never move."""
    raw = train_config(finetuning_type="full", use_badam=True, badam_switch_mode="descending",
                       badam_switch_interval=1, max_steps=3, save_steps=1, learning_rate=1e-3,
                       disable_gradient_checkpointing=True, ray_run_name="badam")  # fmt: skip
    run_dir = run(raw, ray_cluster).plan.run_dir
    states = [weights(tiny_model)] + [weights(os.path.join(run_dir, f"checkpoint-{s:06d}", "model")) for s in (1, 2, 3)]
    moved = []
    for before, after in zip(states[:-1], states[1:], strict=True):
        changed = {k for k in before if not bool((before[k] == after[k]).all())}
        assert changed and all(".layers." in k for k in changed), changed
        moved.append({k.split(".layers.")[1].split(".")[0] for k in changed})
    assert moved == [{"1"}, {"0"}, {"1"}]
