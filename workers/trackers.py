"""Rank 0's experiment trackers: one small adapter per entry of orchestrator/trackers.py's registry.

Each adapter opens (or, given the id a checkpoint saved, reopens) its run, takes every logged trainer_log line as
`train/*` and `eval/*` numbers, and closes. The driver has already refused a tracker that cannot start; what still
fails here (a network drop mid-run) is a warning and that tracker stops, never the training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator.console import libraries_verbose
from orchestrator.trackers import TRACKERS, flat_params, tracker_metrics


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """SwanLab prints its banner and summary to stdout and has no switch for it: kept off the console unless the
    verbosity asks for the libraries' lines (wandb has one, WANDB_SILENT, set in orchestrator/console.py)."""
    if libraries_verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@dataclass(frozen=True)
class TrackerRun:
    """What every adapter is given: where its files go, what the run is called, what was configured."""

    output_dir: str
    logging_dir: str  # tensorboard's folder
    run_name: str
    config: dict[str, Any]  # the resolved config, secrets left out
    start_step: int  # the step a resumed run continues after (0: a new run)
    run_id: str | None  # the id a checkpoint saved for this tracker (None: a new tracker run)


class WandbAdapter:
    def __init__(self, run: TrackerRun, cfg: Any):
        import wandb

        os.makedirs(run.output_dir, exist_ok=True)
        self.run_id = run.run_id or uuid.uuid4().hex[:12]
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "loom"), name=run.run_name,
                               dir=run.output_dir, id=self.run_id, resume="allow", config=run.config)  # fmt: skip
        # A resumed run logs steps again from its checkpoint on: a step metric of our own keeps them in place.
        self._run.define_metric("train/global_step")
        self._run.define_metric("*", step_metric="train/global_step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics)

    def close(self) -> None:
        self._run.finish()


class TensorBoardAdapter:
    run_id = None  # the folder is the run: a resumed run writes on into it, from its step on

    def __init__(self, run: TrackerRun, cfg: Any):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(run.logging_dir, purge_step=run.start_step + 1 if run.start_step else None)
        self._writer.add_text("config", "```json\n" + json.dumps(run.config, indent=1, default=str) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MlflowAdapter:
    def __init__(self, run: TrackerRun, cfg: Any):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny tracks to a file store only
        import mlflow
        from mlflow.entities import Metric, Param

        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.join(run.output_dir, "mlruns")
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "loom")
        experiment = self._client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
        self.run_id = run.run_id
        if self.run_id is None:
            self.run_id = self._client.create_run(experiment_id, run_name=run.run_name).info.run_id
            params = [Param(k, v) for k, v in flat_params(run.config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self._client.log_batch(self.run_id, params=params[start : start + 100])
        else:
            self._client.update_run(self.run_id, status="RUNNING")

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


class SwanlabAdapter:
    def __init__(self, run: TrackerRun, cfg: Any):
        import swanlab

        if cfg.swanlab_api_key:
            os.environ["SWANLAB_API_KEY"] = cfg.swanlab_api_key
        mode = os.environ.get("SWANLAB_MODE") or {"cloud": "online"}.get(cfg.swanlab_mode, cfg.swanlab_mode)
        self.run_id = run.run_id or uuid.uuid4().hex[:12]
        # Local mode keeps a resumed run as a second experiment with the same id (swanlab 0.10); cloud resumes it.
        with _quiet():
            self._run = swanlab.init(project=cfg.swanlab_project, workspace=cfg.swanlab_workspace,
                                     name=cfg.swanlab_run_name or run.run_name, mode=mode,
                                     log_dir=os.path.join(run.output_dir, "swanlog"), id=self.run_id,
                                     resume="allow", config=run.config)  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        with _quiet():
            self._run.finish()


ADAPTERS: dict[str, Callable[[TrackerRun, Any], Any]] = {
    "wandb": WandbAdapter,
    "tensorboard": TensorBoardAdapter,
    "mlflow": MlflowAdapter,
    "swanlab": SwanlabAdapter,
}
assert ADAPTERS.keys() == TRACKERS.keys(), "every registered tracker has an adapter"


class Trackers:
    """The run's open trackers (rank 0 only). A tracker that fails is closed and named once; training goes on."""

    def __init__(self, names: tuple[str, ...], run: TrackerRun, cfg: Any, saved_ids: dict[str, str],
                 warn: Callable[[str], None]):  # fmt: skip
        self._warn, self._open = warn, {}
        for name in names:
            try:
                self._open[name] = ADAPTERS[name](dataclasses.replace(run, run_id=saved_ids.get(name)), cfg)
            except Exception as error:  # noqa: BLE001 - the driver checked what it could; the run goes on
                warn(f"tracker {name} did not start ({type(error).__name__}: {error}); training goes on without it")

    def log(self, record: dict[str, Any]) -> None:
        metrics, step = tracker_metrics(record), int(record["step"])
        for name, adapter in list(self._open.items()):
            self._call(name, adapter.log, metrics, step)

    def ids(self) -> dict[str, str]:
        """The tracker run ids a checkpoint keeps, so a restart reopens the same runs."""
        return {name: adapter.run_id for name, adapter in self._open.items() if adapter.run_id}

    def close(self) -> None:
        for name, adapter in list(self._open.items()):
            self._call(name, adapter.close)
        self._open.clear()

    def _call(self, name: str, method: Callable[..., None], *args: Any) -> None:
        try:
            method(*args)
        except Exception as error:  # noqa: BLE001 - a tracker's failure never stops the training
            self._warn(f"tracker {name} failed ({type(error).__name__}: {error}); it logs nothing more")
            self._open.pop(name, None)
