"""What the bench's baselines record while they train: a transformers TrainerCallback with no Loom import, so the same
file runs inside the plain Trainer process and inside LLaMA-Factory's own virtual environment.

Per optimizer step: the wall clock at its end and the trainer's count of non-pad input tokens so far
(`include_num_input_tokens_seen="non_padding"`); per checkpoint: how long the save took; at the end: the process's
peak resident memory. Written as one JSON object to the path given, for bench/suite.py to read.
"""

from __future__ import annotations

import json
import resource
import time

from transformers import TrainerCallback


class Probe(TrainerCallback):
    def __init__(self, path: str, started: float):
        self.path = path
        self.record = {"started": started, "train_begin": None, "steps": [], "saves": []}

    def on_train_begin(self, args, state, control, **kwargs):
        self.record["train_begin"] = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.record["steps"].append([round(time.time(), 4), int(state.num_input_tokens_seen or 0)])

    def on_save(self, args, state, control, **kwargs):  # called right after the checkpoint is written
        self.record["saves"].append(round(time.time() - self.record["steps"][-1][0], 4))

    def on_train_end(self, args, state, control, **kwargs):
        self.record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        import torch

        if torch.cuda.is_available():  # the device's peak, as Loom's workers report theirs (RECORD_VRAM)
            self.record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        with open(self.path, "w", encoding="utf-8") as handle:
            json.dump(self.record, handle)
