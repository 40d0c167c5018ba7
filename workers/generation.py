"""Generation settings and transformers `generate` arguments: shared by the inference engine and the ppo stage's
rollout. Pure: no model, no torch."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """The generation keys of a config, overridable per request (the API's temperature, top_p, max_tokens, ...)."""

    do_sample: bool = True
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    num_beams: int = 1
    max_length: int = 1024
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    stop: tuple[str, ...] = ()
    n: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> Sampling:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if f.name not in ("stop", "n")})

    def updated(self, **changes: Any) -> Sampling:
        """These settings with the given values (None keeps the setting); temperature 0 means greedy, as in
        OpenAI's API."""
        changes = {key: value for key, value in changes.items() if value is not None}
        if "stop" in changes:
            stop = changes["stop"]
            changes["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if changes.get("temperature") == 0:
            changes.update(do_sample=False, temperature=self.temperature)
        return replace(self, **changes)

    def new_tokens(self, prompt_len: int) -> int:
        """max_new_tokens bounds the answer and max_length the prompt plus answer; the tighter one wins."""
        return max(1, min(self.max_new_tokens, self.max_length - prompt_len))


def generate_kwargs(sampling: Sampling, prompt_len: int, stop_ids: list[int], tokenizer: Any, use_cache: bool = True
                    ) -> dict[str, Any]:  # fmt: skip
    """transformers `generate` arguments for these settings (also the ppo stage's rollout)."""
    kwargs: dict[str, Any] = {
        "do_sample": sampling.do_sample, "num_beams": sampling.num_beams,
        "max_new_tokens": sampling.new_tokens(prompt_len), "repetition_penalty": sampling.repetition_penalty,
        "length_penalty": sampling.length_penalty, "use_cache": use_cache, "eos_token_id": stop_ids,
        "pad_token_id": tokenizer.pad_token_id, "num_return_sequences": sampling.n,
    }  # fmt: skip
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    if sampling.stop:  # generation ends at a stop string; the reply is cut before it
        kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
    return kwargs
