"""One command, Loom side by side with its peers: `python bench/suite.py` (bench/README.md).

For each workload (a model built offline: *tiny*, start-up dominated; *small*, ~38M parameters, compute dominated on
CPU) and case (sft LoRA, sft full, pt with packing, dpo LoRA) it runs, alternating A B C A B C so the machine's drift
cancels:
- **loom**: `loom train` (embedded Ray, or the cluster in RAY_ADDRESS), 2 workers x 1 CPU, global batch 8;
- **loom_fast**: the same with Loom's fast recipe (FAST_RECIPE: neat packing; for dpo, FAST_DPO), against the peer's
  defaults;
- **plain**: a plain transformers `Trainer` in one process with 2 threads, the same tokens (bench/plain_trainer.py;
  sft and pt only: it has no preference loss);
- **llamafactory**: LLaMA-Factory 0.9.5 with its defaults, one process, 2 threads (bench/llamafactory_run.py), in a
  virtual environment the bench creates (bench/.venv-llamafactory); skipped, with the reason, when it cannot.
Same model, data, cutoff, global batch, learning rate, schedule and optimizer on every side.

Figures per run: steady-state non-pad tokens/s, step time, seconds from the command to the first optimizer step,
total wall time, peak memory of the driver (the launched process) and of each worker, the workload's padding
fraction, checkpoint save time, data preparation rows/s, and MFU against the fp32 matmul peak this script measures
on the same cores in the same run. `--scaling` adds Loom on one worker (1 -> 2 workers), `--two-nodes` Loom on 4
workers over a two-node ray.cluster_utils cluster (2 -> 4 logical workers), `--sweep` a 4-trial `loom tune` sweep
(how long each trial waits for its first step). Writes bench/results/suite-<stamp>.json, .md and .png. `--smoke`
runs the tiny workload for a few steps, once, without the peer: the harness check that CI runs (no figure is
asserted).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data" / "llamafactory"
DEMO_DATA = REPO / "orchestrator" / "demo" / "data"
PEER_VENV = BENCH / ".venv-llamafactory"
PEER_PIN = "llamafactory==0.9.5"
THREADS = 2  # the cores every side gets: 2 Loom workers of 1 CPU, or one process of 2 threads
SMALL = {"vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "warmup_steps": 0}  # ~25M parameters  # fmt: skip
# The GPU workload (bench/gpu.sh): a Qwen2.5-0.5B-sized Llama, about 0.5B parameters with the 4096-token vocabulary.
MEDIUM = {"vocab_size": 4096, "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 20,
          "num_attention_heads": 12, "num_key_value_heads": 4, "warmup_steps": 0}  # fmt: skip
MODELS = {"tiny": {}, "small": SMALL, "medium": MEDIUM}
CASES = {
    "sft_lora": {"stage": "sft", "finetuning_type": "lora", "packing": False, "learning_rate": 1e-4},
    "sft_full": {"stage": "sft", "finetuning_type": "full", "packing": False, "learning_rate": 1e-5},
    "pt_packing": {"stage": "pt", "finetuning_type": "lora", "packing": True, "learning_rate": 1e-4},
    "dpo_lora": {"stage": "dpo", "finetuning_type": "lora", "packing": False, "learning_rate": 5e-6},
}
# The plain Trainer has no preference loss: dpo is measured against LLaMA-Factory (TRL's DPO trainer) only.
PLAIN_STAGES = ("sft", "pt")
# dpo with LoRA takes its reference as the policy with the adapter off, on every side (sigmoid loss, beta 0.1).
# Loom's fast recipe for it computes those reference log-probabilities once, before training (the same numbers:
# the reference never changes), instead of one more forward pass per step.
FAST_DPO = {"precompute_ref_logps": True}
SIDES = ("loom", "loom_fast", "loom_1w", "loom_2n4w", "plain", "llamafactory")
# loom_1w (not run by default: --sides or --scaling): Loom with one worker of 1 CPU on the same global batch, the
# other end of the 1 -> 2 workers scaling figure. loom_2n4w (--two-nodes): 4 workers of 1 logical CPU on a
# two-node ray.cluster_utils cluster (2 logical CPUs per node) on the same cores and global batch: the 2 -> 4 logical
# workers figure, which on one machine measures what more workers and a node boundary cost, not added hardware.
TWO_NODES = {"ray_storage_shared": True, "placement_strategy": "SPREAD"}  # the nodes share this machine's disk
SWEEP_RATES = (5e-5, 1e-4, 2e-4, 4e-4)  # the 4-trial sweep's grid (--sweep)
# Loom's fast recipe (docs/PERFORMANCE.md): what Loom can recommend without changing what is learned. Neat packing
# drops the padding (a third to a half of the tokens at cutoff 512 here) and keeps each packed sequence's attention
# to itself, so every sequence gets the logits it would get alone (tests/unit/test_packing.py); gradient
# checkpointing stays off while memory allows. The "loom" side trains at the plain Trainer's settings instead.
FAST_RECIPE = {"packing": True, "neat_packing": True}


@dataclass(frozen=True)
class Workload:
    model: str  # tiny | small
    case: str  # a key of CASES
    steps: int
    cutoff_len: int
    global_batch: int = 8
    workers: int = 2
    device: str = "cpu"  # cpu | cuda (bench/gpu.sh: one CUDA device, bf16)

    def dataset(self) -> tuple[str, str]:
        """(dataset name, dataset_dir): LLaMA-Factory's demo data where ../shared has it, else Loom's own."""
        stage = CASES[self.case]["stage"]
        if (SHARED_DATA / "dataset_info.json").is_file():
            return {"pt": "c4_demo", "dpo": "dpo_en_demo"}.get(stage, "alpaca_en_demo"), str(SHARED_DATA)
        return {"pt": "loom_demo_pt", "dpo": "loom_demo_pref"}.get(stage, "loom_demo_sft"), str(DEMO_DATA)

    @property
    def has_plain_baseline(self) -> bool:
        return CASES[self.case]["stage"] in PLAIN_STAGES

    def spec(self, model_dir: str, out: Path) -> dict:
        """What every side trains: the baselines read it as JSON, Loom as its YAML config (loom_config)."""
        dataset, dataset_dir = self.dataset()
        case = CASES[self.case]
        return {"model": model_dir, "dataset": dataset, "dataset_dir": dataset_dir, "template": "default",
                "stage": case["stage"], "finetuning_type": case["finetuning_type"], "packing": case["packing"],
                "cutoff_len": self.cutoff_len, "global_batch": self.global_batch, "steps": self.steps,
                "learning_rate": case["learning_rate"], "lora_rank": 8, "optim": "adamw_torch", "seed": 42,
                "threads": THREADS, "out": str(out / "out"), "probe": str(out / "probe.json"),
                "device": self.device, "bf16": self.device == "cuda",
                "attn_implementation": "flash_attention_2" if self._fa2() else "sdpa"}  # fmt: skip

    def _fa2(self) -> bool:
        return self.device == "cuda" and attention() == "fa2"


def attention() -> str:
    """flash_attn for a CUDA run: FlashAttention-2 where the package is installed, else PyTorch's sdpa."""
    return "fa2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def loom_config(spec: dict, workers: int, out: Path, fast: bool = False) -> dict:
    config = {
        "model_name_or_path": spec["model"], "stage": spec["stage"], "do_train": True,
        "finetuning_type": spec["finetuning_type"], "dataset": spec["dataset"], "dataset_dir": spec["dataset_dir"],
        "template": spec["template"], "cutoff_len": spec["cutoff_len"], "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["global_batch"] // workers, "gradient_accumulation_steps": 1,
        "learning_rate": spec["learning_rate"], "lr_scheduler_type": "cosine", "optim": spec["optim"],
        "seed": spec["seed"], "logging_steps": 1, "save_steps": spec["steps"], "disable_gradient_checkpointing": True,
        "include_effective_tokens_per_second": True, "output_dir": spec["out"],
        "ray_storage_path": str(out / "saves"), "ray_run_name": "bench", "ray_num_workers": workers,
        "resources_per_worker": {"CPU": 1}, "overwrite_output_dir": True,
    }  # fmt: skip
    if spec["device"] == "cuda":  # one worker on the one GPU, bf16, the fastest attention installed
        config.update(resources_per_worker={"GPU": 1}, bf16=True, flash_attn=attention())
        if fast and importlib.util.find_spec("liger_kernel") is not None:
            config["enable_liger_kernel"] = True
    if spec["finetuning_type"] == "lora":
        config.update(lora_rank=spec["lora_rank"], lora_target="all")
    if spec["stage"] == "pt":
        config["packing"] = spec["packing"]
    if spec["stage"] == "dpo":
        config.update(pref_beta=0.1, pref_loss="sigmoid")
    if fast:
        config.update({"sft": FAST_RECIPE, "dpo": FAST_DPO}.get(spec["stage"], {"packing": True}))
    return config


# ---------------------------------------------------------------- measuring


class PeakMemory:
    """The launched process's peak resident set (VmHWM), polled from /proc while it runs."""

    def __init__(self, pid: int):
        self.pid, self.peak_mb, self._done = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(0.2):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            found = re.search(r"VmHWM:\s+(\d+) kB", status)
            if found:
                self.peak_mb = max(self.peak_mb, int(found.group(1)) / 1024)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return round(self.peak_mb, 1)


def run_process(command: list[str], env: dict, log: Path) -> tuple[float, float, float, int]:
    """(epoch when launched, wall seconds, peak driver MB, return code); output to `log`."""
    started = time.time()
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        memory = PeakMemory(process.pid)
        code = process.wait()
    return started, round(time.time() - started, 2), memory.stop(), code


def failed(code: int, log: Path) -> dict:
    """A run that did not finish: its exit code and the end of its output."""
    return {"error": f"exit {code}: {log.read_text()[-1500:]}"}


def steady(steps: list[tuple[float, int]]) -> dict:
    """Throughput and step time after the warm-up (the first fifth of the steps, at least one step, left out)."""
    skip = max(1, len(steps) // 5)
    if len(steps) <= skip:
        return {"tokens_per_s": None, "step_s": None}
    (t0, n0), (t1, n1) = steps[skip - 1], steps[-1]
    gaps = [b[0] - a[0] for a, b in zip(steps[skip - 1 :], steps[skip:], strict=False)]
    return {"tokens_per_s": round((n1 - n0) / max(t1 - t0, 1e-9), 1), "step_s": round(statistics.median(gaps), 4)}


def run_loom(spec: dict, workload: Workload, out: Path, fast: bool = False, address: str | None = None,
             extra: dict | None = None) -> dict:  # fmt: skip
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump({**loom_config(spec, workload.workers, out, fast), **(extra or {})}))
    timings = out / "reports.jsonl"
    env = {**os.environ, "RECORD_VRAM": "1", "LOOM_REPORT_TIMINGS": str(timings), "HF_HUB_OFFLINE": "1"}
    if address:
        env["RAY_ADDRESS"] = address
    command = [sys.executable, "-m", "orchestrator.cli", "train", str(config)]
    started, wall, driver_mb, code = run_process(command, env, out / "log.txt")
    if code:
        return failed(code, out / "log.txt")
    records = [json.loads(line) for line in (Path(spec["out"]) / "trainer_log.jsonl").read_text().splitlines()]
    steps = [(r["time"], r["tokens_seen"]) for r in records if "tokens_seen" in r]
    text = (out / "log.txt").read_text()
    phases = dict(re.findall(r"(\w[\w ]*?) ([\d.]+) s", (re.search(r"^timing\s+(.*)$", text, re.M) or ["", ""])[1]))
    data = re.search(r"^data\s+(\{.*\})$", text, re.M)
    summary = json.loads(data.group(1)) if data else {}
    rows = summary.get("train_examples")
    packed = {"padding_fraction": round(1 - summary["block_fill"], 3)} if "block_fill" in summary else {}
    reports = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
    saves = [r["report_s"] for r in reports if r["checkpoint"] and r["rank"] == 0]
    workers_gb = [r["memory_peak_gb"] for r in records if "memory_peak_gb" in r]
    data_s = float(phases.get("data", 0)) or None
    return {"wall_s": wall, "first_step_s": round(steps[0][0] - started, 2), **steady(steps),
            "driver_peak_mb": driver_mb, "worker_peak_mb": [round(gb * 1024, 1) for gb in workers_gb[-1]] if workers_gb else None,
            "checkpoint_s": saves[0] if saves else None, "data_rows_per_s": round(rows / data_s, 1) if rows and data_s else None,
            "phases_s": {k.strip(): float(v) for k, v in phases.items()}, **packed}  # fmt: skip


def run_baseline(side: str, spec: dict, out: Path, python: str) -> dict:
    script = BENCH / ("plain_trainer.py" if side == "plain" else "llamafactory_run.py")
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1",
           "HF_DATASETS_CACHE": str(out / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    started, wall, peak_mb, code = run_process([python, str(script), str(out / "spec.json")], env, out / "log.txt")
    if code or not Path(spec["probe"]).is_file():
        return failed(code, out / "log.txt")
    probe = json.loads(Path(spec["probe"]).read_text())
    steps = [tuple(s) for s in probe["steps"]]
    data_s, rows = probe.get("data_s"), probe.get("rows")
    return {"wall_s": wall, "first_step_s": round(steps[0][0] - started, 2), **steady(steps),
            "driver_peak_mb": peak_mb, "worker_peak_mb": [probe["peak_gpu_mb"]] if "peak_gpu_mb" in probe else None,
            "checkpoint_s": (probe["saves"] or [None])[0],
            "data_rows_per_s": round(rows / data_s, 1) if rows and data_s else None,
            **{k: probe[k] for k in ("parameters", "trainable", "padding_fraction") if k in probe}}  # fmt: skip


def ray_floor() -> dict:
    """Ray's own start-up on this machine (bench/ray_floor.py), measured in a process of its own."""
    done = subprocess.run([sys.executable, str(BENCH / "ray_floor.py")], capture_output=True, text=True, cwd=REPO)
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr[-500:]}


def matmul_peak_gflops(device: str = "cpu", threads: int = THREADS, repeats: int = 20) -> float:
    """Matmul FLOP/s of the device the runs train on, the MFU denominator (the best of three timed rounds): fp32 on
    `threads` CPU cores, bf16 on a CUDA device (what each trains in)."""
    import torch

    cuda = device == "cuda"
    size, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(4):  # the first round warms up
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(before)
    return round(2 * size**3 * repeats / best / 1e9, 1)


def flops_per_token(parameters: int, trainable: int) -> float:
    """Model FLOPs per trained token: 2N forward, 2N backward through the activations, and 2 per trainable weight
    for its gradient (6N for full fine-tuning, about 4N for LoRA). Attention's score FLOPs are left out."""
    return 4 * parameters + 2 * trainable


# ---------------------------------------------------------------- the peer's environment


def peer_python(install: bool) -> tuple[str | None, str | None]:
    """(python of LLaMA-Factory's venv, None) or (None, why it is skipped). Creates the venv when `install`."""
    python = PEER_VENV / "bin" / "python"
    check = [str(python), "-c", "import llamafactory, sys; sys.exit(llamafactory.__version__ != '0.9.5')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python), None
    if not install:
        return None, f"{PEER_VENV} has no {PEER_PIN} (run without --no-install to create it)"
    steps = [[sys.executable, "-m", "venv", str(PEER_VENV)],
             [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],  # torch first and pinned (STACK.md)
             [str(python), "-m", "pip", "install", "-q", "-c", str(BENCH / "peer-constraints.txt"), PEER_PIN],
             [str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"]]  # fmt: skip
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode and "uninstall" not in step:
            return None, f"installing {PEER_PIN} failed: {' '.join(step[2:])}: {done.stderr.strip()[-300:]}"
    _placeholder_torchaudio(python)
    return (str(python), None) if subprocess.run(check).returncode == 0 else (None, f"{PEER_PIN} does not import")


def _placeholder_torchaudio(python: Path) -> None:
    """LLaMA-Factory 0.9.5 imports torchaudio at the top of its multimodal plugin, and no torchaudio build loads
    beside CPU torch 2.13.0 (PyPI's stop at 2.11 and fail on `_torchaudio.so`). The text workloads never call it,
    so the peer's venv gets a module that imports and refuses any use."""
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    package = Path(site) / "torchaudio"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(
        '"""Placeholder written by Loom\'s bench: no torchaudio loads beside CPU torch 2.13.0; audio is unused."""\n\n\n'
        "def __getattr__(name):\n"
        '    raise ImportError(f"torchaudio.{name}: this benchmark environment has no torchaudio")\n'
    )


# ---------------------------------------------------------------- the run


def build_model(name: str, into: Path) -> str:
    from orchestrator.tiny import TinySpec, build_tiny_model

    return build_tiny_model(str(into / name), TinySpec(**MODELS[name]))


def run_suite(workloads: list[Workload], sides: list[str], repeats: int, work: Path, peer: str | None,
              partial: Path, peak: float) -> list[dict]:  # fmt: skip
    """Every run's figures; each also appended to `partial` (JSON lines) as it ends, so an interrupted suite
    keeps what it measured."""
    models = {name: build_model(name, work / "models") for name in sorted({w.model for w in workloads})}
    runs = []
    for workload in workloads:
        for repeat in range(repeats):
            for side in sides:  # A B C A B C: each side's runs spread over the same stretch of time
                if side == "plain" and not workload.has_plain_baseline:
                    continue
                out = work / f"{workload.model}-{workload.case}-{side}-{repeat}"
                out.mkdir(parents=True)
                spec = workload.spec(models[workload.model], out)
                if side == "loom_2n4w":
                    with two_node_cluster() as address:
                        figures = run_loom(spec, replace(workload, workers=4), out, address=address, extra=TWO_NODES)
                elif side.startswith("loom"):
                    one = replace(workload, workers=1) if side == "loom_1w" else workload
                    figures = run_loom(spec, one, out, fast=side == "loom_fast")
                else:
                    figures = run_baseline(side, spec, out, sys.executable if side == "plain" else peer)
                runs.append({**asdict(workload), "side": side, "repeat": repeat, "peak_gflops": peak, **figures})
                with partial.open("a") as handle:
                    handle.write(json.dumps(runs[-1]) + "\n")
                print(f"{workload.model:<6} {workload.case:<11} {side:<13} #{repeat} {json.dumps(figures)}", flush=True)
    return runs


def run_sweep(workload: Workload, model_dir: str, out: Path) -> dict:
    """`loom tune` over SWEEP_RATES on the workload, one trial at a time (each takes both workers): how long each
    trial waits before its first optimizer step (trial 1 from the command)."""
    out.mkdir(parents=True)
    spec = workload.spec(model_dir, out)
    base = {**loom_config(spec, workload.workers, out), "output_dir": str(out / "trials")}
    (out / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": "base.yaml", "search_space": {"learning_rate": {"grid": list(SWEEP_RATES)}}, "metric": "loss",
             "max_concurrent_trials": 1, "name": "bench", "storage_path": str(out / "sweeps")}  # fmt: skip
    (out / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "orchestrator.cli", "tune", str(out / "sweep.yaml")]
    started, wall, driver_mb, code = run_process(command, env, out / "log.txt")
    if code:
        return failed(code, out / "log.txt")
    trials = []
    for log in (out / "trials").glob("*/trainer_log.jsonl"):
        times = [json.loads(line)["time"] for line in log.read_text().splitlines() if "tokens_seen" in line]
        trials.append({"trial": log.parent.name, "first_step": times[0], "last_step": times[-1]})
    trials.sort(key=lambda t: t["first_step"])
    # A trial's start-up: from the previous trial's last step (its save, report and teardown included) to its own
    # first step; trial 1's from the command. Tune runs them one at a time here, so the gaps are each trial's wait.
    ends = [started] + [t["last_step"] for t in trials[:-1]]
    waits = [round(t["first_step"] - end, 2) for t, end in zip(trials, ends, strict=True)]
    later = statistics.median(waits[1:]) if len(waits) > 1 else None
    return {"model": workload.model, "case": workload.case, "trials": len(trials), "wall_s": wall,
            "driver_peak_mb": driver_mb, "trial_start_up_s": waits,
            "x_trial1_over_later": _ratio(waits[0], later) if waits else None}  # fmt: skip


FIGURES = ("tokens_per_s", "step_s", "first_step_s", "wall_s", "driver_peak_mb", "worker_peak_mb", "checkpoint_s",
           "data_rows_per_s")  # fmt: skip


def summarize(runs: list[dict], peak_gflops: float) -> list[dict]:
    """Per workload, case and side: the median of each figure over the repeats, MFU, and ratios to plain."""
    rows = []
    keys = sorted({(r["model"], r["case"]) for r in runs}, key=lambda k: (k[0] != "tiny", k[1]))
    for model, case in keys:
        group = [r for r in runs if (r["model"], r["case"]) == (model, case) and "error" not in r]
        plain = [r for r in group if r["side"] == "plain"]
        shape = plain[0] if plain else {}
        for side in SIDES:
            mine = [r for r in group if r["side"] == side]
            if not mine:
                continue
            row = {"model": model, "case": case, "side": side, "runs": len(mine)}
            for figure in FIGURES:
                values = [r[figure] for r in mine if r.get(figure) is not None]
                if values and isinstance(values[0], list):  # per worker: the median per rank
                    row[figure] = [round(statistics.median(v), 1) for v in zip(*values, strict=False)]
                else:
                    row[figure] = round(statistics.median(values), 4) if values else None
            packed = [r["padding_fraction"] for r in mine if "padding_fraction" in r]  # its own packed blocks
            row["padding_fraction"] = packed[0] if packed else shape.get("padding_fraction")
            if shape.get("parameters") and row["tokens_per_s"]:
                flops = flops_per_token(shape["parameters"], shape["trainable"]) * row["tokens_per_s"]
                row["mfu"] = round(flops / (peak_gflops * 1e9), 3)
            rows.append(row)
        mine = {row["side"]: row for row in rows if (row["model"], row["case"]) == (model, case)}
        base, peer = mine.get("plain"), mine.get("llamafactory")
        for row in mine.values():
            if base:
                row["x_plain_tokens_per_s"] = _ratio(row["tokens_per_s"], base["tokens_per_s"])
                row["x_plain_wall"] = _ratio(row["wall_s"], base["wall_s"])
                row["x_plain_first_step"] = _ratio(row["first_step_s"], base["first_step_s"])
            if peer:
                row["x_peer_tokens_per_s"] = _ratio(row["tokens_per_s"], peer["tokens_per_s"])
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def markdown(report: dict) -> str:
    head = ("| model | case | side | non-pad tok/s | x plain | x LLaMA-Factory | step s | first step s | x plain | wall s | x plain | "
            "driver MB | worker MB | ckpt s | data rows/s | pad | MFU |")  # fmt: skip
    where = "bf16 matmul peak of the CUDA device" if report.get("device") == "cuda" else "fp32 matmul peak"
    lines = [f"Loom bench suite, {report['date']}, {report['machine']}, {where} {report['peak_gflops']} "
             f"GFLOP/s on {THREADS} threads. Command: `{report['command']}`", "", _floor_line(report["ray_floor"]),
             "", head,
             "|" + "---|" * (head.count("|") - 1)]  # fmt: skip
    for r in report["summary"]:
        cells = [r["model"], r["case"], r["side"], r["tokens_per_s"], r.get("x_plain_tokens_per_s"),
                 r.get("x_peer_tokens_per_s"), r["step_s"],
                 r["first_step_s"], r.get("x_plain_first_step"), r["wall_s"], r.get("x_plain_wall"),
                 r["driver_peak_mb"], r["worker_peak_mb"], r["checkpoint_s"], r["data_rows_per_s"],
                 r["padding_fraction"], r.get("mfu")]  # fmt: skip
        lines.append("| " + " | ".join("-" if c is None else (", ".join(map(str, c)) if isinstance(c, list) else str(c)) for c in cells) + " |")  # fmt: skip
    lines += _scaling_lines(report["summary"]) + _sweep_lines(report.get("sweep"))
    lines += _data_prep_lines(report.get("data_prep"))
    for side, why in report["skipped"].items():
        lines.append(f"\n{side} skipped: {why}")
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"\n{run['model']} {run['case']} {run['side']} #{run['repeat']} failed: {run['error'][:300]}")
    return "\n".join(lines) + "\n"


def _scaling_lines(summary: list[dict]) -> list[str]:
    """Per workload: tokens/s per core from 1 to 2 workers (loom_1w -> loom) and 2 -> 4 logical workers on two nodes
    (loom -> loom_2n4w; the 4 logical CPUs share the same 2 cores, so per core means per physical core)."""
    lines = []
    for model, case in sorted({(r["model"], r["case"]) for r in summary}):
        mine = {r["side"]: r.get("tokens_per_s") for r in summary if (r["model"], r["case"]) == (model, case)}
        if mine.get("loom_1w") and mine.get("loom"):
            lines.append(f"\n{model} {case}, 1 -> 2 workers: {_ratio(mine['loom'], mine['loom_1w'])}x tokens/s, "
                         f"{_ratio(mine['loom'] / 2, mine['loom_1w'])} per core.")  # fmt: skip
        if mine.get("loom_2n4w") and mine.get("loom"):
            lines.append(f"\n{model} {case}, 2 workers on one node -> 4 logical workers on two nodes (same {THREADS} "
                         f"cores): {_ratio(mine['loom_2n4w'], mine['loom'])}x tokens/s per core.")  # fmt: skip
    return lines


def _sweep_lines(sweep: dict | None) -> list[str]:
    if not sweep:
        return []
    if "error" in sweep:
        return [f"\n4-trial sweep failed: {sweep['error'][:300]}"]
    waits = sweep["trial_start_up_s"]
    return [f"\n{sweep['trials']}-trial sweep ({sweep['model']} {sweep['case']}, one trial at a time): seconds before "
            f"each trial's first step (trial 1 from the command, each later one from the previous trial's last "
            f"step): {waits}; trial 1 over the later trials' median: {sweep['x_trial1_over_later']}x. Sweep wall "
            f"{sweep['wall_s']} s."]  # fmt: skip


def _data_prep_lines(result: dict | None) -> list[str]:
    if not result:
        return []
    if "error" in result:
        return [f"\ndata preparation failed: {result['error'][:300]}"]
    return [f"\ndata preparation, {result['rows']} rows on {result['cpus']} CPUs: Loom {result['loom_s']} s, "
            f"`datasets.map` {result['datasets_map_s']} s with the same tokenizer view "
            f"({result['loom_over_datasets_map']}x) and {result['datasets_map_transformers_tokenizer_s']} s with "
            f"transformers' tokenizer ({result['loom_over_datasets_map_transformers_tokenizer']}x); a warm rerun "
            f"from tokenized_path: {result['warm_rerun_data_s']} s of data time."]  # fmt: skip


def _floor_line(floor: dict) -> str:
    if "empty_fit_s" not in floor:
        return f"Ray's floor: not measured {floor.get('error', '')[-200:]}".strip()
    return (
        f"Ray's floor: import {floor['import_s']} s, start {floor['ray_init_s']} s, `fit()` of an empty "
        f"2-worker TorchTrainer {floor['empty_fit_s']} s."
    )


def chart(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    groups = sorted({(r["model"], r["case"]) for r in summary}, key=lambda k: (k[0] != "tiny", k[1]))
    figure = Figure(figsize=(4 + 3 * len(groups), 7))
    # Ratios to the plain Trainer of the same workload, so that workloads of any size share one axis.
    panels = (("x_plain_tokens_per_s", "steady non-pad tokens/s, x plain Trainer (higher is better)"),
              ("x_plain_wall", "wall time, x plain Trainer (lower is better)"))  # fmt: skip
    for index, (key, title) in enumerate(panels):
        axes = figure.add_subplot(2, 1, index + 1)
        for offset, side in enumerate(SIDES):
            values = [next((r.get(key) or 0 for r in summary if (r["model"], r["case"], r["side"]) == (*g, side)), 0)
                      for g in groups]  # fmt: skip
            width = 0.8 / len(SIDES)
            places = [i + width * (offset - (len(SIDES) - 1) / 2) for i in range(len(groups))]
            axes.bar(places, values, width=width, label=side)
        axes.axhline(1.0, color="grey", linewidth=0.8)
        axes.set_xticks(range(len(groups)), [f"{m} {c}" for m, c in groups])
        axes.set_title(title)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip().splitlines() if shutil.which("nvidia-smi") else []  # fmt: skip
    return f"{os.cpu_count()} cores {cpu}, {platform.system()}" + (f", {gpu[0]}" if gpu else "")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,small", help="tiny, small, medium (~0.5B, for --device cuda)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: one CUDA device, bf16, one Loom worker (bench/gpu.sh)",
    )
    parser.add_argument("--cases", default="sft_lora,sft_full,pt_packing,dpo_lora", help=", ".join(CASES))
    parser.add_argument("--sides", default="loom,loom_fast,plain,llamafactory", help=", ".join(SIDES))
    parser.add_argument("--scaling", action="store_true", help="also loom_1w: Loom on 1 worker (1 -> 2 workers)")
    parser.add_argument(
        "--two-nodes",
        action="store_true",
        help="also loom_2n4w: 4 workers on a two-node ray.cluster_utils cluster (2 -> 4 workers)",
    )
    parser.add_argument(
        "--data-prep",
        type=int,
        metavar="ROWS",
        help="also bench/data_prep.py on ROWS generated rows: Loom vs datasets.map, warm rerun",
    )
    parser.add_argument("--sweep", action="store_true",
                        help="also a 4-trial loom tune sweep on the first workload: each trial's start-up")  # fmt: skip
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternated")
    parser.add_argument("--out", default=str(BENCH / "results"))
    parser.add_argument("--no-install", action="store_true", help="skip LLaMA-Factory unless its venv exists")
    parser.add_argument("--report", help="write the table and chart from a suite-*.runs.jsonl file, run nothing")
    parser.add_argument("--smoke", action="store_true", help="tiny sft_lora, 4 steps, once, loom and plain only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.cases, args.sides, args.steps, args.repeats = "tiny", "sft_lora", "loom,plain", 4, 1
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    if args.report:  # the table and chart again, from the runs file of a finished or interrupted suite
        runs = [json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]
        stem = Path(args.report.removesuffix(".runs.jsonl"))
        old = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {}
        command = old.get("command", "").removeprefix("python bench/suite.py ").split() or argv
        extra = {"sweep": old.get("sweep"), "data_prep": old.get("data_prep")}
        return write_report(stem, runs, runs[0]["peak_gflops"], old.get("skipped", {}), command, old.get("ray_floor"),
                            extra)  # fmt: skip
    sides = [s for s in args.sides.split(",") if s] + (["loom_1w"] if args.scaling else [])
    sides += ["loom_2n4w"] if args.two_nodes else []
    skipped: dict[str, str] = {}
    peer = None
    if "llamafactory" in sides:
        peer, why = peer_python(install=not args.no_install)
        if why:
            skipped["llamafactory"], sides = why, [s for s in sides if s != "llamafactory"]
    workers = 1 if args.device == "cuda" else 2
    workloads = [Workload(m, c, args.steps, args.cutoff_len, workers=workers, device=args.device)
                 for m in args.models.split(",") for c in args.cases.split(",")]  # fmt: skip
    for case in sorted({w.case for w in workloads if not w.has_plain_baseline and "plain" in sides}):
        skipped[f"plain ({case})"] = "the plain Trainer has no preference loss; LLaMA-Factory runs TRL's DPO trainer"
    peak = matmul_peak_gflops(args.device)
    floor = ray_floor() if any(side.startswith("loom") for side in sides) else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"suite-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="loom-bench-suite-") as work:
        runs = run_suite(workloads, sides, args.repeats, Path(work), peer, stem.with_suffix(".runs.jsonl"), peak)
        sweep = None
        if args.sweep:
            model_dir = str(Path(work) / "models" / workloads[0].model)
            sweep = run_sweep(workloads[0], model_dir, Path(work) / "sweep")
            print(f"sweep {json.dumps(sweep)}", flush=True)
    extra = {"sweep": sweep, "data_prep": data_prep(args.data_prep) if args.data_prep else None}
    return write_report(stem, runs, peak, skipped, argv, floor, extra)


def data_prep(rows: int) -> dict:
    """bench/data_prep.py in a process of its own: its JSON result (or the error)."""
    command = [sys.executable, str(BENCH / "data_prep.py"), "--rows", str(rows), "--cpus", str(THREADS)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    lines = done.stdout.splitlines()
    if done.returncode or "{" not in lines:
        return {"error": (done.stderr or done.stdout)[-500:]}
    start = len(lines) - 1 - lines[::-1].index("{")  # the result is the last thing printed, indented JSON
    return json.loads("\n".join(lines[start:]))


@contextlib.contextmanager
def two_node_cluster() -> Iterator[str]:
    """Two Ray nodes of 2 logical CPUs each on this machine, for one loom_2n4w run: its address. Up only for that
    run, so that nothing else in the suite sees it."""
    from ray.cluster_utils import Cluster

    given = os.environ.get("RAY_ADDRESS")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()
        if given is None:  # Cluster exports its address
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = given


def write_report(stem: Path, runs: list[dict], peak: float, skipped: dict[str, str], argv: list[str] | None,
                 floor: dict | None = None, extra: dict | None = None) -> Path:  # fmt: skip
    """`extra`: the sweep's and data preparation's results, when they ran."""
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "peak_gflops": peak,
              "ray_floor": floor or {}, "device": runs[0].get("device", "cpu") if runs else "cpu",
              "sweep": (extra or {}).get("sweep"), "data_prep": (extra or {}).get("data_prep"),
              "command": "python bench/suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "skipped": skipped, "summary": summarize(runs, peak), "runs": runs}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    chart(report["summary"], stem.with_suffix(".png"))
    print(markdown(report))
    print(f"written: {stem}.json, .md, .png")
    return stem


if __name__ == "__main__":
    main()
