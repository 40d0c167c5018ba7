"""Benchmark evaluation options (MMLU, C-Eval, CMMLU)."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import param


class EvaluationArgs(BaseModel):
    task: str | None = param(None, "Benchmark to run: mmlu_test, ceval_validation or cmmlu_test.")
    task_dir: str = param(
        "evaluation", "Directory holding the benchmarks in LLaMA-Factory's evaluation/ layout, or a Hub dataset repo."
    )
    batch_size: int = param(4, "Evaluation batch size per device.", ge=1)
    lang: Literal["en", "zh"] = param("en", "Language of the evaluation prompts: en or zh.")
    n_shot: int = param(5, "Number of few-shot examples per question.", ge=0)
    save_dir: str | None = param(
        None, "Directory for the evaluation results (results.json, results.log, scores.json); must not exist."
    )
    download_mode: Literal["reuse_dataset_if_exists", "reuse_cache_if_exists", "force_redownload"] = param(
        "reuse_dataset_if_exists",
        "When task_dir is a Hub dataset repo: reuse a fetched copy, or fetch again (force_redownload).",
    )
