"""Readers for what each tracker writes in its offline or local mode, so tests check the files themselves."""

from __future__ import annotations

import glob
import json
import os
import sqlite3
from collections import defaultdict

_WANDB_HEADER = 7  # ":W&B", a 2-byte magic, a 1-byte version
_WANDB_BLOCK = 32768  # records are chunked into 32 KiB blocks, each chunk with a 7-byte header (LevelDB's log)


def wandb_records(path: str) -> list:
    """The protobuf records of an offline run's `run-<id>.wandb` file (wandb 0.31 ships no reader for it)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == b":W&B", path
    records, pos, payload = [], _WANDB_HEADER, b""
    while pos + 7 <= len(data):
        if _WANDB_BLOCK - pos % _WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _WANDB_BLOCK - pos % _WANDB_BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
        elif kind == 0:
            break
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_runs(output_dir: str) -> list[dict]:
    """Each offline run folder under output_dir/wandb: its id, config and history rows, in the order written."""
    runs = []
    for path in sorted(glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        run = {"id": os.path.basename(path)[4:-6], "config": {}, "history": []}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind in ("run", "config"):
                updates = record.run.config.update if kind == "run" else record.config.update
                run["config"].update({_key(item): json.loads(item.value_json) for item in updates})
            elif kind == "history":
                run["history"].append({_key(item): json.loads(item.value_json) for item in record.history.item})
        runs.append(run)
    return runs


def tensorboard_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (a resumed run's purged steps are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_runs(store: str) -> list[dict]:
    """Every run in a file store: id, parameters, and metric -> [(step, value)] sorted by step."""
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri="file:" + store)
    runs = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            metrics = {name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
                       for name in run.data.metrics}  # fmt: skip
            runs.append({"id": run.info.run_id, "params": run.data.params, "metrics": metrics,
                         "status": run.info.status})  # fmt: skip
    return runs


def swanlab_experiments(logdir: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """experiment name -> tag -> [(step, value)] of a local-mode swanlog folder: runs.swanlab (SQLite) names each
    experiment's run folder and each tag's log folder."""
    db = sqlite3.connect(os.path.join(logdir, "runs.swanlab"))
    out: dict[str, dict] = defaultdict(dict)
    rows = db.execute(
        "select e.name, e.run_id, t.name, t.folder from tag t join experiment e on t.experiment_id = e.id"
    )
    for experiment, run_folder, tag, folder in rows:
        points = []
        for log in sorted(glob.glob(os.path.join(logdir, run_folder, "logs", folder, "*.log"))):
            with open(log) as handle:
                points += [(r["index"], r["data"]) for r in map(json.loads, handle)]
        out[experiment][tag] = points
    db.close()
    return dict(out)
