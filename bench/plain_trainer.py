"""The floor any orchestrator must match: a plain transformers `Trainer` (+ PEFT for LoRA) in one process, on the
same model, tokens and hyper-parameters as the Loom run beside it. Tokenized by Loom's own pure processors, so the
two sides train on identical token ids; batches padded to their longest row, as Loom pads them.

Run by bench/suite.py: `python bench/plain_trainer.py SPEC.json` (the spec's keys: see suite.Workload.spec).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.time()  # before the heavy imports: they are part of the time to the first step

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def read_rows(path: str) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    return (
        [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.endswith(".jsonl")
        else json.loads(text)
    )


def tokenized_rows(spec: dict, tokenizer) -> tuple[list[dict], float]:
    """(rows of input_ids/labels, seconds it took) with Loom's processor for the spec's stage."""
    from orchestrator.data.formats import convert
    from orchestrator.data.processors import ProcessorOptions, pretrain_batch, supervised_batch
    from orchestrator.data.registry import resolve_datasets
    from orchestrator.data.templates import get_template

    started = time.perf_counter()
    (dataset,), _ = resolve_datasets([spec["dataset"]], spec["dataset_dir"])
    examples = [convert(row, dataset, spec["stage"]) for row in read_rows(dataset.files[0])]
    options = ProcessorOptions(cutoff_len=spec["cutoff_len"], packing=spec["packing"])
    process = pretrain_batch if spec["stage"] == "pt" else supervised_batch
    columns = process(tokenizer, get_template(spec["template"]), examples, options).columns
    labels = columns.get("labels", columns["input_ids"])
    rows = [{"input_ids": ids, "labels": labs} for ids, labs in zip(columns["input_ids"], labels, strict=True)]
    return rows, time.perf_counter() - started


def padding_fraction(lengths: list[int], batch: int, draws: int = 500) -> float:
    """The share of pad tokens in a batch of `batch` random rows padded to its longest (the expected value under
    the shuffled order every side trains in; 0 for packed rows, which all have the same length)."""
    import random

    rng, pads, total = random.Random(0), 0, 0
    for _ in range(draws):
        picked = rng.sample(lengths, min(batch, len(lengths)))
        pads, total = pads + sum(max(picked) - n for n in picked), total + max(picked) * len(picked)
    return round(pads / max(total, 1), 3)


def _is_adapter(parameter, model) -> bool:
    """LoRA matrices are not the model's own parameters (MFU counts the model's)."""
    return any(parameter is p for name, p in model.named_parameters() if "lora_" in name)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from probe import Probe
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from workers.collate import pad_batch

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows, data_s = tokenized_rows(spec, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation=spec["attn_implementation"]
    )
    if spec["device"] == "cuda":
        model = model.to("cuda")
    if spec["finetuning_type"] == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # lora_target: all
        lora = LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"], target_modules=targets,
                          lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)

    def collate(batch: list[dict]) -> dict:
        return pad_batch([b["input_ids"] for b in batch], [b["labels"] for b in batch], tokenizer.pad_token_id)

    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["global_batch"], max_steps=spec["steps"],
        learning_rate=spec["learning_rate"], lr_scheduler_type="cosine", optim=spec["optim"], logging_steps=1,
        save_strategy="steps", save_steps=spec["steps"], save_only_model=False, report_to=[], use_cpu=spec["device"] == "cpu", bf16=spec["bf16"],
        dataloader_num_workers=0, disable_tqdm=True, include_num_input_tokens_seen="non_padding", seed=spec["seed"],
        gradient_checkpointing=False,
    )  # fmt: skip
    probe = Probe(spec["probe"], STARTED)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameters = sum(p.numel() for p in model.parameters() if not _is_adapter(p, model))
    probe.record.update(
        data_s=round(data_s, 3),
        rows=len(rows),
        parameters=parameters,
        trainable=trainable,
        padding_fraction=padding_fraction([len(r["input_ids"]) for r in rows], spec["global_batch"]),
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[probe])
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
