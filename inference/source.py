"""Which weights an inference command loads: a base model, the adapters merged onto it, a value head, a tokenizer.

A user points Loom at what they trained in any of the ways they have it:
- a config's `model_name_or_path` with `adapter_name_or_path` (LLaMA-Factory's way; several adapters merge in order);
- a run's `output_dir` (a full model, or an adapter for `model_name_or_path`);
- one checkpoint of a run (`<ray_storage_path>/<ray_run_name>/checkpoint-NNNNNN`), whose `model/` folder holds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ConfigError, Problem

CHECKPOINT_MANIFEST = "loom_checkpoint.json"  # workers/checkpoint.MANIFEST, named here so the driver imports no torch
VALUE_HEAD_FILE = "value_head.safetensors"  # workers/value_head.VALUE_HEAD_FILE


@dataclass(frozen=True)
class ModelSource:
    base: str  # a full causal LM folder (or hub name)
    adapters: tuple[str, ...] = ()  # merged onto the base in order
    value_head: str | None = None  # folder with value_head.safetensors: the model also scores (a reward model)
    tokenizer: str = ""  # folder the tokenizer loads from

    @property
    def name(self) -> str:
        """A short name for the loaded model (the API's default model id)."""
        return os.path.basename(os.path.normpath(self.adapters[-1] if self.adapters else self.base))

    def describe(self) -> str:
        merged = f" + adapters {', '.join(self.adapters)}" if self.adapters else ""
        head = " with its value head" if self.value_head else ""
        return f"{self.base}{merged}{head}"


def _has(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, name))


def holds_model(folder: str) -> bool:
    return os.path.isdir(folder) and (_has(folder, "adapter_config.json") or _has(folder, "config.json"))


def model_source(cfg: Any, model_dir: str | None = None) -> ModelSource:
    """What to load for `cfg`, from `model_dir` when given (an output_dir, an adapter or full model folder, or a
    checkpoint of a run); ConfigError naming the folder when it holds no model."""
    adapters = tuple(cfg.adapters())
    if model_dir is None:
        last = adapters[-1] if adapters else cfg.model_name_or_path
        head = last if os.path.isdir(last) and _has(last, VALUE_HEAD_FILE) else None
        return ModelSource(cfg.model_name_or_path, adapters, head, _tokenizer_folder(last, cfg))
    folder = model_dir
    if _has(folder, CHECKPOINT_MANIFEST):
        folder = os.path.join(folder, "model")
    if not holds_model(folder):
        raise ConfigError(
            [
                Problem(
                    "--model-dir",
                    f"{model_dir!r} holds no model: expected a run's output_dir, a checkpoint-NNNNNN "
                    "folder of a run, or a folder with config.json or adapter_config.json",
                )
            ]  # fmt: skip
        )
    head = folder if _has(folder, VALUE_HEAD_FILE) else None
    if _has(folder, "adapter_config.json"):
        return ModelSource(cfg.model_name_or_path, (*adapters, folder), head, _tokenizer_folder(folder, cfg))
    return ModelSource(folder, (), head, _tokenizer_folder(folder, cfg))


def _tokenizer_folder(folder: str, cfg: Any) -> str:
    """The trained folder's tokenizer when it saved one (it may have grown new tokens), else the base model's: a
    checkpoint's model folder keeps no tokenizer, and the config's new_special_tokens grow the base one the same way."""
    if os.path.isdir(folder) and _has(folder, "tokenizer_config.json"):
        return folder
    return cfg.model_name_or_path


def default_model_dir(cfg: Any, output_dir: str) -> str | None:
    """A training config points at what it trained: its output_dir, when that holds a model and the config names no
    adapters of its own (an inference config names them with adapter_name_or_path)."""
    if cfg.adapter_name_or_path is None and holds_model(output_dir):
        return output_dir
    return None
