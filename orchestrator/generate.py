"""Sample generation from a trained model with the config's template and generation keys (used by the quickstart)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from .data.templates import get_template, stop_token_ids
from .data.tokenizer import TokenizerSpec, load_tokenizer, template_name

INFER_DTYPES = {"auto": None, "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def load_trained(cfg: Any, model_dir: str) -> tuple[Any, Any]:
    """Model and tokenizer from output_dir: an adapter is applied to model_name_or_path, a full model loads alone."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype_name = INFER_DTYPES[cfg.infer_dtype]
    dtype = getattr(torch, dtype_name) if dtype_name else torch.float32
    tokenizer = load_tokenizer(replace(TokenizerSpec.from_config(cfg), path=model_dir))
    if os.path.isfile(os.path.join(model_dir, "adapter_config.json")):
        from peft import PeftModel

        from workers.model import fit_embeddings

        base = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=dtype)
        fit_embeddings(base, tokenizer)  # an adapter trained with new tokens saved the grown embeddings
        model = PeftModel.from_pretrained(base, model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval(), tokenizer


def generation_kwargs(cfg: Any, tokenizer: Any, prompt_len: int) -> dict[str, Any]:
    """max_new_tokens bounds the answer and max_length the prompt plus answer; the tighter one wins."""
    kwargs = {
        "do_sample": cfg.do_sample,
        "num_beams": cfg.num_beams,
        "max_new_tokens": max(1, min(cfg.max_new_tokens, cfg.max_length - prompt_len)),
        "repetition_penalty": cfg.repetition_penalty,
        "length_penalty": cfg.length_penalty,
        "use_cache": cfg.use_cache,
        "eos_token_id": stop_token_ids(tokenizer, get_template(template_name(cfg))),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    return kwargs


def generate(cfg: Any, model_dir: str, prompt: str, seed: int | None = None) -> str:
    import torch

    model, tokenizer = load_trained(cfg, model_dir)
    template = get_template(template_name(cfg))
    ids = template.encode_prompt(tokenizer, [{"role": "user", "content": prompt}], cfg.default_system)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            **generation_kwargs(cfg, tokenizer, len(ids)),
        )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=cfg.skip_special_tokens)
