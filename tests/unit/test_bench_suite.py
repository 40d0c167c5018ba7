"""The bench suite's pure parts: what each side is told to train, on CPU and on a CUDA device (bench/gpu.sh), and the
figures it derives from the steps it logged. No run: tests/ray/test_bench_suite.py runs the smoke suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import suite  # noqa: E402


def test_every_side_trains_the_same_batch_schedule_and_optimizer(tmp_path):
    spec = suite.Workload("small", "sft_lora", steps=20, cutoff_len=512).spec("/models/small", tmp_path)
    loom = suite.loom_config(spec, workers=2, out=tmp_path)
    assert loom["per_device_train_batch_size"] * loom["ray_num_workers"] == spec["global_batch"] == 8
    assert (loom["learning_rate"], loom["optim"], loom["lr_scheduler_type"]) == (1e-4, "adamw_torch", "cosine")
    assert loom["lora_target"] == "all" and "packing" not in loom and loom["resources_per_worker"] == {"CPU": 1}
    fast = suite.loom_config(spec, workers=2, out=tmp_path, fast=True)
    assert {k: v for k, v in fast.items() if loom.get(k) != v} == {"packing": True, "neat_packing": True}


def test_a_cuda_workload_puts_one_bf16_worker_on_the_gpu(tmp_path):
    spec = suite.Workload("medium", "sft_lora", 20, 1024, workers=1, device="cuda").spec("/models/medium", tmp_path)
    assert spec["bf16"] and spec["device"] == "cuda"
    loom = suite.loom_config(spec, workers=1, out=tmp_path)
    assert loom["resources_per_worker"] == {"GPU": 1} and loom["bf16"] and loom["per_device_train_batch_size"] == 8
    assert loom["flash_attn"] == ("fa2" if spec["attn_implementation"] == "flash_attention_2" else "sdpa")


def test_steady_figures_leave_the_warm_up_out():
    """(end time, tokens so far) per step. The first step's own time is never in the list; of ten steps the first
    two (a fifth) are left out, so a slow second step does not count either."""
    steps = [(5.0, 100), (8.0, 200)] + [(8.0 + i, 200 + 100 * i) for i in range(1, 9)]
    assert suite.steady(steps) == {"tokens_per_s": 100.0, "step_s": 1.0}
    assert suite.steady(steps[:1]) == {"tokens_per_s": None, "step_s": None}


@pytest.mark.parametrize(("trainable", "per_token"), [(1_000_000, 6_000_000), (10_000, 4_020_000)])
def test_model_flops_per_token_count_weight_gradients_only_for_trainable_weights(trainable, per_token):
    assert suite.flops_per_token(1_000_000, trainable) == per_token


def test_the_scaling_side_trains_the_same_global_batch_on_one_worker(tmp_path):
    spec = suite.Workload("small", "sft_lora", steps=20, cutoff_len=512).spec("/models/small", tmp_path)
    one = suite.loom_config(spec, workers=1, out=tmp_path)
    assert (one["ray_num_workers"], one["per_device_train_batch_size"]) == (1, 8)
    assert "loom_1w" not in suite.parse([]).sides.split(",") and "loom_1w" in suite.SIDES


def test_the_two_node_side_trains_the_same_global_batch_on_four_spread_workers(tmp_path):
    spec = suite.Workload("small", "sft_lora", steps=20, cutoff_len=512).spec("/models/small", tmp_path)
    four = {**suite.loom_config(spec, workers=4, out=tmp_path), **suite.TWO_NODES}
    assert (four["ray_num_workers"], four["per_device_train_batch_size"]) == (4, 2)
    assert four["placement_strategy"] == "SPREAD" and four["ray_storage_shared"]
    assert "loom_2n4w" not in suite.parse([]).sides.split(",") and suite.parse(["--two-nodes"]).two_nodes


def test_the_report_states_scaling_per_core_and_the_sweep_start_up_ratio():
    summary = [{"model": "small", "case": "sft_lora", "side": side, "tokens_per_s": tps}
               for side, tps in (("loom_1w", 400.0), ("loom", 700.0), ("loom_2n4w", 630.0))]  # fmt: skip
    lines = suite._scaling_lines(summary)
    assert "1 -> 2 workers: 1.75x tokens/s, 0.88 per core" in lines[0]
    assert "4 logical workers on two nodes" in lines[1] and "0.9x tokens/s per core" in lines[1]
    sweep = {"model": "tiny", "case": "sft_lora", "trials": 4, "wall_s": 80.0, "trial_start_up_s": [24.0, 11.0, 10.0],
             "x_trial1_over_later": 2.29}  # fmt: skip
    (line,) = suite._sweep_lines(sweep)
    assert "[24.0, 11.0, 10.0]" in line and "2.29x" in line
    assert suite._sweep_lines(None) == [] and "failed" in suite._sweep_lines({"error": "exit 1"})[0]


def test_the_report_states_data_preparation_against_datasets_map():
    result = {"rows": 100000, "cpus": 2, "loom_s": 8.2, "datasets_map_s": 4.0, "loom_over_datasets_map": 0.49,
              "datasets_map_transformers_tokenizer_s": 6.2, "loom_over_datasets_map_transformers_tokenizer": 0.76,
              "warm_rerun_data_s": 0.02}  # fmt: skip
    (line,) = suite._data_prep_lines(result)
    assert "100000 rows on 2 CPUs: Loom 8.2 s" in line and "(0.49x)" in line and "0.02 s of data time" in line
    assert suite._data_prep_lines(None) == [] and suite.parse(["--data-prep", "1000"]).data_prep == 1000
