"""pissa_convert: the trained PiSSA adapter also saved as a plain LoRA adapter against the original base model.

PiSSA moves the principal components of each target weight into the adapter, so a PiSSA adapter only works on the
residual base it was trained against. PEFT converts it: the difference between the trained adapter and the adapter as
initialised is a LoRA adapter of twice the rank that applies to the untouched base. That needs the initial adapter,
which rank 0 keeps from before the first step and carries in every checkpoint, so a resumed run converts against the
same start. output_dir gets both, under LLaMA-Factory's names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

INITIAL = "pissa_init"  # the adapter before any step (in every checkpoint, and in output_dir)
CONVERTED = "pissa_converted"  # the plain LoRA adapter for the original base (in output_dir)


class PissaInitial:
    def __init__(self, folder: str):
        self.folder = folder

    @classmethod
    def capture(cls, model: Any, resume_dir: str | None) -> PissaInitial:
        """The initial adapter: the checkpoint's copy when resuming, else the model's adapter now (no step yet)."""
        folder = tempfile.mkdtemp(prefix="loom-pissa-init-")
        if resume_dir:
            shutil.copytree(os.path.join(resume_dir, INITIAL), folder, dirs_exist_ok=True)
        else:
            model.save_pretrained(folder, safe_serialization=True)
        return cls(folder)

    def add_to(self, checkpoint_folder: str) -> None:
        shutil.copytree(self.folder, os.path.join(checkpoint_folder, INITIAL))

    def convert(self, model: Any, output_dir: str) -> str:
        """Write the converted adapter (and the initial one) into output_dir; the converted folder's path."""
        target = os.path.join(output_dir, CONVERTED)
        shutil.copytree(self.folder, os.path.join(output_dir, INITIAL), dirs_exist_ok=True)
        model.save_pretrained(target, safe_serialization=True,
                              path_initial_model_for_weight_conversion=os.path.join(output_dir, INITIAL))  # fmt: skip
        return target
