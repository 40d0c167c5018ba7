"""DeepSpeed ZeRO 0/2/3 (with and without CPU offload) and FSDP2 against DDP, on two real gloo processes.

Each strategy trains the same tiny model on the same rows with the same seed; the weights it writes must match
DDP's, load into plain transformers, and a run resumed from its step-2 checkpoint must end where the uninterrupted run
ended (so the sharded optimizer state really round-trips). Ray is not involved here: tests/ray/test_train.py runs
ZeRO-3 and FSDP under the TorchTrainer.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.helpers import DEMO_DATA
from tests.strategy_harness import worker
from workers.checkpoint import verify_checkpoint

ZERO3_AUTO = {"stage": 3, "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}
STRATEGIES = {
    "ddp": {},
    "zero0": {"deepspeed": {"zero_optimization": {"stage": 0}}},
    "zero2_offload": {"deepspeed": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}},
    "zero3": {"deepspeed": {"zero_optimization": ZERO3_AUTO}},
    "zero3_offload": {
        "deepspeed": {
            "zero_optimization": {
                **ZERO3_AUTO,
                "offload_optimizer": {"device": "cpu"},
                "offload_param": {"device": "cpu"},
            }
        }
    },  # fmt: skip
    # an optimizer block: DeepSpeed builds the optimizer (torch's AdamW: its own CPU Adam would JIT-compile for a
    # minute), "auto" values from the Loom config
    "zero2_ds_optimizer": {
        "deepspeed": {
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
            "zero_optimization": {"stage": 2},
        }
    },  # fmt: skip
    "fsdp": {"fsdp": "full_shard auto_wrap"},
    "fsdp_grad_op_offload": {"fsdp": ["shard_grad_op", "auto_wrap", "offload"]},
}
LORA = {"finetuning_type": "lora", "lora_rank": 4, "lora_target": "all"}
LORA_STRATEGIES = {"ddp_lora": {}, "zero3_lora": STRATEGIES["zero3"], "fsdp_lora": STRATEGIES["fsdp"]}
# bf16: DDP autocasts, FSDP casts each unit (MixedPrecisionPolicy); the same math in bf16, compared loosely
BF16_STRATEGIES = {"ddp_bf16": {"bf16": True}, "fsdp_bf16": {"bf16": True, "fsdp": "full_shard auto_wrap"}}
RESUMED = ("ddp", "zero2_offload", "zero3", "fsdp", "zero3_lora")  # the others share their code paths


def base_config(tiny_model: str, **extra) -> dict:
    return {
        "model_name_or_path": tiny_model, "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
        "template": "default", "resources_per_worker": {"CPU": 1}, "ray_num_workers": 2, "finetuning_type": "full",
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4, "save_steps": 2,
        "logging_steps": 1, "learning_rate": 1e-3, "warmup_steps": 1, "lr_scheduler_type": "linear",
        "disable_gradient_checkpointing": True, **extra,
    }  # fmt: skip


def spawn(jobs: list[tuple[dict, str, str, str | None]], ranks: int = 2) -> None:
    mp.start_processes(worker, args=(ranks, free_port(), jobs), nprocs=ranks, join=True, start_method="spawn")


def weights(folder: str, lora: bool, tiny_model: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder)
        return {k: v for k, v in model.state_dict().items() if "lora_" in k}
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def logged(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


# Another strategy reduces in another order (2e-4); the same strategy resumed must replay the same arithmetic (1e-5).
def assert_close(got: dict, want: dict, what: str, tolerance: float = 2e-4) -> None:
    assert got.keys() == want.keys(), what
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert worst < tolerance, f"{what}: largest weight difference {worst}"


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Every strategy trained 4 steps, then the RESUMED ones again from a copy of their step-2 checkpoint."""
    root = tmp_path_factory.mktemp("strategies")
    cases = {**{n: base_config(tiny_model, **s) for n, s in STRATEGIES.items()},
             **{n: base_config(tiny_model, **LORA, **s) for n, s in LORA_STRATEGIES.items()},
             **{n: base_config(tiny_model, **s) for n, s in BF16_STRATEGIES.items()}}  # fmt: skip
    first = [(cfg, str(root / name / "saves"), str(root / name / "out"), None) for name, cfg in cases.items()]
    resumed = [(cases[name], str(root / name / "resume"), str(root / name / "resumed"),
                str(root / name / "saves" / "checkpoint-000002")) for name in RESUMED]  # fmt: skip
    with pytest.MonkeyPatch.context() as env:  # the spawned ranks inherit it: where any JIT-compiled op would go
        env.setenv("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions"))
        spawn(first + resumed)
    return root


@pytest.mark.parametrize("name", [*STRATEGIES, *LORA_STRATEGIES])
def test_strategy_matches_ddp_and_resumes_where_it_stopped(runs, name, tiny_model):
    lora = name in LORA_STRATEGIES
    reference = weights(str(runs / ("ddp_lora" if lora else "ddp") / "out"), lora, tiny_model)
    final = weights(str(runs / name / "out"), lora, tiny_model)
    assert_close(final, reference, f"{name} against DDP")
    if name in RESUMED:  # trained steps 3-4 only (a run from scratch would also end on the same weights)
        assert [r["step"] for r in logged(runs / name / "resumed")] == [3, 4]
        resumed = weights(str(runs / name / "resumed"), lora, tiny_model)
        assert_close(resumed, final, f"{name} resumed at step 2", tolerance=1e-5)
    base = weights(tiny_model, False, tiny_model) if not lora else None
    if base is not None:  # training moved the weights (a strategy that trained nothing would also "match")
        assert max(float((final[k] - base[k]).abs().max()) for k in base) > 1e-3


def test_sharded_checkpoints_hold_every_rank_s_files(runs):
    listing = {}
    for name in ("zero3", "fsdp", "ddp"):
        folder = runs / name / "saves" / "checkpoint-000004"
        manifest = verify_checkpoint(str(folder))
        listing[name] = sorted(manifest["files"])
    assert {"deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(listing["zero3"])  # fmt: skip
    assert {"optimizer/__0_0.distcp", "optimizer/__1_0.distcp", "optimizer/.metadata"} <= set(listing["fsdp"])
    assert "optimizer.pt" in listing["ddp"] and not any(n.startswith("deepspeed/") for n in listing["ddp"])
    for files in listing.values():
        assert {"model/model.safetensors", "scheduler.pt", "rng_state.pt", "trainer_state.json"} <= set(files)


def test_deepspeed_on_cpu_compiles_nothing(runs):
    """DeepSpeed JIT-compiles a shared-memory all-reduce kernel at init on CPU unless Loom opts out: a minute of g++
    per fresh machine, and a stale lock file hangs the next run if a worker dies mid-compile."""
    assert (runs / "zero3" / "out").is_dir()
    built = runs / "torch_extensions"
    assert not built.exists() or not any(built.iterdir()), sorted(p.name for p in built.rglob("*"))


def test_fsdp_mixed_precision_trains_like_ddp_autocast(runs, tiny_model):
    reference = weights(str(runs / "ddp_bf16" / "out"), False, tiny_model)
    final = weights(str(runs / "fsdp_bf16" / "out"), False, tiny_model)
    base = weights(tiny_model, False, tiny_model)
    moved = torch.cat([(final[k] - base[k]).flatten() for k in base])
    expected = torch.cat([(reference[k] - base[k]).flatten() for k in base])
    assert float(moved.abs().max()) > 1e-3  # trained; and in the same direction as DDP with autocast
    assert float(torch.nn.functional.cosine_similarity(moved, expected, dim=0)) > 0.9


def test_an_elastic_run_resized_from_three_workers_to_two_trains_on_the_same_rows(tiny_model, tmp_path):
    """3 workers x 2 rows x 2 micro-batches, resumed at step 2 by 2 workers x 2 rows x 3 micro-batches: each step
    still averages over the same 12 rows (workers/order.py), so the weights end where the 3-worker run's did."""
    raw = base_config(tiny_model, ray_num_workers=3, ray_min_workers=2, per_device_train_batch_size=2)
    spawn([(raw, str(tmp_path / "saves"), str(tmp_path / "three"), None)], ranks=3)
    spawn([(raw, str(tmp_path / "resume"), str(tmp_path / "two"), str(tmp_path / "saves" / "checkpoint-000002"))])
    assert [r["step"] for r in logged(tmp_path / "two")] == [3, 4]
    three, two = weights(str(tmp_path / "three"), False, tiny_model), weights(str(tmp_path / "two"), False, tiny_model)
    assert_close(two, three, "resized 3 -> 2 at step 2", tolerance=1e-5)
    at_resize = weights(str(tmp_path / "saves" / "checkpoint-000002" / "model"), False, tiny_model)
    assert max(float((two[k] - at_resize[k]).abs().max()) for k in two) > 1e-3  # steps 3-4 did train
