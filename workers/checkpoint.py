"""Checkpoint folders: model or adapter (and value head), optimizer (one file, or one shard per rank), named components
(scheduler, stage state), RNG, step and data position, manifest last.

A folder without a complete manifest is never restored from: the manifest is written after every other file and
lists each one with its size.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from orchestrator.paths import CHECKPOINT_MANIFEST as MANIFEST
from orchestrator.paths import TRANSFORMERS_STATE as STATE  # the same name as a transformers checkpoint's


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` each rank consumed: the position in a streamed epoch
    rows_in_epoch: int = 0  # rows of the epoch's global order consumed: the position in a materialized epoch
    tokens_seen: int = 0
    total_steps: int = 0
    finished: bool = False
    world_size: int = 0  # ranks that consumed `batches_in_epoch` each (elastic runs may resume with another count)
    optimizer_saved: bool = True  # False under save_only_model: a resume starts the optimizer afresh

    def rescaled_to(self, world_size: int) -> TrainState:
        """The same data position for another number of ranks: the examples consumed stay the same (exactly the same
        rows for a materialized epoch, whose position is counted in rows)."""
        if not self.world_size or self.world_size == world_size:
            return self
        position = self.batches_in_epoch * self.world_size // world_size
        return replace(self, batches_in_epoch=position, world_size=world_size)


class IncompleteCheckpoint(RuntimeError):
    pass


class UnsafeState(RuntimeError):
    pass


def load_state(path: str) -> Any:
    """A state file of a checkpoint: tensors, numbers, strings and containers only (`weights_only=True`), so a file
    that someone else put in a checkpoint folder cannot run code when it is read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeState(f"{path} was not loaded: it holds objects other than tensors and plain values, so Loom did "
                          f"not write it ({str(error).splitlines()[0]})") from error  # fmt: skip


def rng_state() -> dict[str, Any]:
    """Every generator's state in plain values (NumPy's key as a list), so it loads with `weights_only=True`."""
    numpy = np.random.get_state(legacy=False)
    numpy["state"]["key"] = numpy["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = {**state["numpy"], "state": {**state["numpy"]["state"]}}
    numpy["state"]["key"] = np.asarray(numpy["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_files(folder: str) -> dict[str, int]:
    """Relative path -> size of every file under `folder`."""
    return {
        os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    }


def save_checkpoint(
    folder: str,
    model: torch.nn.Module,
    state: TrainState,
    rng_states: list[dict[str, Any]],
    *,
    weights: dict[str, torch.Tensor] | None = None,
    components: dict[str, Any] | None = None,
    other_ranks_files: dict[str, int] | None = None,
    workers: list[dict[str, Any]] | None = None,
) -> None:
    """Rank 0's part of a checkpoint: the model's own files (`weights` when gathered from shards; a model with a
    value head writes it beside them), each named component (`scheduler`, `stage_state`, ...) as `<name>.pt`, RNG,
    state, and the manifest last. Optimizer state is already in the folder (written by the strategy);
    `other_ranks_files` are the files other ranks wrote into their own folders, which Ray merges into this one;
    `workers` (rank -> node of this attempt) goes into the manifest for `loom status`."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(os.path.join(folder, "model"), state_dict=weights, safe_serialization=True)
    for name, value in (components or {}).items():
        torch.save(value, os.path.join(folder, f"{name}.pt"))
    torch.save(rng_states, os.path.join(folder, "rng_state.pt"))
    with open(os.path.join(folder, STATE), "w", encoding="utf-8") as handle:
        json.dump(asdict(state), handle, indent=2)
    files = {**(other_ranks_files or {}), **list_files(folder)}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump({"format": 1, "step": state.global_step, "files": files, "workers": workers or []}, handle,
                  indent=2)  # fmt: skip


def load_component(folder: str, name: str) -> Any | None:
    """A named component of a checkpoint, or None when the checkpoint has none of that name."""
    path = os.path.join(folder, f"{name}.pt")
    return load_state(path) if os.path.isfile(path) else None


def verify_checkpoint(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise IncompleteCheckpoint(f"{folder} has no {MANIFEST}: it was not completely written")
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    for name, size in manifest["files"].items():
        full = os.path.join(folder, name)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            raise IncompleteCheckpoint(f"{folder}: {name} is missing or has the wrong size")
    return manifest


def read_state(folder: str) -> TrainState:
    with open(os.path.join(folder, STATE), encoding="utf-8") as handle:
        return TrainState(**json.load(handle))


def restore_checkpoint(folder: str, rank: int) -> TrainState:
    """This rank's RNG and the train state from a verified folder (model, optimizer and components are loaded from
    it by their owners)."""
    verify_checkpoint(folder)
    rng_states = load_state(os.path.join(folder, "rng_state.pt"))
    if rank < len(rng_states):
        set_rng_state(rng_states[rank])
    return read_state(folder)
