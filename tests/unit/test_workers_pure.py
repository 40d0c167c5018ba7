"""Worker-side pure pieces: padding, the loss, checkpoint manifests, the trainer log, accumulation windows."""

from __future__ import annotations

import json

import pytest
import torch

from workers.checkpoint import (
    IncompleteCheckpoint,
    TrainState,
    UnsafeState,
    load_component,
    load_state,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from workers.collate import IGNORE_INDEX, pad_batch
from workers.loop import due, skip, windows
from workers.losses import causal_lm_loss_sum
from workers.trainlog import TrainerLog


def test_pad_batch_right_pads_and_masks_labels():
    batch = pad_batch([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    kept = pad_batch([[5, 6], [8]], [[5, 6], [8]], pad_token_id=0, ignore_pad_token_for_loss=False)
    assert kept["labels"].tolist() == [[5, 6], [8, 0]]


def test_causal_lm_loss_matches_mean_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    total, count = causal_lm_loss_sum(logits, labels)
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert count == 6
    assert torch.allclose(total / count, reference)


def test_windows_group_micro_batches_and_keep_the_rest():
    assert list(windows(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(skip(iter(range(5)), 2)) == [2, 3, 4]
    assert list(skip(iter(range(2)), 5)) == []


def test_due_on_cadence_and_at_the_end():
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert not any(due(s, None, 10) for s in range(1, 11))


class TinyLinear(torch.nn.Linear):
    def save_pretrained(self, folder, state_dict=None, safe_serialization=True):
        import os

        os.makedirs(folder, exist_ok=True)
        torch.save(state_dict or self.state_dict(), os.path.join(folder, "weights.pt"))


def test_checkpoint_manifest_detects_partial_writes(tmp_path):
    model = TinyLinear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")  # what the DDP strategy writes first
    other_rank = {"optimizer/__1_0.distcp": 10}  # a file another rank wrote into its own folder
    state = TrainState(global_step=3, epoch=1, batches_in_epoch=2)
    components = {"scheduler": scheduler.state_dict(), "stage_state": {"kl_coef": 0.25}}
    save_checkpoint(str(folder), model, state, [{}], components=components, other_ranks_files=other_rank)
    with pytest.raises(IncompleteCheckpoint, match="__1_0.distcp"):  # listed, but Ray has not merged it in yet
        verify_checkpoint(str(folder))
    (folder / "optimizer").mkdir()
    (folder / "optimizer" / "__1_0.distcp").write_bytes(b"0123456789")
    manifest = verify_checkpoint(str(folder))
    assert manifest["step"] == 3 and "optimizer.pt" in manifest["files"]
    assert read_state(str(folder)).batches_in_epoch == 2
    assert {"scheduler.pt", "stage_state.pt"} <= set(manifest["files"])
    assert load_component(str(folder), "stage_state") == {"kl_coef": 0.25}
    assert load_component(str(folder), "value_head") is None
    (folder / "optimizer.pt").write_bytes(b"truncated")
    with pytest.raises(IncompleteCheckpoint, match="optimizer.pt"):
        verify_checkpoint(str(folder))
    (folder / "loom_checkpoint.json").unlink()
    with pytest.raises(IncompleteCheckpoint, match="not completely written"):
        verify_checkpoint(str(folder))


class _Planted:
    """A pickle that runs code when it is loaded: what someone could put into a checkpoint folder."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_state_loads_without_running_pickled_code(tmp_path):
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng_state.pt")
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_state(str(tmp_path / "rng_state.pt")))  # weights_only=True reads Loom's own RNG file
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
    marker = tmp_path / "ran"
    torch.save({"last_epoch": 1, "payload": _Planted(str(marker))}, tmp_path / "scheduler.pt")
    with pytest.raises(UnsafeState, match="scheduler.pt was not loaded"):
        load_component(str(tmp_path), "scheduler")
    assert not marker.exists()


def test_trainer_log_truncates_steps_after_the_checkpoint(tmp_path):
    log = TrainerLog(str(tmp_path / "out" / "trainer_log.jsonl"))
    log.truncate_after(0)  # creates an empty log
    for step in range(1, 7):
        log.append({"step": step, "loss": 1.0 / step})
    log.truncate_after(4)
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4]
    lines = (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] <= 4 for line in lines)
