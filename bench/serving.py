"""Serving and batch-prediction figures, side by side on one machine: `loom api` (one process) against `loom serve`
with 1 and 2 Ray Serve replicas under the same load, then `loom predict` on 1 and 2 workers.

The same cores in every case: `loom api` computes with all of them; one replica holds every CPU of the cluster (Ray
gives an actor as many torch threads as CPUs it holds); two replicas hold half each. The total requests in flight
are the same too: MAX_CONCURRENT is 4 for the one server, 4 for one replica, 2 per replica for two.

Load: `--clients` threads, each sending `--requests` streamed chat completions one after another (greedy, so every
case generates the same tokens). Per request: the time to the first token (TTFT) and the time per token after it
(TPOT, from the chunk times). Per case: medians, p90, generated tokens per second and requests per second.

Run from the repo root: `python bench/serving.py [--model tiny|small] [--clients 8] [--requests 4]`. Results go to
bench/results/serving-<model>-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LOOM = str(Path(sys.executable).parent / "loom")
RAY = str(Path(sys.executable).parent / "ray")
SMALL = {"vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "warmup_steps": 0}  # ~38M parameters  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_request(url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {"model": "loom", "messages": [{"role": "user", "content": prompt}], "stream": True, "temperature": 0,
            "max_tokens": max_tokens}  # fmt: skip
    started = time.perf_counter()
    chunks = []
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    chunks.append(time.perf_counter())
    ttft = chunks[0] - started if chunks else float("nan")
    tpot = (chunks[-1] - chunks[0]) / (len(chunks) - 1) if len(chunks) > 1 else float("nan")
    return {"ttft": ttft, "tpot": tpot, "tokens": len(chunks), "total": time.perf_counter() - started}


def load(url: str, clients: int, per_client: int, max_tokens: int) -> dict[str, float]:
    one_request(url, "warm up", 4)
    results: list[dict[str, float]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for turn in range(per_client):
            result = one_request(url, f"Question {index}.{turn}: convert {index + turn} hours to minutes.", max_tokens)
            with lock:
                results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started

    def pct(key: str, q: float) -> float:
        values = sorted(r[key] for r in results)
        return values[min(len(values) - 1, int(q * len(values)))]

    return {
        "requests": len(results), "wall_s": round(wall, 2),
        "ttft_median_ms": round(1000 * statistics.median(r["ttft"] for r in results), 1),
        "ttft_p90_ms": round(1000 * pct("ttft", 0.9), 1),
        "tpot_median_ms": round(1000 * statistics.median(r["tpot"] for r in results), 2),
        "tpot_p90_ms": round(1000 * pct("tpot", 0.9), 2),
        "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "requests_per_s": round(len(results) / wall, 2),
    }  # fmt: skip


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or Serve's proxy up before the app
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not answer in time")


def run_server(argv: list[str], env: dict[str, str], port: int, args: argparse.Namespace) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}"
    log = open(args.work / f"server-{port}.log", "w")  # a file, not a pipe: a full pipe would block the server
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=log, text=True)
    try:
        wait_for(url, server, args.work / f"server-{port}.log")
        return load(url, args.clients, args.requests, args.max_tokens)
    finally:
        server.send_signal(2)
        server.wait(timeout=120)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "small"], default="small")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--predict-rows", type=int, default=64)
    args = parser.parse_args()

    from orchestrator.tiny import TinySpec, build_tiny_model

    cores = os.cpu_count() or 2
    work = args.work = Path(tempfile.mkdtemp(prefix="loom-bench-serving-"))
    model = build_tiny_model(str(work / "model"), TinySpec(**SMALL) if args.model == "small" else TinySpec())
    base = {"model_name_or_path": model, "template": "default", "infer_dtype": "float32", "do_sample": False,
            "max_new_tokens": args.max_tokens, "dataset_dir": str(REPO / "orchestrator" / "demo" / "data")}  # fmt: skip

    def config(name: str, **extra) -> str:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**base, **extra}))
        return str(path)

    # A throwaway local cluster on loopback: no token, so every client of it connects as the test suite's do.
    env = {**os.environ, "API_HOST": "127.0.0.1", "API_VERBOSE": "0", "LOOM_API_QUEUE": "64",
           "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    ray_port = free_port()
    # One logical CPU more than the cores: Ray Data's read tasks need one beside predict's actors.
    subprocess.run([RAY, "start", "--head", f"--port={ray_port}", f"--num-cpus={cores + 1}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env)  # fmt: skip
    cluster = {**env, "RAY_ADDRESS": f"127.0.0.1:{ray_port}"}
    cases: dict[str, dict] = {}
    try:
        port = free_port()
        cases["loom api (1 process)"] = run_server(
            [LOOM, "api", config("api")], {**env, "API_PORT": str(port), "MAX_CONCURRENT": "4"}, port, args
        )
        for replicas in (1, 2):
            port = free_port()
            cfg = config(f"serve{replicas}", resources_per_worker={"CPU": cores // replicas})
            cases[f"loom serve ({replicas} replica{'s' if replicas > 1 else ''})"] = run_server(
                [LOOM, "serve", cfg, "--replicas", str(replicas)],
                {**cluster, "API_PORT": str(port), "MAX_CONCURRENT": str(4 // replicas)},
                port,
                args,
            )
        predict = {}
        for workers in (1, 2):
            out = work / f"predict{workers}"
            cfg = config(f"predict{workers}", ray_num_workers=workers, resources_per_worker={"CPU": cores // workers},
                         eval_dataset="loom_demo_sft", max_samples=args.predict_rows, per_device_eval_batch_size=8,
                         output_dir=str(out))  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run([LOOM, "predict", cfg], env=cluster, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"loom predict on {workers} worker(s) failed:\n{done.stderr[-3000:]}")
            results = json.loads((out / "predict_results.json").read_text())
            predict[f"{workers} worker{'s' if workers > 1 else ''}"] = {
                "rows": results["predict_samples"], "rows_per_s": results["predict_samples_per_second"],
                "predict_runtime_s": results["predict_runtime"],
                "command_s": round(time.perf_counter() - started, 1),
            }  # fmt: skip
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)
    report = {"model": args.model, "cores": cores, "clients": args.clients, "requests_per_client": args.requests,
              "max_tokens": args.max_tokens, "serving": cases, "predict": predict}  # fmt: skip
    write(report)


def write(report: dict) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = REPO / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"serving-{report['model']}-{stamp}"
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    keys = ["ttft_median_ms", "ttft_p90_ms", "tpot_median_ms", "tpot_p90_ms", "tokens_per_s", "requests_per_s"]
    lines = [f"{report['clients']} clients x {report['requests_per_client']} streamed requests, "
             f"{report['max_tokens']} tokens max, {report['model']} model, {report['cores']} cores", "",
             "| case | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]  # fmt: skip
    for case, row in report["serving"].items():
        lines.append(f"| {case} | " + " | ".join(str(row[k]) for k in keys) + " |")
    lines += ["", "| predict | rows | rows/s | predict runtime s | whole command s |", "|---|---|---|---|---|"]
    for case, row in report["predict"].items():
        lines.append(f"| {case} | {row['rows']} | {row['rows_per_s']} | {row['predict_runtime_s']} | "
                     f"{row['command_s']} |")  # fmt: skip
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
