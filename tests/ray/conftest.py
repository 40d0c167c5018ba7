from __future__ import annotations

import pytest

from tests.helpers import DEMO_DATA

pytestmark = pytest.mark.ray


@pytest.fixture
def train_config(tiny_model, tmp_path):
    """A small real run: 2 workers of 1 CPU, tiny model, demo data, 8 steps, checkpoints every 4."""

    def build(**extra) -> dict:
        return {
            "model_name_or_path": tiny_model,
            "dataset": "loom_demo_sft",
            "dataset_dir": str(DEMO_DATA),
            "template": "default",
            "cutoff_len": 128,
            "max_samples": 128,
            "output_dir": str(tmp_path / "out"),
            "ray_storage_path": str(tmp_path / "saves"),
            "ray_run_name": "test-run",
            "ray_num_workers": 2,
            "resources_per_worker": {"CPU": 1},
            "per_device_train_batch_size": 4,
            "max_steps": 8,
            "logging_steps": 1,
            "save_steps": 4,
            "learning_rate": 5e-3,
            "lr_scheduler_type": "constant",
            **extra,
        }

    return build
