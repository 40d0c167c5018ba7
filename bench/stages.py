"""Step time and peak memory of every stage beside sft's, on one process (no Ray), with the stage loop, strategy and
checkpoint files Loom's workers run (tests/strategy_harness.py stands in for Ray Train's report and shards).

Also what the reference costs: dpo with full fine-tuning (a frozen copy of the model as reference), with LoRA (the
policy with its adapter disabled, no copy), and with `precompute_ref_logps` (log-probs computed beforehand, as Ray
Data's actors do, so the worker holds no reference). Each case runs in a fresh process; peak RSS is that process's
maximum resident set. Run from the repo root: `python bench/stages.py [--model tiny|small] [--steps N]`.

`--suite optimizers` measures full fine-tuning with AdamW against GaLore, APOLLO, BAdam and Adam-mini, and LoRA
against QLoRA (a 4-bit base), the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = str(REPO / "orchestrator" / "demo" / "data")
SMALL = {"vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "warmup_steps": 0}  # ~38M parameters  # fmt: skip
CASES = {
    "sft lora": {"stage": "sft", "dataset": "loom_demo_sft"},
    "rm lora": {"stage": "rm", "dataset": "loom_demo_pref"},
    "dpo lora (reference: adapter disabled)": {"stage": "dpo", "dataset": "loom_demo_pref"},
    "dpo lora (reference: frozen copy)": {"stage": "dpo", "dataset": "loom_demo_pref", "ref_model": "{model}"},
    "dpo full (reference: frozen copy)": {"stage": "dpo", "dataset": "loom_demo_pref", "finetuning_type": "full",
                                          "learning_rate": 1e-4},
    "dpo full (reference: precomputed)": {"stage": "dpo", "dataset": "loom_demo_pref", "finetuning_type": "full",
                                          "learning_rate": 1e-4, "precompute_ref_logps": True},
    "kto lora": {"stage": "kto", "dataset": "loom_demo_kto"},
    "ppo lora (api reward, 16 new tokens)": {"stage": "ppo", "dataset": "loom_demo_sft", "reward_model_type": "api",
                                             "max_new_tokens": 16, "ppo_epochs": 4},
}  # fmt: skip


# The memory-saving optimizers against AdamW on the same full fine-tuning (and LoRA, QLoRA beside them).
OPTIMIZER_CASES = {
    "full, AdamW": {"finetuning_type": "full", "learning_rate": 1e-4},
    "full, GaLore (rank 16)": {"finetuning_type": "full", "learning_rate": 1e-4, "use_galore": True,
                               "galore_rank": 16},
    "full, GaLore layer-wise (rank 16)": {"finetuning_type": "full", "learning_rate": 1e-4, "use_galore": True,
                                          "galore_rank": 16, "galore_layerwise": True},
    "full, APOLLO (rank 16)": {"finetuning_type": "full", "learning_rate": 1e-4, "use_apollo": True,
                               "apollo_rank": 16},
    "full, BAdam (one layer at a time)": {"finetuning_type": "full", "learning_rate": 1e-4, "use_badam": True,
                                          "badam_switch_interval": 4},
    "full, Adam-mini": {"finetuning_type": "full", "learning_rate": 1e-4, "use_adam_mini": True},
    "lora r8, AdamW": {"finetuning_type": "lora"},
    "qlora r8 (4-bit nf4 base), AdamW": {"finetuning_type": "lora", "quantization_bit": 4},
}  # fmt: skip
SUITES = {"stages": CASES, "optimizers": OPTIMIZER_CASES}


def config(model: str, case: dict, steps: int) -> dict:
    return {"model_name_or_path": model, "dataset_dir": DEMO, "template": "default", "cutoff_len": 128,
            "resources_per_worker": {"CPU": 1}, "ray_num_workers": 1, "finetuning_type": "lora",
            "per_device_train_batch_size": 8, "max_steps": steps, "save_steps": steps, "logging_steps": steps,
            "learning_rate": 5e-3, "lr_scheduler_type": "constant", "disable_gradient_checkpointing": True,
            **{k: v.replace("{model}", model) if isinstance(v, str) else v for k, v in case.items()}}  # fmt: skip


def precomputed_rows(raw: dict) -> list[dict]:
    """The rows with their reference log-probs, as the Ray Data pass adds them (the same actor class, in-process)."""
    import numpy as np

    from orchestrator.config import validate_config
    from orchestrator.data.reference import ReferenceScorer
    from tests.strategy_harness import object_column, prepared_rows

    cfg = validate_config(raw)
    rows = prepared_rows(cfg)
    scorer = ReferenceScorer(cfg.model_dump())
    out = []
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        scored = scorer({key: object_column([r[key] for r in chunk]) for key in chunk[0]})
        out += [{**r, "ref_chosen_logps": float(np.asarray(scored["ref_chosen_logps"])[i]),
                 "ref_rejected_logps": float(np.asarray(scored["ref_rejected_logps"])[i])}
                for i, r in enumerate(chunk)]  # fmt: skip
    return out


def one(raw: dict, rows_file: str | None) -> None:
    """A single measured run, in this (fresh) process; prints one JSON line."""
    import contextlib
    import io

    from tests.reward_server import scoring_server
    from tests.strategy_harness import run_strategy

    rows = pickle.loads(Path(rows_file).read_bytes()) if rows_file else None
    folder = tempfile.mkdtemp(prefix="loom-bench-stage-")
    server = scoring_server(lambda text: -len(text.split()) / 4) if raw.get("reward_model_type") == "api" else None
    with server or contextlib.nullcontext((None, None)) as (url, _):
        if url:
            raw["reward_model"] = url
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            run_strategy(raw, f"{folder}/saves", f"{folder}/out", 0, 1, rows=rows)
    seconds = float(re.search(r"trained steps \d+-(\d+) in ([\d.]+) s", captured.getvalue()).group(2))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": seconds / raw["max_steps"], "peak_rss_mb": round(peak_mb, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("tiny", "small"), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--suite", choices=tuple(SUITES), default="stages",
                        help="stages: every stage beside sft; optimizers: AdamW against the memory-saving optimizers")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(json.loads(args.one), args.rows)
        return
    from orchestrator.tiny import TinySpec, build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="loom-bench-stages-"))
    spec = TinySpec(**SMALL) if args.model == "small" else TinySpec()
    model = build_tiny_model(str(work / "model"), spec)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for name, case in SUITES[args.suite].items():
        raw = config(model, {"stage": "sft", "dataset": "loom_demo_sft", **case}, args.steps)
        rows_file = None
        if raw.get("precompute_ref_logps"):
            rows_file = str(work / "rows.pkl")
            Path(rows_file).write_bytes(pickle.dumps(precomputed_rows(raw)))
        started = time.perf_counter()
        command = [sys.executable, __file__, "--one", json.dumps(raw)] + (["--rows", rows_file] if rows_file else [])
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        results[name] = {**json.loads(out.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - started, 1)}
        print(f"{name:<40} {json.dumps(results[name])}", flush=True)
    first = next(iter(results))
    base = results[first]
    print(f"\n{args.model} model, {args.steps} steps, batch 8, cutoff 128, 1 process, fp32; ratios against {first}")
    print(f"{'case':<40} {'step s':>8} {'x':>7} {'peak RSS MB':>12} {'x':>6}")
    for name, r in results.items():
        print(f"{name:<40} {r['step_s']:>8.3f} {r['step_s'] / base['step_s']:>7.2f} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:>6.2f}")  # fmt: skip
    os.makedirs(REPO / "bench" / "results", exist_ok=True)
    out = REPO / "bench" / "results" / f"{args.suite}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"model": args.model, "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
