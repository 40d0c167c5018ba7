"""Per-stage processors: canonical examples -> model-ready token ids. Pure functions, no Ray.

They reproduce LLaMA-Factory's processors (pre-training, supervised, packed supervised, pairwise, feedback,
unsupervised) so the same data gives the same tokens. Each takes a list of canonical examples and returns
`Processed`: the output columns, the rows dropped by reason, and how many examples were truncated.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
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
    neat_packing: bool = False


@dataclass
class Processed:
    columns: dict[str, list]
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0


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


def invalid_reason(example: dict[str, Any], responses: int | None) -> str | None:
    """Why an example cannot be used by a processor that needs `responses` responses (None: any), or None."""
    if example.get("invalid"):
        return example["invalid"]
    if len(example["prompt"]) % 2 != 1:
        return "prompt turns must be odd (user, assistant, ..., user)"
    if responses == 1 and len(example["response"]) != 1:
        return "needs exactly one response"
    if responses == 2 and len(example["response"]) < 2:
        return "needs a chosen and a rejected response"
    return None


def _encode(tokenizer: Any, template: Template, example: dict, messages: list[dict]) -> list[tuple[list, list]]:
    return template.encode_turns(tokenizer, messages, example.get("system") or None, example.get("tools") or None)


def _one_turn(tokenizer: Any, template: Template, example: dict, response: dict) -> tuple[list[int], list[int]]:
    """The whole conversation before `response` as one prompt, and the response (LLaMA-Factory's encode_oneturn)."""
    prompt, response_ids = template.encode_oneturn(
        tokenizer, example["prompt"] + [response], example.get("system") or None, example.get("tools") or None
    )
    response_ids = list(response_ids)
    if template.efficient_eos:
        response_ids.append(tokenizer.eos_token_id)
    return prompt, response_ids


def supervised_example(tokenizer: Any, template: Template, example: dict, opts: ProcessorOptions) -> dict:
    """input_ids and labels of one multi-turn example, truncated to cutoff_len turn by turn."""
    turns = _encode(tokenizer, template, example, example["prompt"] + example["response"])
    input_ids: list[int] = []
    labels: list[int] = []
    total = 1 if template.efficient_eos else 0
    untruncated = total + sum(len(source) + len(target) for source, target in turns)
    if opts.mask_history:
        turns = turns[::-1]  # the last turn has priority for the budget
    for turn_index, (source, target) in enumerate(turns):
        if total >= opts.cutoff_len:
            break
        source_len, target_len = split_budget(len(source), len(target), opts.cutoff_len - total)
        source, target = source[:source_len], target[:target_len]
        total += source_len + target_len
        if opts.train_on_prompt:
            source_labels = list(source)
        elif template.efficient_eos and turn_index != 0:
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
    return {"input_ids": input_ids, "labels": labels, "truncated": len(input_ids) < untruncated}


def _valid(examples: list[dict], responses: int | None, out: Processed) -> list[dict]:
    kept = []
    for example in examples:
        reason = invalid_reason(example, responses)
        if reason:
            out.dropped[reason] += 1
        else:
            kept.append(example)
    return kept


def supervised_batch(tokenizer: Any, template: Template, examples: list[dict], opts: ProcessorOptions) -> Processed:
    if opts.packing:
        return packed_supervised_batch(tokenizer, template, examples, opts)
    out = Processed({"input_ids": [], "labels": []})
    for example in _valid(examples, 1, out):
        encoded = supervised_example(tokenizer, template, example, opts)
        out.truncated += encoded["truncated"]
        out.columns["input_ids"].append(encoded["input_ids"])
        out.columns["labels"].append(encoded["labels"])
    return out


def greedy_knapsack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups of lengths that fit `capacity`: each knapsack takes the largest length that still fits, repeatedly."""
    remaining = sorted(lengths)
    knapsacks = []
    while remaining:
        room, knapsack = capacity, []
        while (index := bisect.bisect(remaining, room) - 1) >= 0:
            room -= remaining[index]
            knapsack.append(remaining.pop(index))
        if not knapsack:
            raise ValueError(f"a sequence of {remaining[0]} tokens cannot fit a block of {capacity}")
        knapsacks.append(knapsack)
    return knapsacks


def packed_supervised_batch(
    tokenizer: Any, template: Template, examples: list[dict], opts: ProcessorOptions
) -> Processed:
    """Supervised examples packed into blocks of at most cutoff_len tokens, positions restarting per sequence.

    With neat_packing, `segment_ids` (1, 1, 2, 2, 2, ...) say which sequence each token belongs to, so the worker
    can keep attention inside each sequence. Examples longer than cutoff_len are dropped, as LLaMA-Factory does.
    """
    out = Processed({"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []})
    by_length: dict[int, list[dict]] = {}
    for example in _valid(examples, 1, out):
        encoded = supervised_example(tokenizer, template, example, opts)
        length = len(encoded["input_ids"])
        if length > opts.cutoff_len:
            out.dropped[f"longer than cutoff_len ({opts.cutoff_len}) for packing"] += 1
            continue
        out.truncated += encoded["truncated"]
        by_length.setdefault(length, []).append(encoded)
    for knapsack in greedy_knapsack([n for n, group in by_length.items() for _ in group], opts.cutoff_len):
        block = {name: [] for name in out.columns}
        for segment, length in enumerate(knapsack, start=1):
            encoded = by_length[length].pop()
            block["input_ids"] += encoded["input_ids"]
            block["labels"] += encoded["labels"]
            block["position_ids"] += list(range(length))
            block["segment_ids"] += [segment if opts.neat_packing else 1] * length
        for name, values in block.items():
            out.columns[name].append(values)
    return out


def pairwise_batch(tokenizer: Any, template: Template, examples: list[dict], opts: ProcessorOptions) -> Processed:
    """chosen/rejected pairs for rm and dpo: one shared prompt, both responses cut to the same budget."""
    names = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    out = Processed({name: [] for name in names})
    for example in _valid(examples, 2, out):
        prompt, chosen = _one_turn(tokenizer, template, example, example["response"][0])
        _, rejected = _one_turn(tokenizer, template, example, example["response"][1])
        source_len, target_len = split_budget(len(prompt), max(len(chosen), len(rejected)), opts.cutoff_len)
        out.truncated += source_len < len(prompt) or target_len < max(len(chosen), len(rejected))
        prompt = prompt[:source_len]
        for side, response in (("chosen", chosen[:target_len]), ("rejected", rejected[:target_len])):
            out.columns[f"{side}_input_ids"].append(prompt + response)
            out.columns[f"{side}_labels"].append([IGNORE_INDEX] * source_len + response)
    return out


def _truncated_pair(prompt: list[int], response: list[int], cutoff_len: int) -> tuple[list[int], list[int], bool]:
    source_len, target_len = split_budget(len(prompt), len(response), cutoff_len)
    ids = prompt[:source_len] + response[:target_len]
    cut = source_len < len(prompt) or target_len < len(response)
    return ids, [IGNORE_INDEX] * source_len + response[:target_len], cut


def feedback_batch(tokenizer: Any, template: Template, examples: list[dict], opts: ProcessorOptions) -> Processed:
    """KTO examples, each with a desirable/undesirable tag and a mismatched "KL" completion: the response of the
    previous example in the batch (the first takes the last one's), as LLaMA-Factory pairs them."""
    out = Processed({name: [] for name in ("input_ids", "labels", "kl_input_ids", "kl_labels", "kto_tags")})
    mismatched = [examples[-1]["response"]] + [example["response"] for example in examples[:-1]] if examples else []
    for example, kl_response in zip(examples, mismatched, strict=True):
        reason = invalid_reason(example, 1) or (None if kl_response else "the mismatched KL example has no response")
        if reason or example.get("kto_tag") is None:
            out.dropped[reason or "no kto_tag"] += 1
            continue
        ids, labels, cut = _truncated_pair(*_one_turn(tokenizer, template, example, example["response"][0]),
                                           opts.cutoff_len)  # fmt: skip
        kl_ids, kl_labels, _ = _truncated_pair(*_one_turn(tokenizer, template, example, kl_response[0]),
                                               opts.cutoff_len)  # fmt: skip
        out.truncated += cut
        for name, value in zip(out.columns, (ids, labels, kl_ids, kl_labels, bool(example["kto_tag"])), strict=True):
            out.columns[name].append(value)
    return out


def unsupervised_batch(tokenizer: Any, template: Template, examples: list[dict], opts: ProcessorOptions) -> Processed:
    """Prompts for generation (ppo, predict): input_ids end ready for the answer; labels hold the reference answer."""
    out = Processed({"input_ids": [], "labels": []})
    for example in _valid(examples, None, out):
        response = example["response"][0] if len(example["response"]) == 1 else {"role": "assistant", "content": ""}
        prompt, reference = _one_turn(tokenizer, template, example, response)
        source_len, target_len = split_budget(len(prompt), len(reference), opts.cutoff_len)
        out.truncated += source_len < len(prompt) or target_len < len(reference)
        out.columns["input_ids"].append(prompt[:source_len])
        out.columns["labels"].append(reference[:target_len])
    return out


def _encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_many"):  # the Rust backend encodes a whole batch at once
        return tokenizer.encode_many(texts)
    if callable(tokenizer):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def pretrain_batch(tokenizer: Any, template: Template, examples: list[dict], opts: ProcessorOptions) -> Processed:
    """Texts + eos; with packing, the batch is concatenated and cut into full cutoff_len blocks (the tail dropped)."""
    out = Processed({"input_ids": [], "labels": []})
    texts = []
    for example in examples:
        if example.get("invalid") or not example["prompt"]:
            out.dropped[example.get("invalid") or "no text"] += 1
        else:
            texts.append(example["prompt"][0]["content"] + tokenizer.eos_token)
    add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None
    if not opts.packing:
        if add_bos:
            texts = [tokenizer.bos_token + text for text in texts]
        encoded = _encode_texts(tokenizer, texts)
        out.truncated = sum(len(ids) > opts.cutoff_len for ids in encoded)
        blocks = [ids[: opts.cutoff_len] for ids in encoded]
    else:
        stream = list(chain.from_iterable(_encode_texts(tokenizer, texts)))
        usable = (len(stream) // opts.cutoff_len) * opts.cutoff_len
        blocks = [stream[i : i + opts.cutoff_len] for i in range(0, usable, opts.cutoff_len)]
        if add_bos:
            for block in blocks:
                block[0] = tokenizer.bos_token_id
    out.columns["input_ids"] = [block for block in blocks if block]
    out.columns["labels"] = [list(block) for block in out.columns["input_ids"]]
    return out


Processor = Callable[[Any, Template, list[dict], ProcessorOptions], Processed]

PROCESSORS: dict[str, Processor] = {
    "pretrain": pretrain_batch,
    "supervised": supervised_batch,
    "pairwise": pairwise_batch,
    "feedback": feedback_batch,
    "unsupervised": unsupervised_batch,
}

# The token-id columns each processor writes (besides the bookkeeping columns the pipeline adds).
ID_COLUMNS: dict[str, tuple[str, ...]] = {
    "pretrain": ("input_ids", "labels"),
    "supervised": ("input_ids", "labels"),
    "packed": ("input_ids", "labels", "position_ids", "segment_ids"),
    "pairwise": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
    "feedback": ("input_ids", "labels", "kl_input_ids", "kl_labels"),
    "unsupervised": ("input_ids", "labels"),
}


def id_columns(name: str, packing: bool) -> tuple[str, ...]:
    return ID_COLUMNS["packed" if name == "supervised" and packing else name]
