"""Data preparation on the session's Ray cluster: mixing, evaluation sets, the tokenized cache, streaming, `loom data`."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from orchestrator.config import validate_config
from orchestrator.errors import DataError
from orchestrator.launch import prepare_only
from tests.helpers import LLAMAFACTORY_DATA


def write_rows(path, rows: int, tag: str) -> None:
    with open(path, "w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"instruction": f"{tag} question {i}", "input": "", "output": f"{tag} {i}"}) + "\n")


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_rows(folder / "big.jsonl", 60, "big")
    write_rows(folder / "small.jsonl", 20, "small")
    write_rows(folder / "held.jsonl", 10, "held")
    return folder


def config(tiny_model, data_dir, **extra):
    raw = {"model_name_or_path": tiny_model, "dataset": "big.jsonl,small.jsonl", "dataset_dir": str(data_dir),
           "template": "default", "cutoff_len": 64, "resources_per_worker": {"CPU": 1}}  # fmt: skip
    return validate_config({**raw, **extra}, purpose="data")


def prepare(ray_cluster, cfg):
    return prepare_only(cfg, source="test", address=ray_cluster.gcs_address)


def test_interleaving_and_one_evaluation_set_per_dataset(ray_cluster, tiny_model, data_dir):
    from orchestrator.data.prepare import prepare_data
    from orchestrator.preflight import preflight_data

    cfg = config(tiny_model, data_dir, mix_strategy="interleave_under", eval_dataset="held.jsonl,small.jsonl",
                 eval_on_each_dataset=True)  # fmt: skip
    specs = preflight_data(cfg, "test")
    data = prepare_data(cfg, specs.train, specs.eval)
    assert data.summary["train_examples"] == 40  # round robin until the 20-row dataset runs out
    assert data.summary["rows_read"] == 60 + 20 + 10 + 20 and data.summary["rows_dropped"] == 0
    assert sorted(data.evals) == ["eval_held.jsonl", "eval_small.jsonl"]
    assert data.evals["eval_held.jsonl"].count() == 10

    over = config(tiny_model, data_dir, mix_strategy="interleave_over", disable_shuffling=True)
    data = prepare_data(over, preflight_data(over, "test").train)
    assert data.summary["train_examples"] == 120  # the small dataset repeats until the big one is done
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    firsts = [tokenizer.decode(row["input_ids"]) for row in data.train.take(4)]
    assert ["big" in t for t in firsts] == [True, False, True, False]  # in order: one from each, in turn


def test_tokenized_cache_is_reused_refused_when_stale_and_rebuilt(ray_cluster, tiny_model, data_dir, tmp_path):
    cache = tmp_path / "tokenized"
    cfg = config(tiny_model, data_dir, tokenized_path=str(cache), val_size=0.25)
    first = prepare(ray_cluster, cfg)
    manifest = json.loads((cache / "loom_cache.json").read_text())
    assert first.summary["cache"].startswith("wrote") and manifest["splits"] == ["train", "eval"]
    assert sorted(os.listdir(cache)) == [manifest["build"], "loom_cache.json"]
    assert os.listdir(cache / manifest["build"] / "train")

    again = prepare(ray_cluster, cfg)
    assert again.summary["cache"].startswith("reused") and again.summary["train_examples"] == 60
    assert again.example["input_ids"] is not None

    with pytest.raises(DataError, match=r"different inputs \(cutoff_len: cached 64, now 32\)"):
        prepare(ray_cluster, cfg.model_copy(update={"cutoff_len": 32}))
    (data_dir / "small.jsonl").write_text(json.dumps({"instruction": "q", "output": "changed"}) + "\n")
    with pytest.raises(DataError, match="datasets: cached"):
        prepare(ray_cluster, cfg)

    rebuilt = prepare(ray_cluster, cfg.model_copy(update={"overwrite_cache": True}))
    assert rebuilt.summary["cache"].startswith("wrote") and rebuilt.summary["rows_read"] == 61
    assert manifest["build"] not in os.listdir(cache)  # the superseded build was removed


def test_loom_data_prints_a_summary_and_a_decoded_example(ray_cluster, tiny_model, data_dir, tmp_path, capsys):
    import yaml

    from orchestrator.cli import main

    path = tmp_path / "data.yaml"
    raw = {"model_name_or_path": tiny_model, "dataset": "small.jsonl", "dataset_dir": str(data_dir),
           "template": "default", "cutoff_len": 64, "stage": "sft", "packing": True, "neat_packing": True}  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    assert main(["data", str(path), "--address", ray_cluster.gcs_address]) == 0
    out = capsys.readouterr().out
    assert '"rows_read": 20' in out and '"block_fill"' in out
    assert "inputs:\n" in out and "Human: small question" in out and "[masked " in out


def test_a_million_rows_stream_through_with_flat_driver_memory(ray_cluster, tiny_model, tmp_path):
    import psutil

    folder = tmp_path / "stream"
    folder.mkdir()
    line = " ".join(f"word{i % 97}" for i in range(12))
    with open(folder / "big.txt", "w") as handle:
        for _ in range(1_000_000):
            handle.write(line + "\n")
    cfg = validate_config({"model_name_or_path": tiny_model, "stage": "pt", "dataset": "big.txt",
                           "dataset_dir": str(folder), "cutoff_len": 1024, "streaming": True, "max_steps": 10,
                           "preprocessing_batch_size": 20000, "resources_per_worker": {"CPU": 1}},
                          purpose="data")  # fmt: skip
    from orchestrator.data.pipeline import stream_summary
    from orchestrator.preflight import preflight_data

    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.05)

    specs = preflight_data(cfg, "test")
    baseline = process.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = stream_summary(cfg, specs.train)
    finally:
        done.set()
        sampler.join()
    assert summary["rows_read"] == 1_000_000
    token_bytes = summary["train_tokens"] * 4 * 2  # input_ids and labels as int32
    assert token_bytes > 200 * 2**20  # the prepared data is far larger than what the driver may grow by
    assert peak[0] - baseline < 100 * 2**20, (peak[0] - baseline) / 2**20


@pytest.mark.skipif(not LLAMAFACTORY_DATA.is_dir(), reason="../shared/data/llamafactory is absent")
@pytest.mark.parametrize(("stage", "dataset", "columns"), [
    ("dpo", "dpo_en_demo", {"chosen_input_ids", "rejected_labels"}),
    ("kto", "kto_en_demo", {"kl_input_ids", "kto_tags"}),
])  # fmt: skip
def test_preference_data_prepares_through_ray(ray_cluster, tiny_model, stage, dataset, columns):
    cfg = validate_config({"model_name_or_path": tiny_model, "stage": stage, "dataset": dataset, "max_samples": 40,
                           "dataset_dir": str(LLAMAFACTORY_DATA), "template": "default", "cutoff_len": 128,
                           "resources_per_worker": {"CPU": 1}}, purpose="data")  # fmt: skip
    outcome = prepare(ray_cluster, cfg)
    assert outcome.summary["train_examples"] == 40 and outcome.summary["rows_dropped"] == 0
    assert columns <= set(outcome.example)


def _rows(ds) -> list[dict]:
    return [{k: (list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v) for k, v in row.items()}
            for row in ds.take_all()]  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [{"val_size": 0.2}, {"packing": True, "neat_packing": True, "eval_dataset": "held.jsonl"},
     {"disable_shuffling": True, "max_samples": 15, "preprocessing_batch_size": 4, "packing": True}],
    ids=["shuffled-split", "neat-packed-with-eval-set", "in-order-limited-small-batches"],
)  # fmt: skip
def test_small_data_prepared_on_the_driver_equals_ray_datas_preparation(ray_cluster, tiny_model, data_dir, extra):
    """The driver path (orchestrator/data/local.py) and the Ray Data path give the same rows in the same order,
    the same validation split and the same summary."""
    from orchestrator.data.local import on_driver, prepare_on_driver
    from orchestrator.data.pipeline import build_datasets
    from orchestrator.preflight import preflight_data

    cfg = config(tiny_model, data_dir, **extra)
    specs = preflight_data(cfg, "test")
    assert on_driver(cfg, specs.train, specs.eval)
    here, there = prepare_on_driver(cfg, specs.train, specs.eval), build_datasets(cfg, specs.train, specs.eval)
    assert here.summary == there.summary and here.summary["train_examples"] > 0
    assert _rows(here.train) == _rows(there.train)
    assert sorted(here.evals) == sorted(there.evals)
    for name in here.evals:
        assert _rows(here.evals[name]) == _rows(there.evals[name]) and here.evals[name].count() > 0


def test_interleaved_streamed_or_large_data_stays_on_ray_data(tiny_model, data_dir, monkeypatch):
    from orchestrator.data.local import DRIVER_BYTES_ENV, on_driver
    from orchestrator.preflight import preflight_data

    cfg = config(tiny_model, data_dir)
    specs = preflight_data(cfg, "test")
    assert on_driver(cfg, specs.train, specs.eval)
    interleaved = config(tiny_model, data_dir, mix_strategy="interleave_under")
    assert not on_driver(interleaved, specs.train, specs.eval)
    assert not on_driver(config(tiny_model, data_dir, streaming=True, max_steps=4), specs.train, specs.eval)
    monkeypatch.setenv(DRIVER_BYTES_ENV, "100")  # smaller than the two files together
    assert not on_driver(cfg, specs.train, specs.eval)


def test_packing_over_a_dataset_of_several_blocks_stays_on_ray_data(tiny_model, tmp_path):
    """Packing fills blocks within a batch, and how Ray Data cuts batches across blocks is its own: a packed
    dataset that reads as more than one block is prepared by Ray Data."""
    from orchestrator.data.local import prepare_on_driver, tokenize_local
    from orchestrator.data.pipeline import TokenizeJob
    from orchestrator.data.readers import CHUNK_ROWS
    from orchestrator.preflight import preflight_data

    folder = tmp_path / "data"
    folder.mkdir()
    write_rows(folder / "big.jsonl", CHUNK_ROWS + 1, "big")
    cfg = config(tiny_model, folder, dataset="big.jsonl", packing=True)
    specs = preflight_data(cfg, "test")
    assert prepare_on_driver(cfg, specs.train, specs.eval) is None
    unpacked = cfg.model_copy(update={"packing": False})
    assert tokenize_local(specs.train[0], TokenizeJob.from_config(unpacked), unpacked).num_rows > CHUNK_ROWS
