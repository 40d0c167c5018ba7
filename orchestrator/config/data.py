"""Datasets, templates and preprocessing."""

from typing import Literal

from pydantic import BaseModel

from .fields import not_yet, param

_DATA_LAYER = "arrives with the full data layer (issue 3)"


class DataArgs(BaseModel):
    template: str | None = param(
        None, "Prompt template for training and generation (default, empty, ...); unset: empty."
    )
    dataset: str | None = param(None, "Comma-separated dataset names (from dataset_info.json) or file names.")
    eval_dataset: str | None = param(None, "Comma-separated evaluation dataset names (instead of val_size).")
    eval_on_each_dataset: bool | None = param(False, "Report evaluation loss per evaluation dataset.")
    dataset_dir: str = param("data", "Folder holding dataset_info.json and the dataset files.")
    media_dir: str | None = not_yet(None, "Folder of images, videos and audio; defaults to dataset_dir.", _DATA_LAYER)
    data_shared_file_system: bool | None = param(
        False,
        "Whether every node sees the dataset files and tokenized_path; if not, Loom reads and writes them on the "
        "driver's node only.",
    )
    cutoff_len: int = param(2048, "Maximum tokens per example; longer ones are truncated.", ge=1)
    train_on_prompt: bool = param(False, "Compute the loss on prompt tokens too.")
    mask_history: bool = param(False, "Train only on the last turn of multi-turn examples.")
    streaming: bool = param(
        False, "Stream the dataset to the workers as it is tokenized, never materialized (needs max_steps)."
    )
    buffer_size: int = param(16384, "Rows in each worker's shuffle buffer in streaming mode.", ge=1)
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = param(
        "concat",
        "How several datasets mix: one after another, or interleaved until the first (under) or the last "
        "(over) runs out.",
    )
    interleave_probs: str | None = param(None, "Comma-separated sampling probabilities for interleaving.")
    overwrite_cache: bool = param(False, "Rebuild the tokenized-dataset cache at tokenized_path.")
    preprocessing_batch_size: int = param(1000, "Rows per Ray Data batch while tokenizing.", ge=1)
    preprocessing_num_workers: int | None = param(
        None, "Ray Data tasks tokenizing at once (default: as many as the cluster allows).", ge=1
    )
    max_samples: int | None = param(None, "Keep at most this many rows of each dataset.", ge=1)
    eval_num_beams: int | None = param(
        None, "num_beams when generating predictions (loom predict, do_predict); unset: num_beams.", ge=1
    )
    ignore_pad_token_for_loss: bool = param(True, "Leave padding tokens out of the loss.")
    val_size: float = param(0.0, "Held-out validation split: a fraction in [0, 1) or a row count >= 1.", ge=0.0)
    packing: bool | None = param(None, "Pack sequences into cutoff_len blocks; on by default for pt.")
    neat_packing: bool = param(False, "Packing without attention across packed sequences.")
    tool_format: str | None = param(None, "Format of tool-call examples (default: the template's own).")
    tokenized_path: str | None = param(
        None, "Where the tokenized dataset is saved (Parquet, a path or pyarrow URI) and reused by later runs."
    )
