"""`loom` entry point: the only module that prints for the user and turns LoomError into an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError, LoomError, Problem

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"
QUICKSTART_PROMPT = "Convert 3 hours to minutes."


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML or JSON config with LLaMA-Factory parameter names")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4")


def _model_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir",
        help="a run's output_dir, a checkpoint-NNNNNN folder of a run, or a model or "
        "adapter folder (default: adapter_name_or_path, else a training config's output_dir)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom", description="Ray-distributed LLM fine-tuning with LLaMA-Factory configs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="validate, plan and train")
    _config_args(train)
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    plan = commands.add_parser("plan", help="print the run plan without training")
    _config_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--address", help="also check placement against this Ray cluster (default: RAY_ADDRESS if set)")
    tiny = commands.add_parser("tiny-model", help="build a tiny Llama model and tokenizer offline")
    tiny.add_argument("out_dir")
    pro = commands.add_parser(
        "llama-pro", help="LLaMA Pro: write a copy of a model with identity-initialised blocks inserted (use_llama_pro)"
    )
    pro.add_argument("model_dir", help="the model to expand (a local folder of safetensors weights)")
    pro.add_argument("out_dir", help="where the expanded model goes (must not exist, or be empty)")
    pro.add_argument("--num-expand", type=int, required=True, help="blocks to insert, one after each equal group")
    quick = commands.add_parser("quickstart", help="build a tiny model, train it with LoRA on 2 Ray workers, sample")
    quick.add_argument("--config", default=str(QUICKSTART_CONFIG))
    gen = commands.add_parser(
        "generate", help="one reply to one prompt, with the config's template and generation keys"
    )
    _config_args(gen)
    gen.add_argument("--prompt", required=True)
    _model_dir_arg(gen)
    chat = commands.add_parser("chat", help="a multi-turn chat in the terminal, streaming each answer")
    _config_args(chat)
    _model_dir_arg(chat)
    chat.add_argument("--system", help="system prompt (default: default_system, else the template's own)")
    chat.add_argument("--tools", help="JSON file with a list of function schemas the model may call")
    predict = commands.add_parser("predict", help="generate over the evaluation set on Ray; BLEU-4 and ROUGE scores")
    _config_args(predict)
    _model_dir_arg(predict)
    predict.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    evaluate = commands.add_parser("eval", help="MMLU / C-Eval / CMMLU from task_dir on Ray workers; accuracy")
    _config_args(evaluate)
    _model_dir_arg(evaluate)
    evaluate.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    export = commands.add_parser("export", help="merge adapters into the base and write one plain model folder")
    _config_args(export)
    _model_dir_arg(export)
    api = commands.add_parser("api", help="an OpenAI-compatible HTTP server (API_HOST, API_PORT, API_KEY, ...)")
    _config_args(api)
    _model_dir_arg(api)
    serve = commands.add_parser("serve", help="the API on Ray Serve: replicas with resources_per_worker each")
    _config_args(serve)
    _model_dir_arg(serve)
    serve.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    serve.add_argument("--replicas", type=int, help="replicas to start (default: ray_num_workers)")
    serve.add_argument("--min-replicas", type=int, help="autoscaling: the fewest replicas (default: ray_min_workers)")
    serve.add_argument("--max-replicas", type=int, help="autoscaling: the most replicas (default: --replicas)")
    serve.add_argument("--detach", action="store_true", help="leave the app running on the cluster and return")
    serve.add_argument("--stop", action="store_true", help="take down the app a detached `loom serve` left")
    data = commands.add_parser("data", help="prepare (and cache) the datasets without training; print a summary")
    _config_args(data)
    data.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    status = commands.add_parser("status", help="a run's state from its storage: steps, checkpoints, metrics, nodes")
    status.add_argument("run", help="the run's config, or its run directory (ray_storage_path/ray_run_name, or a URI)")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    plot = commands.add_parser("plot", help="draw a run's loss and metric curves (PNG) from its trainer_log.jsonl")
    plot.add_argument("run", help="a run's output_dir, or the config that trained it")
    plot.add_argument("--out", help="folder for the PNGs (default: the output_dir itself)")
    commands.add_parser("features", help="print docs/FEATURES.md (every parameter and its status)")
    board = commands.add_parser("board", help="a web board: compose, check, submit and follow runs as Ray jobs")
    board.add_argument("--address", help="the Ray dashboard to submit to (default RAY_DASHBOARD_ADDRESS or "
                                         "http://127.0.0.1:8265)")  # fmt: skip
    board.add_argument("--port", type=int, help="port to serve on (default GRADIO_SERVER_PORT or 7860)")
    tune = commands.add_parser("tune", help="run a sweep: trials of a base config over a search space (Ray Tune)")
    tune.add_argument("sweep", help="sweep YAML: base config, search_space, metric, mode, search_alg, scheduler")
    tune.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    tune.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    tune.add_argument("--check", action="store_true", help="validate the sweep and its files, run nothing")
    pipe = commands.add_parser("pipeline", help="run a list of stages (e.g. sft -> rm -> ppo) as one job")
    pipe.add_argument("pipeline", help="pipeline YAML: name, storage_path, stages (name, config, overrides)")
    pipe.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    pipe.add_argument("--check", action="store_true", help="validate every stage and its files, run nothing")
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .plan import make_plan, placement_problems

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg)
    address = args.address or os.environ.get("RAY_ADDRESS")
    problems = None
    if address:
        from .launch import cluster_nodes, connect

        connect(address)
        problems = placement_problems(plan, cluster_nodes())
    if args.json:
        print(json.dumps({**plan.to_dict(), "placement_problems": problems}, indent=2))
    else:
        print(plan.describe())
        if problems is not None:
            print("placement     " + ("ok on the cluster at " + address if not problems else "; ".join(problems)))
    return 4 if problems else 0


def run_train(config: str, overrides: list[str], address: str | None = None):
    from .launch import train
    from .preflight import checked_config

    started = time.perf_counter()
    cfg = checked_config(config, overrides)
    outcome = train(cfg, source=config, address=address)
    print(outcome.plan.describe())
    print(f"data          {json.dumps(outcome.data_summary)}")
    metrics = {k: v for k, v in outcome.metrics.items() if k in ("step", "loss", "eval_loss", "tokens_seen")}
    print(
        f"final         {json.dumps(metrics)}  ({time.perf_counter() - started:.1f} s in all, start: {outcome.start})"
    )
    print(f"timing        {', '.join(f'{k} {v:.1f} s' for k, v in outcome.timings.items())}")
    print(f"checkpoint    {outcome.checkpoint}")
    print(f"model         {outcome.output_dir}")
    print(f"log           {os.path.join(outcome.output_dir, 'trainer_log.jsonl')}")
    if cfg.do_predict:
        from inference.commands import run_predict

        _print_predictions(outcome.output_dir, run_predict(cfg, outcome.output_dir, config, address))
    return cfg, outcome


def cmd_train(args: argparse.Namespace) -> int:
    run_train(args.config, args.overrides, args.address)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from inference.commands import answer

    from .tiny import ensure_tiny_model

    started = time.perf_counter()
    if not os.path.isfile(args.config):
        raise LoomError(f"quickstart config {args.config} not found; run from a Loom checkout")
    from .config.loader import read_config_file

    model_dir = read_config_file(args.config)["model_name_or_path"]
    ensure_tiny_model(model_dir)
    print(f"tiny model    {os.path.abspath(model_dir)} ({time.perf_counter() - started:.1f} s)")
    cfg, outcome = run_train(args.config, ["overwrite_output_dir=true"])
    sample = answer(cfg, outcome.output_dir, QUICKSTART_PROMPT)
    print(f"sample        {QUICKSTART_PROMPT!r} -> {sample!r}")
    print(f"quickstart done in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .config.loader import parse_overrides
    from .errors import ConfigError
    from .sweep import load_sweep
    from .tune import BEST_CONFIG, driver_checks, run_sweep

    started = time.perf_counter()
    extra, problems = parse_overrides(args.overrides)
    if problems:
        raise ConfigError(problems, source="command line")
    sweep = load_sweep(args.sweep, extra)
    print(sweep.describe())
    if args.check:
        driver_checks(sweep, os.getcwd())
        print("check         ok: every searched value gives a valid config")
        return 0
    outcome = run_sweep(sweep, address=args.address)
    best = outcome.best
    print(f"start         {outcome.start}")
    print(outcome.table())
    print(f"best          {best.trial_id}  {sweep.metric} {best.metric:.6g}  {json.dumps(best.params)}")
    print(f"checkpoint    {best.checkpoint or '-'}")
    print(f"model         {best.output_dir or '-'}")
    print(f"best config   {os.path.join(sweep.experiment_dir, BEST_CONFIG)}")
    print(f"tune done in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from .pipeline import check_pipeline, load_pipeline, run_pipeline

    started = time.perf_counter()
    pipeline = load_pipeline(args.pipeline)
    print(pipeline.describe())
    if args.check:
        check_pipeline(pipeline, args.pipeline)
        print("check         every stage's config, data and models are valid (nothing was run)")
        return 0
    for status, stage, outcome in run_pipeline(pipeline, args.pipeline, args.address):
        if status == "skipped":
            print(f"stage {stage.name:<7} finished earlier, skipped ({stage.output_dir})")
            continue
        final = {k: v for k, v in outcome.metrics.items() if k in ("step", "loss", "eval_loss", "reward")}
        print(f"stage {stage.name:<7} {json.dumps(final)}  (start: {outcome.start}; model {outcome.output_dir})")
    print(f"pipeline done in {time.perf_counter() - started:.1f} s")
    return 0


def _inference_config(args: argparse.Namespace) -> Any:
    from .config import load_config

    return load_config(args.config, args.overrides, purpose="infer")


def cmd_generate(args: argparse.Namespace) -> int:
    from inference.commands import answer

    print(answer(_inference_config(args), args.model_dir, args.prompt))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from inference.chat import chat_loop
    from inference.commands import open_engine
    from inference.engine import Sampling

    cfg = _inference_config(args)
    tools = _read_tools(args.tools) if args.tools else None
    engine = open_engine(cfg, args.model_dir, args.config)
    print(f"loom chat: {engine.source.describe()} (template {engine.template.name})")
    chat_loop(engine, Sampling.from_config(cfg), system=args.system, tools=tools)
    return 0


def _read_tools(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            tools = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError([Problem("--tools", f"cannot read a JSON list of tools from {path!r}: {error}")]) from None
    if not isinstance(tools, list):
        raise ConfigError([Problem("--tools", f"{path!r} holds a {type(tools).__name__}, not a list of tools")])
    return json.dumps(tools, ensure_ascii=False)


def cmd_predict(args: argparse.Namespace) -> int:
    from inference.commands import run_predict

    cfg = _inference_config(args)
    results = run_predict(cfg, args.model_dir, args.config, args.address)
    _print_predictions(cfg.output_dir, results)
    return 0


def _print_predictions(output_dir: str, results: dict) -> None:
    print(f"predict       {json.dumps(results)}")
    print(f"predictions   {os.path.join(output_dir, 'generated_predictions.jsonl')}")


def cmd_eval(args: argparse.Namespace) -> int:
    from inference.commands import run_eval
    from inference.evaluate import score_lines

    cfg = _inference_config(args)
    table = run_eval(cfg, args.model_dir, args.config, args.address)
    print(f"loom eval: {cfg.task}, {sum(r['questions'] for r in table['subjects'].values())} questions on "
          f"{table['workers']} worker(s) in {table['runtime_s']:.1f} s")  # fmt: skip
    print(score_lines(table))
    if cfg.save_dir:
        print(f"results       {cfg.save_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from inference.commands import export

    source, folder = export(_inference_config(args), args.model_dir, args.config)
    print(f"loom export: {source.describe()} -> {folder}")
    print(f"files         {', '.join(sorted(os.listdir(folder)))}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from inference.api import ApiSettings, serve_api
    from inference.commands import open_engine
    from inference.engine import Sampling

    cfg = _inference_config(args)
    settings = ApiSettings.from_env()
    engine = open_engine(cfg, args.model_dir, args.config)
    where = f"http://{settings.host}:{settings.port}{settings.root_path}/v1"
    print(f"loom api: {engine.source.describe()} on {where}" + ("" if settings.key else " (no API_KEY: open to all)"))
    serve_api(engine, settings, Sampling.from_config(cfg))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from inference.serve import ReplicaScale, running_replicas, serve_until_stopped, undeploy

    if args.stop:
        from .launch import connect

        connect(args.address)
        print("loom serve: the app is down" if undeploy() else "loom serve: no loom app was running")
        return 0
    from inference.commands import run_serve

    cfg = _inference_config(args)
    scale = ReplicaScale.resolve(cfg, args.replicas, args.min_replicas, args.max_replicas)
    url = run_serve(cfg, args.model_dir, args.config, args.address, scale, args.detach)
    bounds = f", autoscaling {scale.min_replicas}..{scale.max_replicas}" if scale.autoscaling else ""
    print(f"loom serve: {running_replicas()} replica(s) on {url}{bounds}", flush=True)
    if not args.detach:
        serve_until_stopped()
    return 0


def cmd_board(args: argparse.Namespace) -> int:
    from .board import serve

    serve(args.address, port=args.port)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import describe, run_status

    if os.path.isfile(args.run):
        from .config import load_config
        from .plan import make_plan
        from .storage import storage_filesystem

        cfg = load_config(args.run, [], purpose="infer")
        plan = make_plan(cfg)
        status = run_status(plan.run_dir, storage_filesystem(cfg), plan.output_dir)
    else:
        status = run_status(args.run if "://" in args.run else os.path.abspath(args.run))
    print(json.dumps(status.to_dict(), indent=2) if args.json else describe(status))
    return 0 if status.exists or status.marker else 3


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import LOG_NAME, plot_log

    folder = args.run
    if os.path.isfile(folder):
        from .config import load_config
        from .plan import make_plan

        folder = make_plan(load_config(folder, [], purpose="infer")).output_dir
    if not os.path.isfile(os.path.join(folder, LOG_NAME)):
        raise ConfigError([Problem("run", f"{folder} has no {LOG_NAME}: give a run's output_dir (where rank 0 "
                                          "writes the log) or the config that trained it")])  # fmt: skip
    for path in plot_log(folder, out_dir=args.out):
        print(path)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import build_tiny_model

    print(build_tiny_model(args.out_dir))
    return 0


def cmd_llama_pro(args: argparse.Namespace) -> int:
    from .errors import ConfigError, Problem
    from .llama_pro import expand_model

    try:
        made = expand_model(args.model_dir, args.out_dir, args.num_expand)
    except (ValueError, OSError) as error:
        raise ConfigError([Problem("--num-expand" if "num_expand" in str(error) else "model_dir", str(error))],
                          source="loom llama-pro") from None  # fmt: skip
    print(f"expanded {made['num_layers_before']} -> {made['num_layers_after']} layers into {made['target']}; new "
          f"blocks (identity at the start): {made['new_layers']}")  # fmt: skip
    print(f"train them with: model_name_or_path: {made['target']}, finetuning_type: freeze, use_llama_pro: true, "
          f"freeze_trainable_layers: {made['num_expand']}")  # fmt: skip
    return 0


def cmd_features(_: argparse.Namespace) -> int:
    from .features import features_markdown

    sys.stdout.write(features_markdown())
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.preview import describe_example
    from .data.tokenizer import TokenizerSpec, load_tokenizer
    from .launch import prepare_only
    from .preflight import checked_config

    cfg = checked_config(args.config, args.overrides, purpose="data")
    outcome = prepare_only(cfg, source=args.config, address=args.address)
    print(json.dumps(outcome.summary, indent=2))
    if outcome.example is not None:
        print(describe_example(load_tokenizer(TokenizerSpec.from_config(cfg)), outcome.example))
    print(f"took {json.dumps(outcome.timings)}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "plan": cmd_plan,
    "pipeline": cmd_pipeline,
    "quickstart": cmd_quickstart,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "api": cmd_api,
    "serve": cmd_serve,
    "export": cmd_export,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "tiny-model": cmd_tiny_model,
    "llama-pro": cmd_llama_pro,
    "features": cmd_features,
    "plot": cmd_plot,
    "status": cmd_status,
    "board": cmd_board,
    "data": cmd_data,
    "tune": cmd_tune,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .console import quiet_process
        from .environment import check_environment

        check_environment()
        quiet_process()
        return COMMANDS[args.command](args)
    except LoomError as error:
        print(f"loom {args.command}: {error}", file=sys.stderr)
        return error.exit_code


def short_main(argv: list[str] | None = None) -> int:
    """`lmf`, LLaMA-Factory's short command: the same as `loom` while ENABLE_SHORT_CONSOLE is on (the default)."""
    from .environment import enabled

    if not enabled(os.environ, "ENABLE_SHORT_CONSOLE", "1"):
        given = os.environ.get("ENABLE_SHORT_CONSOLE")
        print(f"lmf: turned off (ENABLE_SHORT_CONSOLE={given}); the command is `loom`", file=sys.stderr)
        return 2
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
