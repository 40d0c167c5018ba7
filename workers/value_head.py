"""A causal LM with a scalar value head: the reward model (rm) and the PPO policy's critic.

Saved in LLaMA-Factory's layout: the model or adapter as transformers/PEFT writes it, and beside it
`value_head.safetensors` with `v_head.summary.weight` [1, hidden] and `v_head.summary.bias` [1]. So a reward model
trained here scores without Loom: load the causal LM (and adapter), take the last hidden state at the last non-pad
token, and apply that linear layer (`score_without_loom` in the tests does exactly this).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

VALUE_HEAD_FILE = "value_head.safetensors"
HEAD_KEYS = {"weight": "v_head.summary.weight", "bias": "v_head.summary.bias"}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token (rows may be left- or right-padded)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def base_of(body: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers are injected into it in place)."""
    return body.get_base_model() if hasattr(body, "get_base_model") else body


def load_head_weights(folder: str) -> dict[str, torch.Tensor] | None:
    path = os.path.join(folder, VALUE_HEAD_FILE)
    if not os.path.isfile(path):
        return None
    from safetensors.torch import load_file

    stored = load_file(path)
    return {name: stored[key] for name, key in HEAD_KEYS.items()}


class ValueOutput(NamedTuple):
    logits: torch.Tensor | None  # None when asked for values only
    values: torch.Tensor  # [B, T], the head in fp32 on the last hidden states
    hidden: torch.Tensor  # [B, T, H], the last hidden states (another head, e.g. PPO's reward, reads them)


class ValueHeadModel(torch.nn.Module):
    """A causal LM (or PEFT model) and a scalar head on its last hidden states. Always called through this module,
    never through `body` alone, so FSDP's root unit (which holds the embeddings and the head) is gathered."""

    def __init__(self, body: torch.nn.Module, train_lm_head: bool = True):
        super().__init__()
        self.body = body
        self.v_head = torch.nn.Linear(body.config.hidden_size, 1, dtype=torch.float32)
        torch.nn.init.normal_(self.v_head.weight, std=1.0 / (body.config.hidden_size + 1))
        torch.nn.init.zeros_(self.v_head.bias)
        head = base_of(body).get_output_embeddings()
        if not train_lm_head and head is not None and head.weight is not base_of(body).get_input_embeddings().weight:
            head.requires_grad_(False)  # scoring never reaches the LM head; DDP would wait for its gradients

    @property
    def config(self) -> Any:
        return self.body.config

    def load_head(self, folder: str) -> bool:
        weights = load_head_weights(folder)
        if weights is not None:
            self.v_head.load_state_dict(weights)
        return weights is not None

    def disable_adapter(self) -> Any:
        """The body without its adapters (the LoRA policy as its own reference)."""
        return self.body.disable_adapter()

    def forward(self, with_logits: bool = True, **inputs: Any) -> ValueOutput:
        if with_logits:
            output = self.body(**inputs, output_hidden_states=True)
            hidden, logits = output.hidden_states[-1], output.logits
        else:  # the decoder alone: no vocabulary-sized logits for a score
            hidden, logits = base_of(self.body).get_decoder()(**inputs).last_hidden_state, None
        return ValueOutput(logits, self.v_head(hidden.float()).squeeze(-1), hidden)

    def save_pretrained(self, folder: str, state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """The body as transformers/PEFT saves it, and the head beside it (`state_dict`: gathered weights)."""
        from safetensors.torch import save_file

        state_dict = state_dict if state_dict is not None else self.state_dict()
        body = {k.removeprefix("body."): v for k, v in state_dict.items() if k.startswith("body.")}
        self.body.save_pretrained(folder, state_dict=body, **kwargs)
        head = {
            key: state_dict[f"v_head.{name}"].detach().float().cpu().contiguous() for name, key in HEAD_KEYS.items()
        }
        save_file(head, os.path.join(folder, VALUE_HEAD_FILE))
