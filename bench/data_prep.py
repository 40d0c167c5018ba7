"""Data preparation throughput: Loom's Ray Data pipeline vs `datasets.map`, same rows, same processor, same cores.

Both sides run Loom's supervised processor (LLaMA-Factory's token layout) over the same generated alpaca rows. The
`datasets.map` side runs twice: with the tokenizer view Loom's tasks encode with (the engines compared, nothing else)
and with transformers' tokenizer as loaded (what a `datasets.map` pipeline such as LLaMA-Factory's calls). Then the
warm rerun: the same preparation with `tokenized_path`, built once, then read back. Run from the repo root:
`python bench/data_prep.py --rows 100000 --cpus 2`. Not a test: it measures and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_rows(path: Path, rows: int) -> None:
    with open(path, "w") as handle:
        for i in range(rows):
            row = {"instruction": f"Explain item {i} of the list in two short sentences.", "input": f"item {i % 977}",
                   "output": f"Item {i} is number {i % 977} in the list. It follows item {max(i - 1, 0)}."}  # fmt: skip
            handle.write(json.dumps(row) + "\n")


def loom_config(model: str, folder: Path, batch: int, **extra: object) -> object:
    from orchestrator.config import validate_config

    return validate_config({"model_name_or_path": model, "dataset": "rows.jsonl", "dataset_dir": str(folder),
                            "template": "default", "cutoff_len": 256, "preprocessing_batch_size": batch,
                            "disable_shuffling": True, "resources_per_worker": {"CPU": 1}, **extra})  # fmt: skip


def loom_prepare(model: str, folder: Path, cpus: int, batch: int) -> tuple[float, int]:
    from orchestrator.data.pipeline import build_datasets
    from orchestrator.launch import connect
    from orchestrator.preflight import preflight_data

    cfg = loom_config(model, folder, batch)
    connect(num_cpus=cpus)
    specs = preflight_data(cfg, "bench")
    started = time.perf_counter()
    data = build_datasets(cfg, specs.train)
    return time.perf_counter() - started, data.summary["train_examples"]


def loom_warm(model: str, folder: Path, batch: int) -> dict:
    """`prepare_data` with tokenized_path: the build that writes the cache, then a rerun that reuses it (the data
    time of a `loom train` rerun), and reading the reused train set through once."""
    from orchestrator.data.prepare import prepare_data
    from orchestrator.preflight import preflight_data

    cfg = loom_config(model, folder, batch, tokenized_path=str(folder / "tokenized"))
    specs = preflight_data(cfg, "bench")
    started = time.perf_counter()
    prepare_data(cfg, specs.train)
    build = time.perf_counter() - started
    started = time.perf_counter()
    data = prepare_data(cfg, specs.train)
    warm = time.perf_counter() - started
    assert data.summary["cache"].startswith("reused"), data.summary["cache"]
    started = time.perf_counter()
    rows = sum(batch.num_rows for batch in data.train.iter_batches(batch_format="pyarrow", batch_size=None))
    return {"build_and_write_s": round(build, 2), "warm_rerun_data_s": round(warm, 2),
            "warm_read_through_s": round(time.perf_counter() - started, 2), "warm_rows": rows}  # fmt: skip


def hf_prepare(model: str, folder: Path, cpus: int, batch: int, fast_view: bool) -> tuple[float, int]:
    import datasets

    from orchestrator.data.formats import convert
    from orchestrator.data.processors import ProcessorOptions, supervised_batch
    from orchestrator.data.registry import resolve_datasets
    from orchestrator.data.templates import get_template
    from orchestrator.data.tokenizer import TokenizerSpec, for_data, load_tokenizer

    (spec,), _ = resolve_datasets(["rows.jsonl"], str(folder))
    tokenizer_spec = TokenizerSpec(path=model, template="default")

    def process(batch_rows: dict) -> dict:
        tokenizer = load_tokenizer(tokenizer_spec)
        tokenizer = for_data(tokenizer) if fast_view else tokenizer  # Loom's tasks encode with the fast view
        rows = [dict(zip(batch_rows, values, strict=True)) for values in zip(*batch_rows.values(), strict=True)]
        examples = [convert(json.loads(json.dumps(row)), spec, "sft") for row in rows]
        out = supervised_batch(tokenizer, get_template("default"), examples, ProcessorOptions(cutoff_len=256))
        return out.columns

    started = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(folder / "rows.jsonl"), split="train",
                               cache_dir=str(folder / "hf-cache"))  # fmt: skip
    ds = ds.map(process, batched=True, batch_size=batch, num_proc=cpus, remove_columns=ds.column_names,
                load_from_cache_file=False)  # fmt: skip
    return time.perf_counter() - started, len(ds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--model", help="a model folder (default: build the tiny model)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or __import__("orchestrator.tiny", fromlist=["x"]).build_tiny_model(str(folder / "tiny"))
        write_rows(folder / "rows.jsonl", args.rows)
        hf_seconds, hf_rows = hf_prepare(model, folder, args.cpus, args.batch, fast_view=True)
        hf_slow_seconds, _ = hf_prepare(model, folder, args.cpus, args.batch, fast_view=False)
        loom_seconds, loom_rows = loom_prepare(model, folder, args.cpus, args.batch)
        warm = loom_warm(model, folder, args.batch)
    result = {
        "rows": args.rows,
        "cpus": args.cpus,
        "datasets_map_s": round(hf_seconds, 2),
        "datasets_map_rows_per_s": round(hf_rows / hf_seconds),
        "datasets_map_transformers_tokenizer_s": round(hf_slow_seconds, 2),
        "loom_s": round(loom_seconds, 2),
        "loom_rows_per_s": round(loom_rows / loom_seconds),
        "loom_over_datasets_map": round(hf_seconds / loom_seconds, 3),
        "loom_over_datasets_map_transformers_tokenizer": round(hf_slow_seconds / loom_seconds, 3),
        **warm,
    }
    assert hf_rows == loom_rows, (hf_rows, loom_rows)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
