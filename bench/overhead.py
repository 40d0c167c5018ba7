"""Loom end to end vs a plain transformers Trainer on the same tiny model, data and steps.

Run from the repo root: `python bench/overhead.py --steps 40`. Not a test: it measures and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def loom_config(model: str, out: Path, steps: int) -> dict:
    return {
        "model_name_or_path": model,
        "dataset": "loom_demo_sft",
        "dataset_dir": str(REPO / "orchestrator/demo/data"),
        "template": "default",
        "cutoff_len": 256,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "per_device_train_batch_size": 4,
        "max_steps": steps,
        "logging_steps": 1,
        "save_steps": steps,
        "learning_rate": 5e-3,
        "disable_gradient_checkpointing": True,
        "include_effective_tokens_per_second": True,
        "output_dir": str(out / "loom-out"),
        "ray_storage_path": str(out / "saves"),
        "ray_run_name": "bench",
        "ray_num_workers": 2,
        "resources_per_worker": {"CPU": 1},
    }


def run_loom(model: str, out: Path, steps: int) -> dict:
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(loom_config(model, out, steps)))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "train", str(path)], capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    timing = next(line for line in proc.stdout.splitlines() if line.startswith("timing"))
    records = [json.loads(line) for line in (out / "loom-out" / "trainer_log.jsonl").read_text().splitlines()]
    # Per-step throughput from the log (the first step, with its warm-up, left out): both workers' tokens per second.
    per_step = [r["effective_tokens_per_sec"] for r in records[1:]]
    return {"wall_s": round(wall, 1), "phases": timing.removeprefix("timing").strip(), "tokens": records[-1]["tokens_seen"],
            "train_tokens_per_s": round(_mean(per_step), 1)}  # fmt: skip


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def run_plain_trainer(model_dir: str, out: Path, steps: int) -> dict:
    """The baseline: one process, transformers Trainer + PEFT, the same tokenization (Loom's pure processor)."""
    started = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from orchestrator.data.formats import convert
    from orchestrator.data.processors import ProcessorOptions, supervised_batch
    from orchestrator.data.registry import resolve_datasets
    from orchestrator.data.templates import get_template
    from workers.collate import pad_batch

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (spec,), _ = resolve_datasets(["loom_demo_sft"], str(REPO / "orchestrator/demo/data"))
    rows = json.loads(Path(spec.files[0]).read_text())
    columns = supervised_batch(tokenizer, get_template("default"), [convert(r, spec, "sft") for r in rows],
                               ProcessorOptions(cutoff_len=256))["columns"]  # fmt: skip
    dataset = [
        {"input_ids": ids, "labels": labs} for ids, labs in zip(columns["input_ids"], columns["labels"], strict=True)
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    tokens = {"n": 0}

    def collate(batch):
        padded = pad_batch([b["input_ids"] for b in batch], [b["labels"] for b in batch], tokenizer.pad_token_id)
        tokens["n"] += int(padded["attention_mask"].sum())
        return padded

    args = TrainingArguments(output_dir=str(out / "hf-out"), per_device_train_batch_size=8, max_steps=steps,
                             learning_rate=5e-3, logging_steps=steps, save_strategy="no", report_to=[],
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    setup_s = time.perf_counter() - started
    train_started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_started
    return {"wall_s": round(time.perf_counter() - started, 1), "setup_s": round(setup_s, 1), "train_s": round(train_s, 1),
            "tokens": tokens["n"], "train_tokens_per_s": round(tokens["n"] / train_s, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="loom-bench-"))
    from orchestrator.tiny import build_tiny_model

    model = build_tiny_model(str(out / "tiny"))
    baseline = run_plain_trainer(model, out, args.steps)
    loom = run_loom(model, out, args.steps)
    report = {"steps": args.steps, "global_batch": 8, "plain_trainer_1proc": baseline, "loom_2_workers": loom,
              "ratio_wall_loom_over_plain": round(loom["wall_s"] / baseline["wall_s"], 2),
              "ratio_train_throughput_loom_over_plain": round(loom["train_tokens_per_s"] / baseline["train_tokens_per_s"], 2)}  # fmt: skip
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "overhead.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
