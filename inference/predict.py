"""`loom predict` (and `do_predict` after training): batched generation over the evaluation set on the cluster.

The prompts are prepared by the data layer (the unsupervised processor: every message but the last as the prompt,
the last answer as the label), then a Ray Data `map_batches` over a pool of model actors — `ray_num_workers` of
them, each with `resources_per_worker` — generates `per_device_eval_batch_size` prompts at a time, with
`eval_num_beams` when set. The driver writes `generated_predictions.jsonl` (prompt, predict, label per row, in the
dataset's order) and `predict_results.json` (BLEU-4, ROUGE-1/2/L as LLaMA-Factory computes them, runtime, rows/s)
into output_dir, each whole or not at all.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from orchestrator.console import quiet_process
from orchestrator.errors import ConfigError, Problem
from orchestrator.values import split_csv

from .actors import on_model_actors
from .backends import load_engine
from .engine import Sampling
from .metrics import similarity
from .source import ModelSource

PREDICTIONS = "generated_predictions.jsonl"
RESULTS = "predict_results.json"


def predict_problems(cfg: Any) -> list[Problem]:
    if cfg.stage != "sft":
        return [Problem("stage", f"given {cfg.stage!r}; prediction generates answers for sft data (stage: sft)")]
    if not (cfg.eval_dataset or cfg.dataset):
        return [Problem("eval_dataset", "is required: the prompts to answer (dataset is used when it is unset)")]
    return []


class Predictor:
    """One model actor: loads the engine once, then answers batches of prompt ids."""

    def __init__(self, cfg: Any, source: ModelSource):
        quiet_process()
        self.engine = load_engine(cfg, source)
        self.sampling = Sampling.from_config(cfg).updated(num_beams=cfg.eval_num_beams)

    def __call__(self, batch: Any) -> dict[str, list]:
        prompts = [list(ids) for ids in batch.column("input_ids").to_pylist()]
        labels = batch.column("labels").to_pylist()
        replies = self.engine.generate(prompts, self.sampling)
        decode = self.engine.tokenizer.decode
        return {
            "prompt": [decode(ids, skip_special_tokens=False) for ids in prompts],
            "predict": [reply.text for reply in replies],
            "label": [decode(ids, skip_special_tokens=True) for ids in labels],
        }


def prompts_dataset(cfg: Any, source_name: str) -> Any:
    """The evaluation set (eval_dataset, else dataset) tokenized as prompts and reference answers, in file order."""
    from dataclasses import replace

    from orchestrator.data.pipeline import TokenizeJob, examples_only, tokenize_dataset
    from orchestrator.data.registry import resolve_datasets
    from orchestrator.stages import processor_name

    names = split_csv(cfg.eval_dataset) or cfg.dataset_names()
    key = "eval_dataset" if cfg.eval_dataset else "dataset"
    specs, problems = resolve_datasets(names, cfg.dataset_dir, key=key, stage=cfg.stage, seed=cfg.seed)
    if problems:
        raise ConfigError(problems, source=source_name)
    job = replace(TokenizeJob.from_config(cfg), processor=processor_name(cfg.stage, predict=True))
    parts = [examples_only(tokenize_dataset(spec, job, cfg)) for spec in specs]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def predict(cfg: Any, source: ModelSource, source_name: str = "config") -> dict[str, Any]:
    """Generate over the evaluation set on the connected cluster; write both files into output_dir."""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # rows come back in file order
    started = time.perf_counter()
    rows = on_model_actors(prompts_dataset(cfg, source_name), Predictor, cfg, source, cfg.per_device_eval_batch_size,
                           batch_format="pyarrow").take_all()  # fmt: skip
    runtime = time.perf_counter() - started
    results = {
        **similarity([r["predict"] for r in rows], [r["label"] for r in rows]),
        "predict_runtime": round(runtime, 4),
        "predict_samples": len(rows),
        "predict_samples_per_second": round(len(rows) / runtime, 3) if runtime else 0.0,
        "predict_workers": cfg.ray_num_workers,
    }
    os.makedirs(cfg.output_dir, exist_ok=True)
    lines = "".join(json.dumps({k: r[k] for k in ("prompt", "predict", "label")}, ensure_ascii=False) + "\n"
                    for r in rows)  # fmt: skip
    _write_whole(os.path.join(cfg.output_dir, PREDICTIONS), lines)
    _write_whole(os.path.join(cfg.output_dir, RESULTS), json.dumps(results, indent=2) + "\n")
    return results


def _write_whole(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
