"""What a checkpoint costs per step: the same tiny Loom run with a checkpoint at every step and with none, on local
storage and on an S3-compatible store (a moto server on loopback).

Run from the repo root: `python bench/checkpoint_overhead.py [--steps 20] [--storage local s3] [--finetuning-type lora]`.
Not a test: it measures and prints. Each run is a `loom train` subprocess (embedded Ray, 2 workers of 1 CPU);
LOOM_REPORT_TIMINGS makes every rank log how long each `ray.train.report` took and the upload inside it, and rank 0
prints how long its training loop took ("trained steps 1-N in X s").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BUCKET = "loom-bench"
LOOP = re.compile(r"trained steps (\d+)-(\d+) in ([\d.]+) s")
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip


def loom_config(model: str, out: Path, steps: int, save: bool, finetuning_type: str, endpoint: str | None) -> dict:
    cfg = {
        "model_name_or_path": model,
        "dataset": "loom_demo_sft",
        "dataset_dir": str(REPO / "orchestrator/demo/data"),
        "template": "default",
        "cutoff_len": 256,
        "finetuning_type": finetuning_type,
        "per_device_train_batch_size": 4,
        "max_steps": steps,
        "logging_steps": 1,
        "learning_rate": 5e-3 if finetuning_type == "lora" else 1e-3,
        "disable_gradient_checkpointing": True,
        "output_dir": str(out / "model"),
        "ray_storage_path": f"s3://{BUCKET}/{out.name}" if endpoint else str(out / "saves"),
        "ray_run_name": "bench",
        "ray_num_workers": 2,
        "resources_per_worker": {"CPU": 1},
        **({"save_steps": 1, "save_total_limit": 2} if save else {"save_strategy": "no"}),
    }
    if endpoint:
        cfg["ray_storage_endpoint"] = endpoint
    return cfg


def run_loom(cfg: dict, out: Path, env: dict[str, str]) -> dict:
    out.mkdir(parents=True)
    path, timings = out / "cfg.yaml", out / "report_timings.jsonl"
    path.write_text(yaml.safe_dump(cfg))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(path)], capture_output=True,
                          text=True, env={**env, "LOOM_REPORT_TIMINGS": str(timings)})  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    first, last, loop_s = LOOP.search(proc.stdout + proc.stderr).groups()
    steps = int(last) - int(first) + 1
    records = [json.loads(line) for line in timings.read_text().splitlines()]
    rank0 = [r for r in records if r["rank"] == 0]
    with_ckpt = [r for r in rank0 if r["checkpoint"]]
    without = [r for r in rank0 if not r["checkpoint"]]
    return {
        "wall_s": round(wall, 1),
        "loop_s": float(loop_s),
        "steps": steps,
        "loop_s_per_step": round(float(loop_s) / steps, 4),
        "reports_with_checkpoint": len(with_ckpt),
        "report_s_with_checkpoint": _mean([r["report_s"] for r in with_ckpt]),
        "upload_s_per_checkpoint": _mean([r["upload_s"] for r in with_ckpt]),
        "reports_without_checkpoint": len(without),
        "report_s_without_checkpoint": _mean([r["report_s"] for r in without]),
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def checkpoint_mb(storage: str, root: Path, client=None) -> float:
    """Size of the newest checkpoint of a finished run."""
    if storage == "local":
        newest = max((root / "saves" / "bench").glob("checkpoint-*"))
        return round(sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) / 2**20, 3)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{root.name}/bench/checkpoint-")
    objects = [item for page in pages for item in page.get("Contents", [])]
    newest = max(item["Key"].split("/")[2] for item in objects)
    return round(sum(item["Size"] for item in objects if item["Key"].split("/")[2] == newest) / 2**20, 3)


def start_moto() -> tuple[object, object, str]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    return server, client, endpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--storage", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument("--finetuning-type", choices=["lora", "full"], default="lora")
    parser.add_argument("--modes", nargs="+", choices=["none", "every-step"], default=["none", "every-step"])
    parser.add_argument("--tag", default="", help="suffix of the results file, e.g. for a run with other Ray settings")
    args = parser.parse_args()
    os.environ.update({"HF_HUB_OFFLINE": "1", **S3_ENV})
    out = Path(tempfile.mkdtemp(prefix="loom-ckpt-bench-"))
    from orchestrator.tiny import build_tiny_model

    model = build_tiny_model(str(out / "tiny"))
    server, client, endpoint = start_moto() if "s3" in args.storage else (None, None, None)
    report: dict = {"steps": args.steps, "finetuning_type": args.finetuning_type, "machine": "2 cores, no GPU",
                    "workers": "2 x {CPU: 1}", "global_batch": 8,
                    "ray_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")}}  # fmt: skip
    try:
        for storage in args.storage:
            url = endpoint if storage == "s3" else None
            for mode in args.modes:
                save, name = mode == "every-step", f"{storage}-{mode}"
                root = out / name
                cfg = loom_config(model, root, args.steps, save, args.finetuning_type, url)
                result = run_loom(cfg, root, dict(os.environ))
                if save:
                    result["checkpoint_mb"] = checkpoint_mb(storage, root, client)
                report[name] = result
                print(name, json.dumps(result), flush=True)
            if len(args.modes) < 2:
                continue
            saved, plain = report[f"{storage}-every-step"], report[f"{storage}-none"]
            # loop(every step) = N steps + N x (save + report with checkpoint); loop(none) = N steps + 1 plain report
            extra = saved["loop_s"] - plain["loop_s"] + (plain["report_s_without_checkpoint"] or 0.0)
            report[f"{storage}-summary"] = {
                "s_per_checkpoint": round(extra / saved["reports_with_checkpoint"], 3),
                "step_time_ratio_every_step_over_none": round(saved["loop_s_per_step"] / plain["loop_s_per_step"], 2),
            }
    finally:
        if server is not None:
            server.stop()
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"checkpoint_overhead_{args.finetuning_type}{args.tag}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
