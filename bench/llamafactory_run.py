"""The peer: LLaMA-Factory 0.9.5 training the same model on the same data with the same hyper-parameters, its own
defaults left as they are (gradient checkpointing on, its tokenization through `datasets.map`). Runs inside the
bench's LLaMA-Factory virtual environment, one process, and imports nothing of Loom.

Run by bench/suite.py: `bench/.venv-llamafactory/bin/python bench/llamafactory_run.py SPEC.json`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent))


def arguments(spec: dict) -> dict:
    args = {
        "model_name_or_path": spec["model"], "stage": spec["stage"], "do_train": True,
        "finetuning_type": spec["finetuning_type"], "dataset": spec["dataset"], "dataset_dir": spec["dataset_dir"],
        "template": spec["template"], "cutoff_len": spec["cutoff_len"], "overwrite_cache": True,
        "output_dir": spec["out"], "overwrite_output_dir": True, "logging_steps": 1, "save_steps": spec["steps"],
        "per_device_train_batch_size": spec["global_batch"], "gradient_accumulation_steps": 1,
        "learning_rate": spec["learning_rate"], "max_steps": spec["steps"], "lr_scheduler_type": "cosine",
        "optim": spec["optim"], "report_to": "none", "include_num_input_tokens_seen": "non_padding",
        "seed": spec["seed"], "use_cpu": spec["device"] == "cpu", "bf16": spec["bf16"], "disable_tqdm": True, "plot_loss": False,
    }  # fmt: skip
    if spec["finetuning_type"] == "lora":
        args.update(lora_rank=spec["lora_rank"], lora_target="all")
    if spec["stage"] == "pt":
        args["packing"] = spec["packing"]
    if spec["stage"] == "dpo":  # the reference is the policy with the adapter off (LoRA), as on Loom's side
        args.update(pref_beta=0.1, pref_loss="sigmoid")
    return args


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from llamafactory.train.tuner import run_exp
    from probe import Probe

    torch.set_num_threads(spec["threads"])
    run_exp(args=arguments(spec), callbacks=[Probe(spec["probe"], STARTED)])


if __name__ == "__main__":
    main(sys.argv[1])
