"""Ray Data pipelines: read -> convert -> tokenize -> mix -> shuffle -> split, in Ray tasks.

The driver only holds references. (Small local datasets are prepared in the driver's process by the same functions:
orchestrator/data/local.py; orchestrator/data/prepare.py chooses.) Each tokenizing task also emits one bookkeeping
row (length -1) with its counts (rows read, dropped by reason, truncated); the summary adds those up, so the numbers
are exact even when Ray retries a task, and cost nothing extra to collect.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col

from ..stages import processor_name
from .formats import convert
from .mixing import mixed_positions
from .processors import PROCESSORS, ProcessorOptions, id_columns
from .readers import read_dataset
from .registry import DatasetSpec
from .templates import resolve_template
from .tokenizer import FastSnapshot, TokenizerSpec, data_snapshot, data_tokenizer

logger = logging.getLogger("loom.data")

STATS_LENGTH = -1  # the `length` of a bookkeeping row


def shuffle_key(seed: int, *sequences: list[int]) -> int:
    """A seeded hash of an example's content. Sorting by it is a shuffle that does not depend on how Ray scheduled
    the blocks, so a resumed run rebuilds exactly the same train/validation split and order."""
    digest = hashlib.blake2b(digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    for sequence in sequences:
        digest.update(np.asarray(sequence, dtype=np.int32).tobytes())
        digest.update(b"|")
    return int.from_bytes(digest.digest(), "little", signed=True)


@dataclass(frozen=True)
class TokenizeJob:
    """Everything a tokenizing task needs; plain values, shipped to every task."""

    stage: str
    processor: str
    options: ProcessorOptions
    tokenizer: TokenizerSpec
    tool_format: str | None
    default_system: str | None
    seed: int
    enable_thinking: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> TokenizeJob:
        packing = cfg.uses_packing()
        options = ProcessorOptions(
            cutoff_len=cfg.cutoff_len,
            train_on_prompt=cfg.train_on_prompt,
            mask_history=cfg.mask_history,
            packing=packing,
            neat_packing=cfg.neat_packing,
        )
        return cls(
            stage=cfg.stage,
            processor=processor_name(cfg.stage),
            options=options,
            tokenizer=TokenizerSpec.from_config(cfg),
            tool_format=cfg.tool_format,
            default_system=cfg.default_system,
            seed=cfg.shuffle_seed(),
            enable_thinking=cfg.enable_thinking,
        )

    @property
    def columns(self) -> tuple[str, ...]:
        return id_columns(self.processor, self.options.packing)

    def schema(self) -> pa.Schema:
        fields = [(name, pa.list_(pa.int32())) for name in self.columns]
        if self.processor == "feedback":
            fields.append(("kto_tags", pa.bool_()))
        return pa.schema([*fields, ("length", pa.int32()), ("order", pa.int64()), ("stats", pa.string())])


def tokenize_batch(batch: pa.Table, *, spec: DatasetSpec, job: TokenizeJob, fast: FastSnapshot | None = None
                   ) -> pa.Table:  # fmt: skip
    """One Ray Data batch: raw rows -> canonical examples -> token ids, plus one bookkeeping row. `fast` is the
    driver's snapshot of the tokenizer (tokenizer.data_snapshot), so the task does not import transformers."""
    tokenizer = data_tokenizer(job.tokenizer, fast)
    template = resolve_template(job.tokenizer.template, tool_format=job.tool_format,
                                default_system=job.default_system, enable_thinking=job.enable_thinking)  # fmt: skip
    examples = [convert(row, spec, job.stage) for row in batch.to_pylist()]
    processed = PROCESSORS[job.processor](tokenizer, template, examples, job.options)
    columns = processed.columns
    id_names = [name for name in job.columns if name.endswith("input_ids")]
    rows = len(columns[job.columns[0]])
    columns["length"] = [sum(len(columns[name][i]) for name in id_names) for i in range(rows)]
    columns["order"] = [shuffle_key(job.seed, *(columns[name][i] for name in job.columns)) for i in range(rows)]
    columns["stats"] = [None] * rows
    stats = {"rows": len(examples), "dropped": dict(processed.dropped), "truncated": processed.truncated}
    bookkeeping = {name: [[]] for name in job.columns}
    bookkeeping.update(length=[STATS_LENGTH], order=[0], stats=[json.dumps({spec.name: stats})])
    if "kto_tags" in columns:
        bookkeeping["kto_tags"] = [False]
    table = pa.table(columns, schema=job.schema())
    return pa.concat_tables([table, pa.table(bookkeeping, schema=job.schema())])


def files_node_args(cfg: Any) -> dict:
    """Ray task options for touching the dataset files or a local tokenized_path: pinned to the driver's node when
    the cluster has several nodes and data_shared_file_system is false (the files are only known to be there)."""
    if cfg.data_shared_file_system or sum(1 for node in ray.nodes() if node.get("Alive")) < 2:
        return {}
    # Every Ray node carries its id as the label ray.io/node-id: a selector on it pins tasks there, hard.
    return {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


def tokenize_dataset(spec: DatasetSpec, job: TokenizeJob, cfg: Any) -> ray.data.Dataset:
    ds = read_dataset(spec, files_node_args(cfg))
    if cfg.max_samples:
        ds = ds.limit(cfg.max_samples)
    return ds.map_batches(
        tokenize_batch,
        fn_kwargs={"spec": spec, "job": job, "fast": data_snapshot(job.tokenizer)},
        batch_size=cfg.preprocessing_batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=cfg.preprocessing_num_workers)
        if cfg.preprocessing_num_workers
        else None,
    )  # one read task per file part (readers._FileParts), so a big file is tokenized in parallel


@dataclass
class PreparedData:
    train: Any  # ray.data.Dataset
    evals: dict[str, Any] = field(default_factory=dict)  # name -> ray.data.Dataset ("eval", or one per dataset)
    summary: dict = field(default_factory=dict)

    @property
    def eval(self) -> Any | None:
        return next(iter(self.evals.values()), None) if len(self.evals) == 1 else None


def examples_only(ds: ray.data.Dataset) -> ray.data.Dataset:
    return ds.filter(expr=col("length") > 0)


class StatsTotals:
    """Per dataset: rows read, dropped by reason, truncated, summed over bookkeeping rows."""

    def __init__(self) -> None:
        self.totals: dict[str, dict] = {}

    def add(self, text: str) -> None:
        for name, part in json.loads(text).items():
            entry = self.totals.setdefault(name, {"rows": 0, "dropped": Counter(), "truncated": 0})
            entry["rows"] += part["rows"]
            entry["truncated"] += part["truncated"]
            entry["dropped"].update(part["dropped"])

    def result(self) -> dict[str, dict]:
        return {name: {**entry, "dropped": dict(entry["dropped"])} for name, entry in self.totals.items()}


def collect_stats(tokenized: list[ray.data.Dataset]) -> dict[str, dict]:
    totals = StatsTotals()
    for ds in tokenized:
        for row in ds.filter(expr=col("length") == STATS_LENGTH).select_columns(["stats"]).iter_rows():
            totals.add(row["stats"])
    return totals.result()


def _repeat_key(seed: int, base: int, repetition: int) -> int:
    digest = hashlib.blake2b(digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    digest.update(base.to_bytes(8, "little", signed=True) + repetition.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little", signed=True)


def _with_order(batch: pa.Table, *, positions: np.ndarray | None, size: int, seed: int) -> pa.Table:
    """Set `order` of a mixed dataset: its interleave position, or (shuffled) a key that differs per repetition."""
    index = batch.column("row_index").to_numpy()
    if positions is not None:
        order = positions[index]
    else:
        repetition = index // size
        base = batch.column("order").to_numpy()
        order = [
            b if r == 0 else _repeat_key(seed, b, r) for b, r in zip(base.tolist(), repetition.tolist(), strict=True)
        ]
    return batch.drop_columns(["row_index"]).set_column(
        batch.schema.get_field_index("order"), "order", pa.array(order, type=pa.int64())
    )


def mix(parts: list[ray.data.Dataset], cfg: Any, job: TokenizeJob) -> ray.data.Dataset:
    """Several tokenized datasets as one, by mix_strategy (concat, interleave_under, interleave_over)."""
    if len(parts) == 1 or (cfg.mix_strategy == "concat" and not cfg.interleave_probs):
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    sizes = [part.count() for part in parts]
    probs = [float(p) for p in cfg.interleave_probs.split(",")] if cfg.interleave_probs else None
    plan = mixed_positions(sizes, probs, job.seed, cfg.mix_strategy)
    mixed = []
    for part, size, positions in zip(parts, sizes, plan, strict=True):
        wanted = len(positions)
        repeats = -(-wanted // size) if size else 0
        if not wanted:
            continue
        repeated = part.union(*([part] * (repeats - 1))) if repeats > 1 else part
        indexed = repeated.limit(wanted).zip(ray.data.range(wanted).rename_columns({"id": "row_index"}))
        mixed.append(
            indexed.map_batches(
                _with_order,
                fn_kwargs={"positions": positions if cfg.disable_shuffling else None, "size": size, "seed": job.seed},
                batch_format="pyarrow",
            )
        )
    ds = mixed[0].union(*mixed[1:]) if len(mixed) > 1 else mixed[0]
    return ds.sort("order") if cfg.disable_shuffling else ds


def split_validation(ds: ray.data.Dataset, val_size: float) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    test_size = int(val_size) if val_size >= 1 else val_size
    train, evaluation = ds.train_test_split(test_size=test_size, shuffle=False)
    return train.materialize(), evaluation.materialize()


def evaluation_sets(cfg: Any, eval_specs: list[DatasetSpec] | None, eval_tokenized: list[ray.data.Dataset],
                    job: TokenizeJob) -> dict[str, ray.data.Dataset]:  # fmt: skip
    """The eval_dataset sets: one per dataset (eval_on_each_dataset), or mixed into one "eval"; {} without any."""
    if not eval_tokenized:
        return {}
    if cfg.eval_on_each_dataset:
        return {f"eval_{spec.name}": examples_only(part).drop_columns(["stats"]).materialize()
                for spec, part in zip(eval_specs, eval_tokenized, strict=True)}  # fmt: skip
    return {"eval": mix([examples_only(p) for p in eval_tokenized], cfg, job).drop_columns(["stats"]).materialize()}


def build_datasets(cfg: Any, specs: list[DatasetSpec], eval_specs: list[DatasetSpec] | None = None) -> PreparedData:
    """Tokenized train (and evaluation) datasets, materialized in the object store, not on the driver."""
    job = TokenizeJob.from_config(cfg)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # file order when not shuffling
    eval_tokenized = [tokenize_dataset(spec, job, cfg).materialize() for spec in eval_specs or []]
    if cfg.streaming:
        return streamed_datasets(cfg, specs, eval_specs or [], eval_tokenized, job)
    tokenized = [tokenize_dataset(spec, job, cfg).materialize() for spec in specs]
    ds = mix([examples_only(part) for part in tokenized], cfg, job)
    if not cfg.disable_shuffling:
        ds = ds.sort("order")
    train, evals = ds.drop_columns(["stats"]).materialize(), evaluation_sets(cfg, eval_specs, eval_tokenized, job)
    if not evals and cfg.val_size > 0:
        train, evals["eval"] = split_validation(train, cfg.val_size)
    stats = collect_stats(tokenized + eval_tokenized)
    return PreparedData(train, evals, summarize(train, evals, stats, job))


def streamed_datasets(cfg: Any, specs: list[DatasetSpec], eval_specs: list[DatasetSpec],
                      eval_tokenized: list[ray.data.Dataset], job: TokenizeJob) -> PreparedData:  # fmt: skip
    """Training data as a lazy stream: read and tokenized while the workers consume it, never materialized.
    Workers shuffle it through a buffer of `buffer_size` rows; evaluation sets are small and materialized."""
    parts = [examples_only(tokenize_dataset(spec, job, cfg)) for spec in specs]
    train = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).drop_columns(["stats"])
    evals = evaluation_sets(cfg, eval_specs, eval_tokenized, job)
    summary = {"streaming": True, "train_examples": None, **{f"{n}_examples": d.count() for n, d in evals.items()}}
    return PreparedData(train, evals, summary)


def _summary_columns(batch: pa.Table) -> pa.Table:
    return batch.select(["length", "stats"])


def stream_summary(cfg: Any, specs: list[DatasetSpec]) -> dict:
    """`loom data` on a stream: run it to the end in Ray tasks; only lengths and the bookkeeping rows reach the
    driver, so its memory stays flat however large the dataset."""
    job = TokenizeJob.from_config(cfg)
    examples, tokens, totals = 0, 0, StatsTotals()
    for spec in specs:
        for batch in tokenize_dataset(spec, job, cfg).map_batches(_summary_columns, batch_format="pyarrow") \
                .iter_batches(batch_format="pyarrow", batch_size=None):  # fmt: skip
            lengths = batch.column("length").to_numpy()
            examples += int((lengths > 0).sum())
            tokens += int(lengths[lengths > 0].sum())
            for text in batch.column("stats").drop_null().to_pylist():
                totals.add(text)
    return {"streaming": True, **_counts(examples, tokens, totals.result(), job)}


def _counts(examples: int, tokens: int, stats: dict, job: TokenizeJob) -> dict:
    summary: dict[str, Any] = {
        "train_examples": examples,
        "train_tokens": tokens,
        "rows_read": sum(s["rows"] for s in stats.values()),
        "rows_dropped": sum(sum(s["dropped"].values()) for s in stats.values()),
        "truncated": sum(s["truncated"] for s in stats.values()),
        "datasets": stats,
    }
    if job.options.packing and examples:
        summary["block_fill"] = round(tokens / (examples * job.options.cutoff_len), 4)
    return summary


def _length_sum(batch: pa.Table) -> pa.Table:
    return pa.table({"tokens": [pc.sum(batch.column("length")).as_py() or 0]})


def total_length(ds: ray.data.Dataset) -> int:
    """The sum of `length`: one small task per block, each returning one number. (`Dataset.sum` runs Ray Data's
    aggregation, 1.3-2.5 s on 100k rows against 0.2 s for this; bench/data_prep.py.)"""
    sums = ds.map_batches(_length_sum, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="pyarrow")
    return int(sum(pc.sum(batch.column("tokens")).as_py() or 0 for batch in sums))


def summarize(train: ray.data.Dataset, evals: dict[str, Any], stats: dict, job: TokenizeJob) -> dict:
    """What preparation did: rows read and dropped (by reason), examples, tokens, truncation, block fill."""
    examples = train.count()
    tokens = total_length(train) if examples else 0
    summary = _counts(examples, tokens, stats, job)
    for name, ds in evals.items():
        summary[f"{name}_examples"] = ds.count()
    return summary
