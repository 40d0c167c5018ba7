"""Per-stage processors: canonical examples -> model-ready token ids. Pure functions, no Ray.

They reproduce LLaMA-Factory's supervised and pre-training processors so the same data gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

from .templates import Template

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ProcessorOptions:
    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False
    packing: bool = False


def split_budget(source_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """How many source and target tokens fit in `budget`: short sides are kept whole, else cut in proportion."""
    if target_len * 2 < budget:
        max_target = budget
    elif source_len * 2 < budget:
        max_target = budget - source_len
    else:
        max_target = int(budget * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(budget - new_target, 0), source_len)
    return new_source, new_target


def invalid_reason(example: dict[str, Any]) -> str | None:
    """Why a supervised example cannot be used, or None."""
    prompt, response = example["prompt"], example["response"]
    if len(prompt) % 2 != 1:
        return "prompt turns must be odd (user, assistant, ..., user)"
    if len(response) != 1:
        return "no response"
    return None


def supervised_example(tokenizer: Any, template: Template, example: dict[str, Any], opts: ProcessorOptions) -> dict:
    """input_ids and labels of one multi-turn example, truncated to cutoff_len turn by turn."""
    messages = example["prompt"] + example["response"]
    turns = template.encode_turns(tokenizer, messages, example.get("system") or None)
    input_ids: list[int] = []
    labels: list[int] = []
    total = 1 if template.efficient_eos else 0
    if opts.mask_history:
        turns = turns[::-1]
    for turn_index, (source, target) in enumerate(turns):
        if total >= opts.cutoff_len:
            break
        source_len, target_len = split_budget(len(source), len(target), opts.cutoff_len - total)
        source, target = source[:source_len], target[:target_len]
        total += source_len + target_len
        if opts.train_on_prompt:
            source_labels = list(source)
        elif template.efficient_eos:
            source_labels = [tokenizer.eos_token_id] + [IGNORE_INDEX] * (source_len - 1)
        else:
            source_labels = [IGNORE_INDEX] * source_len
        target_labels = [IGNORE_INDEX] * target_len if opts.mask_history and turn_index != 0 else list(target)
        if opts.mask_history:
            input_ids = source + target + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source + target
            labels += source_labels + target_labels
    if template.efficient_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return {"input_ids": input_ids, "labels": labels}


def supervised_batch(tokenizer: Any, template: Template, examples: list[dict], opts: ProcessorOptions) -> dict:
    out: dict[str, list] = {"input_ids": [], "labels": []}
    dropped: dict[str, int] = {}
    for example in examples:
        reason = invalid_reason(example)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        encoded = supervised_example(tokenizer, template, example, opts)
        out["input_ids"].append(encoded["input_ids"])
        out["labels"].append(encoded["labels"])
    return {"columns": out, "dropped": dropped}


def pretrain_batch(tokenizer: Any, examples: list[dict], opts: ProcessorOptions, eos_token: str | None = None) -> dict:
    """Texts + eos; with packing, the batch is concatenated and cut into full cutoff_len blocks (the tail dropped)."""
    eos = eos_token if eos_token is not None else tokenizer.eos_token
    texts = [example["prompt"][0]["content"] + eos for example in examples]
    add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None
    if not opts.packing:
        if add_bos:
            texts = [tokenizer.bos_token + text for text in texts]
        ids = [tokenizer.encode(t, add_special_tokens=False)[: opts.cutoff_len] for t in texts]
    else:
        stream = list(chain.from_iterable(tokenizer.encode(t, add_special_tokens=False) for t in texts))
        usable = (len(stream) // opts.cutoff_len) * opts.cutoff_len
        ids = [stream[i : i + opts.cutoff_len] for i in range(0, usable, opts.cutoff_len)]
        if add_bos:
            for block in ids:
                block[0] = tokenizer.bos_token_id
    ids = [block for block in ids if block]
    return {"columns": {"input_ids": ids, "labels": [list(b) for b in ids]}, "dropped": {}}
