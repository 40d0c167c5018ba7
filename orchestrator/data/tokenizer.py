"""Loading the tokenizer the same way in data tasks, workers and generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from ..values import split_csv
from .templates import get_template, prepare_tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything that decides how text becomes ids; hashable, so each process loads it once."""

    path: str
    template: str
    use_fast: bool = True
    revision: str = "main"
    cache_dir: str | None = None
    trust_remote_code: bool = False
    token: str | None = None
    new_special_tokens: tuple[str, ...] = ()
    split_special_tokens: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> TokenizerSpec:
        return cls(
            path=cfg.model_name_or_path,
            template=template_name(cfg),
            use_fast=cfg.use_fast_tokenizer,
            revision=cfg.model_revision,
            cache_dir=cfg.cache_dir,
            trust_remote_code=cfg.trust_remote_code,
            token=cfg.hf_hub_token,
            new_special_tokens=tuple(split_csv(cfg.new_special_tokens)),
            split_special_tokens=cfg.split_special_tokens,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def template_name(cfg: Any) -> str:
    return cfg.template or "empty"


@lru_cache(maxsize=4)
def load_tokenizer(spec: TokenizerSpec) -> Any:
    from transformers import AutoTokenizer

    from ..environment import remote_code_imports

    remote_code_imports(spec.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(
        spec.path,
        use_fast=spec.use_fast,
        revision=spec.revision,
        cache_dir=spec.cache_dir,
        trust_remote_code=spec.trust_remote_code,
        token=spec.token,
        split_special_tokens=spec.split_special_tokens,
    )
    if spec.new_special_tokens:
        tokenizer.add_tokens(list(spec.new_special_tokens), special_tokens=True)
    missing = prepare_tokenizer(tokenizer, get_template(spec.template))
    if missing:
        raise ValueError(f"template {spec.template!r} needs tokens the tokenizer lacks: {missing} (every formatted "
                         "example contains them; add them with new_special_tokens, which also grows the "
                         "embeddings, or use the model's own template)")  # fmt: skip
    return tokenizer


class FastIds:
    """A tokenizer seen through its Rust backend for the hot path of data preparation: `encode` without the
    per-call bookkeeping of transformers' wrapper (about 2.5x faster on short template slots), identical ids.
    Everything else is delegated to the wrapped tokenizer."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._backend.encode_batch(texts, add_special_tokens=False)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def for_data(tokenizer: Any) -> Any:
    """The fastest exact view of `tokenizer` for preparing data (slow tokenizers are used as they are)."""
    return FastIds(tokenizer) if getattr(tokenizer, "backend_tokenizer", None) is not None else tokenizer
