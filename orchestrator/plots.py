"""`plot_loss` and `loom plot`: PNG curves drawn from a run's trainer_log.jsonl.

One file per metric, named as LLaMA-Factory names them (`training_loss.png`, `training_eval_loss.png`,
`training_rewards_accuracies.png`, ...): the training loss with its smoothed curve, the eval loss, and each metric the
stage registry says its stage logs (orchestrator/stages.py), where the log has it. Rank 0 draws them into output_dir
when a run with `plot_loss` ends; `loom plot` draws them at any time, also while the run goes on. Pure file work:
no Ray, no torch.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from orchestrator.stages import STAGES

LOG_NAME = "trainer_log.jsonl"


def smoothed(values: list[float]) -> list[float]:
    """An exponential moving average whose weight grows with the number of points (a sigmoid of it, as
    LLaMA-Factory's curve uses): a short log is barely smoothed, a long one strongly."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        out.append(last)
    return out


def read_log(folder: str) -> list[dict[str, Any]]:
    """The records of `folder`/trainer_log.jsonl (a line being written is skipped)."""
    records = []
    with open(os.path.join(folder, LOG_NAME), encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plotted_keys(stage: str | None, records: list[dict[str, Any]]) -> list[str]:
    """loss, eval_loss, then the stage's own metrics (every stage's when the stage is unknown), where logged."""
    extra = STAGES[stage].metrics if stage in STAGES else [m for spec in STAGES.values() for m in spec.metrics]
    wanted = ["loss", "eval_loss", *dict.fromkeys(extra)]
    return [key for key in wanted if any(isinstance(r.get(key), (int, float)) for r in records)]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [s for s, _ in points], [v for _, v in points]


def figures(records: list[dict[str, Any]], stage: str | None, title: str) -> dict[str, Any]:
    """file name -> matplotlib Figure, one per plotted metric."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a worker or a server
    from matplotlib.figure import Figure

    out = {}
    for key in plotted_keys(stage, records):
        steps, values = series(records, key)
        figure = Figure(figsize=(6.4, 4.0), dpi=100)
        axes = figure.add_subplot()
        axes.plot(steps, values, color="#1f77b4", alpha=0.4 if key == "loss" else 1.0, label="original")
        if key == "loss":
            axes.plot(steps, smoothed(values), color="#1f77b4", label="smoothed")
            axes.legend()
        axes.set_title(f"{key} of {title}")
        axes.set_xlabel("step")
        axes.set_ylabel(key)
        out[f"training_{key.replace('/', '_')}.png"] = figure
    return out


def plot_log(folder: str, stage: str | None = None, out_dir: str | None = None) -> list[str]:
    """Draw the PNGs of `folder`'s log into `out_dir` (default: the same folder); returns their paths."""
    records = read_log(folder)
    stage = stage or _stage_of(folder)
    out_dir = out_dir or folder
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, figure in figures(records, stage, os.path.basename(os.path.abspath(folder))).items():
        path = os.path.join(out_dir, name)
        figure.savefig(path + ".tmp.png", format="png")
        os.replace(path + ".tmp.png", path)  # a plot is replaced whole, never seen half-drawn
        paths.append(path)
    return paths


def _stage_of(folder: str) -> str | None:
    """The stage the run marker records (loom_run.json), if any."""
    try:
        with open(os.path.join(folder, "loom_run.json"), encoding="utf-8") as handle:
            return json.load(handle).get("stage")
    except (OSError, ValueError):
        return None
