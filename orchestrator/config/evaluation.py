"""Benchmark evaluation options (MMLU, C-Eval, CMMLU)."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import not_yet

REASON = "benchmark evaluation (mmlu/ceval/cmmlu) is not built yet"


class EvaluationArgs(BaseModel):
    task: str | None = not_yet(None, "Benchmark to run: mmlu_test, ceval_validation or cmmlu_test.", REASON)
    task_dir: str = not_yet("evaluation", "Directory holding the benchmark datasets.", REASON)
    batch_size: int = not_yet(4, "Evaluation batch size per device.", REASON, ge=1)
    lang: Literal["en", "zh"] = not_yet("en", "Language of the evaluation prompts: en or zh.", REASON)
    n_shot: int = not_yet(5, "Number of few-shot examples per question.", REASON, ge=0)
    save_dir: str | None = not_yet(None, "Directory for evaluation results; must not exist yet.", REASON)
    download_mode: Literal["reuse_dataset_if_exists", "reuse_cache_if_exists", "force_redownload"] = not_yet(
        "reuse_dataset_if_exists", "How benchmark datasets are fetched: reuse what exists or download again.", REASON
    )
