"""Small local datasets, prepared in the driver's process with the functions Ray Data's tasks run.

Why: for LLaMA-Factory's 1000-row demo set on 2 cores, Ray Data took 9-13 s (five executions: the column check,
read + tokenize, filter + sort, the statistics, the token sum, each starting tasks that import the tokenizer) to do
0.3 s of tokenizing (bench/suite.py, 2026-12-07). Below DRIVER_BYTES of input files (LOOM_DATA_ON_DRIVER_BYTES)
the driver reads the files (the same readers), tokenizes batch by batch (the same `tokenize_batch`, the same batches: each file part's rows
in slices of preprocessing_batch_size), orders rows by the same content key and splits off the validation rows at
the same index as Ray Data's `train_test_split`; the tables then go to the object store (`ray.data.from_arrow`),
and workers read them as they read a materialized Ray Data set. tests/ray/test_data.py checks both paths give the
same rows in the same order. The choice depends on the config and the file sizes only, so a resumed run takes
the same path.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .pipeline import STATS_LENGTH, PreparedData, StatsTotals, TokenizeJob, _counts, tokenize_batch
from .readers import CHUNK_ROWS, FILE_READERS, DatasetReadError, _row_keys, file_parts
from .registry import READ_ERROR, ROW_COLUMN, DatasetSpec
from .tokenizer import data_snapshot

# About 16k alpaca rows: a few seconds of tokenizing on one core, about Ray Data's own start-up on 2 cores.
DRIVER_BYTES = 8 * 2**20
DRIVER_BYTES_ENV = "LOOM_DATA_ON_DRIVER_BYTES"  # another limit; 0 sends every dataset through Ray Data


def driver_bytes() -> int:
    return int(os.environ.get(DRIVER_BYTES_ENV, DRIVER_BYTES))


def readable_here(specs: list[DatasetSpec]) -> bool:
    """Local files of driver_bytes() at most in all: small enough to read in the driver's process."""
    if any(spec.hub for spec in specs):
        return False
    return sum(os.path.getsize(path) for spec in specs for path in spec.files) <= driver_bytes()


def on_driver(cfg: Any, specs: list[DatasetSpec], eval_specs: list[DatasetSpec]) -> bool:
    """Whether this run's data is prepared on the driver: local files, DRIVER_BYTES at most in all, no streaming,
    no num_samples (its seeded picking runs in Ray), and datasets concatenated rather than interleaved."""
    every = specs + eval_specs
    if cfg.streaming or any(spec.hub or spec.num_samples for spec in every):
        return False
    interleaved = cfg.mix_strategy != "concat" or bool(cfg.interleave_probs)
    if interleaved and (len(specs) > 1 or (len(eval_specs) > 1 and not cfg.eval_on_each_dataset)):
        return False
    return readable_here(every)


def read_parts(spec: DatasetSpec) -> list[pa.Table]:
    """The dataset's raw rows, one table per file part that has any (the parts Ray's reading tasks would read; a
    JSON array is read whole by its first part, the others yield nothing)."""
    parts = [list(FILE_READERS[spec.file_type](part["path"], part["start"], part["end"])) for part in file_parts(spec)]
    return [pa.concat_tables(tables) for tables in parts if tables]


def local_column_names(spec: DatasetSpec) -> list[str]:
    """readers.column_names, read here: the schema's columns, or for JSON the keys found in any row."""
    try:
        tables = [table for table in read_parts(spec) if table.num_columns]
    except (OSError, ValueError, pa.ArrowException) as error:  # what a reading task would fail with
        raise DatasetReadError(str(error)) from None
    if spec.file_type != "json":
        return list(tables[0].schema.names) if tables else []
    found: set[str] = set()
    for table in tables:
        found.update(_row_keys(table.select([ROW_COLUMN])).column("key").to_pylist())
    errors = sorted(key.removeprefix(READ_ERROR) for key in found if key.startswith(READ_ERROR))
    if errors:
        raise DatasetReadError(errors[0])
    return sorted(found)


def batch_dependent(job: TokenizeJob) -> bool:
    """Whether a row's tokens depend on the other rows of its batch: packing fills blocks within a batch, KTO
    pairs each example with another one's completion."""
    return job.options.packing or job.processor == "feedback"


def tokenize_local(spec: DatasetSpec, job: TokenizeJob, cfg: Any) -> pa.Table | None:
    """What `pipeline.tokenize_dataset(...).materialize()` holds: token rows plus one bookkeeping row per batch.
    None where Ray Data's batches could differ from these (a batch-dependent processor over a dataset read as
    more than one block: how Ray bundles blocks into batches is its own), so the caller uses Ray Data."""
    parts = read_parts(spec)
    if batch_dependent(job) and (len(parts) > 1 or any(part.num_rows > CHUNK_ROWS for part in parts)):
        return None
    remaining, fast = cfg.max_samples, data_snapshot(job.tokenizer)
    tables = []
    for part in parts:
        if remaining is not None:
            part, remaining = part.slice(0, remaining), max(remaining - part.num_rows, 0)
        for start in range(0, part.num_rows, cfg.preprocessing_batch_size):
            batch = part.slice(start, cfg.preprocessing_batch_size)
            tables.append(tokenize_batch(batch, spec=spec, job=job, fast=fast))
    return pa.concat_tables(tables) if tables else job.schema().empty_table()


def validation_index(rows: int, val_size: float) -> int:
    """Where Ray Data's train_test_split(test_size=val_size, shuffle=False) cuts: a fraction keeps int(rows x (1 -
    val_size)) rows for training, a count keeps rows - val_size."""
    index = int(rows * (1 - val_size)) if val_size < 1 else rows - int(val_size)
    if index <= 0 or index >= rows:
        raise ValueError(f"val_size {val_size} leaves no training or no validation rows out of {rows}")
    return index


def prepare_on_driver(cfg: Any, specs: list[DatasetSpec], eval_specs: list[DatasetSpec]) -> PreparedData | None:
    """pipeline.build_datasets for data that passed `on_driver`: the same tables, built in this process (None:
    see tokenize_local)."""
    import ray

    job = TokenizeJob.from_config(cfg)
    tokenized = [tokenize_local(spec, job, cfg) for spec in specs]
    eval_tokenized = [tokenize_local(spec, job, cfg) for spec in eval_specs]
    if any(table is None for table in tokenized + eval_tokenized):
        return None
    totals = StatsTotals()
    for table in tokenized + eval_tokenized:
        for text in table.filter(pc.equal(table["length"], STATS_LENGTH))["stats"].to_pylist():
            totals.add(text)

    def examples(tables: list[pa.Table]) -> pa.Table:
        joined = pa.concat_tables(tables)
        return joined.filter(pc.greater(joined["length"], 0)).drop_columns(["stats"])

    train = examples(tokenized)
    if not cfg.disable_shuffling:
        train = train.sort_by("order")
    if cfg.eval_on_each_dataset and eval_specs:
        evals = {f"eval_{spec.name}": examples([table]) for spec, table in zip(eval_specs, eval_tokenized, strict=True)}
    else:
        evals = {"eval": examples(eval_tokenized)} if eval_tokenized else {}
    if not evals and cfg.val_size > 0:
        index = validation_index(train.num_rows, cfg.val_size)
        train, evals["eval"] = train.slice(0, index), train.slice(index)
    summary = _counts(train.num_rows, int(pc.sum(train["length"]).as_py() or 0), totals.result(), job)
    summary.update({f"{name}_examples": table.num_rows for name, table in evals.items()})
    return PreparedData(ray.data.from_arrow(train), {n: ray.data.from_arrow(t) for n, t in evals.items()}, summary)
