"""Paths, URIs and names: the one place that says what a path resolves to and what a name may be. Pure."""

from __future__ import annotations

import os
import re

# Config keys where Loom writes: made absolute against the working dir whether or not they exist yet, so every
# process (Ray tasks and workers run elsewhere) writes to the one folder the user named.
OUTPUT_PATH_KEYS = (
    "output_dir",
    "ray_storage_path",
    "cache_dir",
    "tokenized_path",
    "save_dir",
    "export_dir",
    "logging_dir",
)
# Config keys holding local paths (or hub ids, or URIs); inputs are made absolute when they exist here.
LOCAL_PATH_KEYS = ("model_name_or_path", "dataset_dir", "ref_model", "reward_model", "resume_from_checkpoint",
                   *OUTPUT_PATH_KEYS)  # fmt: skip

CHECKPOINT_MANIFEST = "loom_checkpoint.json"  # written last into each of Loom's checkpoint folders
TRANSFORMERS_STATE = "trainer_state.json"  # what a transformers Trainer (and LLaMA-Factory) checkpoint-N holds

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_safe_name(name: str) -> bool:
    """One path component that cannot climb out of its parent: letters, digits and -_. (not starting with a dot)."""
    return bool(_SAFE_NAME.match(name))


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_path(path: str, base_dir: str) -> str:
    if is_uri(path):
        return path.rstrip("/")
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def checkpoint_kind(folder: str) -> str | None:
    """`loom` (a checkpoint folder Loom wrote: weights under model/, optimizer, schedule, data position),
    `transformers` (a Trainer's or LLaMA-Factory's checkpoint-N: weights at the top), or None."""
    if os.path.isfile(os.path.join(folder, CHECKPOINT_MANIFEST)):
        return "loom"
    if os.path.isfile(os.path.join(folder, TRANSFORMERS_STATE)):
        return "transformers"
    return None


def checkpoint_weights(folder: str) -> str:
    """Where a checkpoint folder of either kind keeps its model or adapter."""
    return os.path.join(folder, "model") if checkpoint_kind(folder) == "loom" else folder
