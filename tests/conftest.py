"""Session fixtures: one tiny model and one local Ray cluster (started with `ray start --head`) for the whole run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "RAY_AUTH_MODE", "disabled"
)  # one local test cluster; token auth would need a token in every client
# The S3 tests talk to a moto server on loopback: dummy credentials, and never probe a cloud metadata service.
for _key, _value in {"AWS_ACCESS_KEY_ID": "loom-test", "AWS_SECRET_ACCESS_KEY": "loom-test",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
    os.environ.setdefault(_key, _value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BUCKET = "loom-runs"


@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server (moto) on loopback with one bucket: (boto3 client, endpoint URL)."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client, f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def model_dir(tmp_path):
    """A folder that passes the model-path check (config.json present); no weights needed for validation."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from orchestrator.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@dataclass(frozen=True)
class TrainedRun:
    config: dict  # the raw config it was trained with
    output_dir: str
    run_dir: str  # <ray_storage_path>/<ray_run_name>: its checkpoint-NNNNNN folders
    data_summary: dict


def _train_once(ray_cluster: RayCluster, raw: dict) -> TrainedRun:
    from orchestrator.config import validate_config
    from orchestrator.launch import train

    outcome = train(validate_config(raw), source="test", address=ray_cluster.gcs_address)
    return TrainedRun(raw, outcome.output_dir, outcome.plan.run_dir, outcome.data_summary)


def _small_run(tiny_model: str, folder: Path, **extra) -> dict:
    from tests.helpers import DEMO_DATA

    return {"model_name_or_path": tiny_model, "dataset_dir": str(DEMO_DATA), "template": "default",
            "cutoff_len": 128, "output_dir": str(folder / "out"), "ray_storage_path": str(folder / "saves"),
            "ray_run_name": "run", "ray_num_workers": 2, "resources_per_worker": {"CPU": 1},
            "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 5e-3,
            "lr_scheduler_type": "constant", "finetuning_type": "lora", "lora_rank": 8, **extra}  # fmt: skip


@pytest.fixture(scope="session")
def trained_sft(ray_cluster, tiny_model, tmp_path_factory) -> TrainedRun:
    """One LoRA sft run of the tiny model, trained once for every test that only needs a trained model (chat, api,
    serve, predict, export): 12 steps on the demo set, a checkpoint every 6."""
    raw = _small_run(tiny_model, tmp_path_factory.mktemp("trained-sft"), dataset="loom_demo_sft", max_samples=128,
                     max_steps=12, save_steps=6, do_sample=False, max_new_tokens=16, plot_loss=True)  # fmt: skip
    return _train_once(ray_cluster, raw)


@pytest.fixture(scope="session")
def trained_reward_model(ray_cluster, tiny_model, tmp_path_factory) -> TrainedRun:
    """One LoRA rm run on the demo preference set (the preferred answer ends with " Thanks.", the other with
    " Whatever."), with held-out pairs evaluated: trained once, scored by the rm test and by the API's scoring."""
    raw = _small_run(tiny_model, tmp_path_factory.mktemp("trained-rm"), stage="rm", dataset="loom_demo_pref",
                     cutoff_len=96, max_samples=160, val_size=32, do_eval=True, eval_strategy="steps", eval_steps=8,
                     max_steps=8, save_steps=4)  # fmt: skip
    return _train_once(ray_cluster, raw)


def with_venv_path(env) -> dict[str, str]:
    """Job entrypoints (`loom ...`) run in the cluster's environment: put this venv's bin first on its PATH."""
    return {**env, "PATH": f"{VENV_BIN}:{env.get('PATH', '')}"}


class RayCluster:
    def __init__(self, gcs_address: str, dashboard_url: str):
        self.gcs_address = gcs_address
        self.dashboard_url = dashboard_url

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (`loom train`, `ray job submit`) that must use this cluster."""
        return with_venv_path({**os.environ, "RAY_ADDRESS": self.gcs_address})


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> RayCluster:
    """A head node with 4 logical CPUs (2 training workers plus room for Ray Data) and a dashboard for jobs."""
    import ray

    port, dashboard_port = free_port(), free_port()
    ray_bin = str(VENV_BIN / "ray")
    subprocess.run(
        [ray_bin, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard_port}", "--num-cpus=4",
         "--include-dashboard=true", "--disable-usage-stats"],
        check=True, capture_output=True, text=True, timeout=180, env=with_venv_path(os.environ),
    )  # fmt: skip
    gcs = f"127.0.0.1:{port}"
    try:
        from orchestrator.launch import connect

        connect(gcs)
        yield RayCluster(gcs, f"http://127.0.0.1:{dashboard_port}")
    finally:
        ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
        time.sleep(1)
