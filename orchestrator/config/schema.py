"""LoomConfig: every parameter in one flat, typed model (LLaMA-Factory's names), plus derived values."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

from pydantic import ConfigDict

from ..stages import STAGES
from ..values import as_dict, split_csv
from .data import DataArgs
from .evaluation import EvaluationArgs
from .export import ExportArgs
from .finetuning import FinetuningArgs
from .generation import GenerationArgs
from .inference import VllmArgs
from .model import ModelArgs
from .multimodal import MultimodalArgs
from .optimizers import OptimizerArgs
from .quantization import QuantizationArgs
from .ray import RayArgs
from .rlhf import RlhfArgs
from .tracking import TrackingArgs
from .training import TrainingArgs

GROUPS = (
    ModelArgs,
    FinetuningArgs,
    DataArgs,
    TrainingArgs,
    RayArgs,
    GenerationArgs,
    RlhfArgs,
    OptimizerArgs,
    QuantizationArgs,
    MultimodalArgs,
    VllmArgs,
    ExportArgs,
    EvaluationArgs,
    TrackingArgs,
)


class LoomConfig(*GROUPS):
    """The validated config. Unknown keys are errors; derived numbers are methods."""

    model_config = ConfigDict(extra="forbid", validate_default=False, frozen=True, protected_namespaces=())

    def worker_resources(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in as_dict(self.resources_per_worker).items()}

    def gpus_per_worker(self) -> float:
        return self.worker_resources().get("GPU", 0.0)

    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else self.lora_rank * 2

    def global_batch_size(self) -> int:
        """Examples per optimizer step across all workers (at ray_num_workers; elastic runs keep it)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.ray_num_workers

    def min_workers(self) -> int:
        return self.ray_min_workers or self.ray_num_workers

    def is_elastic(self) -> bool:
        return self.min_workers() < self.ray_num_workers

    def uses_packing(self) -> bool:
        return self.packing if self.packing is not None else STAGES[self.stage].packs_by_default

    def uses_gradient_checkpointing(self) -> bool:
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return not self.disable_gradient_checkpointing

    def dataset_names(self) -> list[str]:
        return split_csv(self.dataset)

    def merged_adapters(self) -> list[str]:
        """The adapters of adapter_name_or_path merged into the base before LoRA training: all of them with
        create_new_adapter (a fresh adapter is trained on top), else all but the last (which training continues).
        The base with these merged is also the LoRA policy's reference (its trained adapter disabled)."""
        adapters = self.adapters()
        return adapters if self.create_new_adapter else adapters[:-1]

    def adapters(self) -> list[str]:
        """The folders of adapter_name_or_path, each with adapter_folder (the adapter's subfolder) joined on."""
        paths = split_csv(self.adapter_name_or_path)
        return [os.path.join(path, self.adapter_folder) for path in paths] if self.adapter_folder else paths

    def best_model_metric(self) -> str | None:
        """The logged name of load_best_model_at_end's metric (eval_ prefixed, as the evaluation logs it)."""
        if not self.load_best_model_at_end:
            return None
        name = self.metric_for_best_model or "loss"
        return name if name.startswith("eval_") else f"eval_{name}"

    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not (self.best_model_metric() or "loss").endswith("loss")

    def shuffle_seed(self) -> int:
        return self.data_seed if self.data_seed is not None else self.seed

    def non_default_values(self) -> dict:
        """Only the keys the user set to something other than the default: what a run name hashes."""
        return self.model_dump(exclude_defaults=True)

    @classmethod
    def secret_keys(cls) -> frozenset[str]:
        """Keys declared `secret` (tokens, API keys): never written to a file or printed."""
        return frozenset(name for name, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("secret"))


def without_secrets(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping as it may be written or printed: the secret keys left out."""
    return {key: value for key, value in raw.items() if key not in LoomConfig.secret_keys()}


def shown(key: str, value: Any) -> str:
    """A value as a message may quote it: a secret key's value (or one set under a name close to a secret key's, a
    likely typo of it) is not shown."""
    secrets = LoomConfig.secret_keys()
    if key in secrets or difflib.get_close_matches(key, secrets, n=1, cutoff=0.8):
        return "a value not shown here: this key holds a secret"
    return repr(value)
