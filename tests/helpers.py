"""Shared test helpers: a char-level tokenizer for exact template checks, paths of the repo."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "orchestrator" / "demo" / "data"
SHARED = REPO.parent / "shared"
LLAMAFACTORY_DATA = SHARED / "data" / "llamafactory"


def tiny_config(tiny_model: str, **extra):
    """A validated config over the tiny model and Loom's demo SFT data, with CPU workers."""
    from orchestrator.config import validate_config

    raw = {"model_name_or_path": tiny_model, "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
           "template": "default", "resources_per_worker": {"CPU": 1}}  # fmt: skip
    return validate_config({**raw, **extra})


def tiny_variant(tiny_model: str, out_dir: Path, **config_changes) -> str:
    """A copy of the tiny model (weights and tokenizer) with some of its config.json values changed."""
    import json
    import shutil

    shutil.copytree(tiny_model, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**config, **config_changes}, indent=2))
    return str(out_dir)


def tiny_moe(tiny_model: str, out_dir: Path, experts: int = 4, **config_values) -> str:
    """A random-init Mixtral (mixture of experts, top-2 routing) with the tiny model's tokenizer and sizes."""
    import shutil

    import torch
    from transformers import AutoConfig, MixtralConfig, MixtralForCausalLM

    base = AutoConfig.from_pretrained(tiny_model)
    config = MixtralConfig(vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=base.num_attention_heads,
                           num_key_value_heads=base.num_key_value_heads, num_local_experts=experts,
                           num_experts_per_tok=2, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                           pad_token_id=base.pad_token_id, tie_word_embeddings=False, **config_values)  # fmt: skip
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_model) / name).exists():
            shutil.copy(Path(tiny_model) / name, out_dir / name)
    return str(out_dir)


@contextmanager
def cpus_held(count: int) -> Iterator[None]:
    """An actor of "another job" holds `count` CPUs of the connected cluster while the block runs."""
    import ray

    @ray.remote(num_cpus=count)
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    try:
        yield
    finally:
        ray.kill(hog)


class CharTokenizer:
    """One id per character (its code point + 1000); a few named special tokens below 1000."""

    SPECIAL = {"<s>": 1, "</s>": 2, "<pad>": 0, "<|im_start|>": 3, "<|im_end|>": 4}

    def __init__(self, bos: bool = True):
        self.bos_token_id = 1 if bos else None
        self.eos_token_id = 2
        self.pad_token_id = 0
        self.unk_token_id = None
        self.eos_token = "</s>"
        self.bos_token = "<s>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for token, token_id in self.SPECIAL.items():
                if text.startswith(token, i):
                    ids.append(token_id)
                    i += len(token)
                    break
            else:
                ids.append(ord(text[i]) + 1000)
                i += 1
        return ids

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.SPECIAL.get(token)

    def decode_ids(self, ids: list[int]) -> str:
        names = {v: k for k, v in self.SPECIAL.items()}
        return "".join(names[i] if i in names else chr(i - 1000) for i in ids)
