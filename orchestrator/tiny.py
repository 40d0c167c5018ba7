"""Build a tiny Llama-family model and a byte-level BPE tokenizer offline, for the quickstart and the tests."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>", "<pad>"]


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0
    warmup_steps: int = 150  # a short full-parameter pre-training on the demo texts, so fine-tuning starts from
    # a model that has seen the language (as real fine-tuning does), not from noise; 0 keeps the random init


def training_corpus() -> list[str]:
    """Text the tokenizer learns its merges from: Loom's own demo data plus a few generic lines."""
    from .demo import demo_texts

    return demo_texts() + ["Human: Assistant: System: ### Instruction: ### Response:"] * 4


def build_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=spec.max_position_embeddings,
    )


def build_tiny_model(out_dir: str, spec: TinySpec = TinySpec()) -> str:
    """Write tokenizer + random-init LlamaForCausalLM (safetensors) into out_dir; returns out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    if spec.warmup_steps:
        pretrain_briefly(model, tokenizer, spec)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "loom_tiny.json"), "w", encoding="utf-8") as handle:
        json.dump(spec.__dict__, handle, indent=2)
    return out_dir


def pretrain_briefly(model, tokenizer, spec: TinySpec, batch_size: int = 16, block: int = 64) -> list[float]:
    """A few hundred AdamW steps of next-token prediction on packed demo text, in this process."""
    import random

    import torch

    stream = [t for text in training_corpus() for t in tokenizer.encode(text + tokenizer.eos_token)]
    blocks = [stream[i : i + block] for i in range(0, len(stream) - block, block)]
    rng = random.Random(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(spec.warmup_steps):
        batch = torch.tensor(rng.sample(blocks, min(batch_size, len(blocks))))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    model.eval()
    return losses


def ensure_tiny_model(out_dir: str) -> str:
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    return build_tiny_model(out_dir)
