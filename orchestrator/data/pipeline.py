"""Ray Data pipelines: read -> convert -> tokenize in Ray tasks; the driver only holds references."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.expressions import col

from .formats import convert
from .processors import ProcessorOptions, pretrain_batch, supervised_batch
from .readers import read_dataset
from .registry import DatasetSpec
from .templates import get_template
from .tokenizer import TokenizerSpec, load_tokenizer

logger = logging.getLogger("loom.data")

TOKENIZED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("order", pa.int64()),
    ]
)


def shuffle_key(seed: int, input_ids: list[int], labels: list[int]) -> int:
    """A seeded hash of an example's content. Sorting by it is a shuffle that does not depend on how Ray scheduled
    the blocks, so a resumed run rebuilds exactly the same train/validation split and order."""
    digest = hashlib.blake2b(digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    digest.update(np.asarray(input_ids, dtype=np.int32).tobytes())
    digest.update(np.asarray(labels, dtype=np.int32).tobytes())
    return int.from_bytes(digest.digest(), "little", signed=True)


@dataclass
class PreparedData:
    train: Any  # ray.data.Dataset, materialized
    eval: Any | None
    summary: dict


def tokenize_batch(
    batch: pa.Table,
    *,
    spec: DatasetSpec,
    stage: str,
    tokenizer_spec: dict,
    opts: dict,
    default_system: str | None,
    seed: int,
) -> pa.Table:
    """One Ray Data batch: raw rows -> canonical examples -> token ids. Runs in a Ray task."""
    tokenizer = load_tokenizer(TokenizerSpec(**tokenizer_spec))
    options = ProcessorOptions(**opts)
    examples = [convert(row, spec, stage) for row in batch.to_pylist()]
    if stage == "pt":
        result = pretrain_batch(tokenizer, examples, options)
    else:
        template = get_template(tokenizer_spec["template"])
        if default_system:
            template = replace(template, default_system=default_system)
        result = supervised_batch(tokenizer, template, examples, options)
    if result["dropped"]:
        logger.warning("dataset %s: dropped %s", spec.name, result["dropped"])
    columns = result["columns"]
    columns["length"] = [len(ids) for ids in columns["input_ids"]]
    columns["order"] = [
        shuffle_key(seed, ids, labs) for ids, labs in zip(columns["input_ids"], columns["labels"], strict=True)
    ]
    return pa.table(columns, schema=TOKENIZED_SCHEMA)


def build_datasets(cfg: Any, specs: list[DatasetSpec]) -> PreparedData:
    """Tokenized train (and validation) datasets, materialized in the object store, not on the driver."""
    opts = ProcessorOptions(
        cutoff_len=cfg.cutoff_len,
        train_on_prompt=cfg.train_on_prompt,
        mask_history=cfg.mask_history,
        packing=cfg.uses_packing(),
    )
    tokenizer_spec = TokenizerSpec.from_config(cfg).to_dict()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # file order when not shuffling
    parts = []
    for spec in specs:
        ds = read_dataset(spec)
        if cfg.max_samples:
            ds = ds.limit(cfg.max_samples)
        ds = ds.map_batches(
            tokenize_batch,
            fn_kwargs={
                "spec": spec,
                "stage": cfg.stage,
                "tokenizer_spec": tokenizer_spec,
                "opts": asdict(opts),
                "default_system": cfg.default_system,
                "seed": cfg.shuffle_seed(),
            },
            batch_size=cfg.preprocessing_batch_size,
            batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=cfg.preprocessing_num_workers)
            if cfg.preprocessing_num_workers
            else None,
        )
        parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.filter(expr=col("length") > 0)
    if not cfg.disable_shuffling:
        ds = ds.sort("order")
    ds = ds.materialize()
    train, evaluation = ds, None
    if cfg.val_size > 0:
        test_size = int(cfg.val_size) if cfg.val_size >= 1 else cfg.val_size
        train, evaluation = ds.train_test_split(test_size=test_size, shuffle=False)
        train, evaluation = train.materialize(), evaluation.materialize()
    return PreparedData(train, evaluation, summarize(train, evaluation))


def summarize(train: ray.data.Dataset, evaluation: ray.data.Dataset | None) -> dict:
    summary = {"train_examples": train.count(), "train_tokens": int(train.sum("length") or 0)}
    if evaluation is not None:
        summary["eval_examples"] = evaluation.count()
    return summary
