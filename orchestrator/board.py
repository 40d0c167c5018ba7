"""`loom board`: a web board that composes a config, checks it as it is typed, and submits, follows, stops and
resumes it as a Ray job on any cluster; then browses its checkpoints and chats with the trained model.

Training never runs in the board's process: a run is `loom train cfg.yaml` submitted through the Ray Jobs API (the
same entrypoint as `ray job submit`), with the config in a fresh working dir. The board reads the run's
trainer_log.jsonl and storage where its machine sees them (one box, or a shared path). The checks are `loom plan`'s.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import yaml

from .config import LoomConfig, validate_config
from .config.schema import without_secrets
from .environment import enabled
from .errors import ConfigError, LoomError
from .plan import make_plan, with_absolute_paths
from .stages import STAGES

STARTER = """\
model_name_or_path: loom_quickstart/tiny-llama
stage: sft
finetuning_type: lora
dataset: loom_demo_sft
dataset_dir: orchestrator/demo/data
template: default
cutoff_len: 256
output_dir: loom_quickstart/board/output
ray_storage_path: loom_quickstart/board/saves
ray_run_name: board
ray_num_workers: 2
resources_per_worker: {CPU: 1}
per_device_train_batch_size: 8
learning_rate: 1.0e-2
max_steps: 20
logging_steps: 2
save_steps: 10
"""
# The secret keys a board-submitted job gets as variables instead (ms/om hub tokens: those hubs' models are refused).
SECRET_VARIABLES = {"hf_hub_token": "HF_TOKEN", "swanlab_api_key": "SWANLAB_API_KEY"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Checked:
    cfg: LoomConfig | None
    report: str  # Markdown: the problems, or the plan


def check_text(text: str, base_dir: str) -> Checked:
    """`loom plan`'s checks on the editor's YAML: every problem together, or the plan."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        return Checked(None, f"**YAML error**\n\n```\n{error}\n```")
    if not isinstance(raw, dict):
        return Checked(None, f"**The config is a {type(raw).__name__}, not a mapping of keys to values.**")
    try:
        cfg = with_absolute_paths(validate_config(raw, source="the editor"), base_dir)
    except ConfigError as error:
        return Checked(None, "**Problems**\n\n" + "\n".join(f"- `{p.key}`: {p.message}" for p in error.problems))
    return Checked(cfg, "**Valid.** The plan:\n\n```\n" + make_plan(cfg, base_dir).describe() + "\n```")


def key_doc(name: str) -> str:
    """One key's default, status and doc, as docs/FEATURES.md lists them."""
    field = LoomConfig.model_fields.get(name)
    if field is None:
        return ""
    extra = field.json_schema_extra or {}
    reason = f" ({extra['reason']})" if extra.get("reason") else ""
    return (f"**`{name}`** (default `{field.default!r}`, {extra.get('support', 'works')}{reason}, from "
            f"{extra.get('source', '')}): {field.description}")  # fmt: skip


def job_folder(cfg: LoomConfig) -> tuple[str, dict[str, str]]:
    """A fresh working dir holding the job's cfg.yaml (the secret keys left out), and the variables that carry
    those secrets to the job instead."""
    folder = tempfile.mkdtemp(prefix="loom-board-job-")
    values = cfg.model_dump(mode="json", exclude_defaults=True)
    with open(os.path.join(folder, "cfg.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(without_secrets(values), handle, sort_keys=False)
    return folder, {SECRET_VARIABLES[key]: str(values[key]) for key in SECRET_VARIABLES if values.get(key)}


class Jobs:
    """The Ray Jobs API of one cluster (its dashboard address, e.g. http://127.0.0.1:8265)."""

    def __init__(self, address: str):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.client = JobSubmissionClient(address)

    def submit(self, cfg: LoomConfig) -> str:
        """`loom train cfg.yaml` as a job, the config (paths made absolute) alone in a fresh working dir. A secret
        key is never written there: the job gets it as the variable its library reads (docs/SECURITY.md)."""
        folder, secrets = job_folder(cfg)
        return self.client.submit_job(entrypoint="loom train cfg.yaml", entrypoint_num_cpus=0,
                                      runtime_env={"working_dir": folder, "env_vars": secrets})  # fmt: skip

    def status(self, job_id: str) -> str:
        return str(self.client.get_job_status(job_id).value)

    def logs(self, job_id: str, lines: int = 200) -> str:
        """The log's last lines, without the terminal colours Ray puts on worker prefixes."""
        return "\n".join(_ANSI.sub("", self.client.get_job_logs(job_id)).splitlines()[-lines:])

    def stop(self, job_id: str) -> bool:
        return self.client.stop_job(job_id)


def with_key(text: str, key: str, value: Any) -> str:
    """The editor's YAML with one key set (a picker's choice); left as it is when it is not a mapping yet."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return text
    if not isinstance(raw, dict) or value in (None, ""):
        return text
    return yaml.safe_dump({**raw, key: value}, sort_keys=False)


def dataset_names(text: str, base_dir: str) -> list[str]:
    """The datasets the config's dataset_dir registers (its dataset_info.json), for the picker."""
    from .data.registry import load_registry

    try:
        raw = yaml.safe_load(text) or {}
        folder = os.path.join(base_dir, str(raw.get("dataset_dir", "data")))
        return sorted(load_registry(folder)[0])
    except Exception:  # noqa: BLE001 - a picker with no choices; the checks name what is wrong
        return []


def loss_points(output_dir: str) -> list[dict[str, Any]]:
    """The loss curve's points (and eval loss) from rank 0's trainer_log.jsonl, for the board's plot."""
    from .plots import read_log

    points = []
    for record in read_log(output_dir) if os.path.isdir(output_dir) else []:
        for key, series in (("loss", "train loss"), ("eval_loss", "eval loss")):
            if key in record:
                points.append({"step": record["step"], "value": record[key], "series": series})
    return points


def checkpoints_text(cfg: LoomConfig, base_dir: str) -> str:
    from .status import describe, run_status
    from .storage import storage_filesystem

    plan = make_plan(cfg, base_dir)
    try:
        return "```\n" + describe(run_status(plan.run_dir, storage_filesystem(cfg), plan.output_dir)) + "\n```"
    except LoomError as error:
        return str(error)


def build(address: str, base_dir: str):
    """The board's Blocks: config editor and checks, job controls, log, loss curve, checkpoints, chat."""
    import gradio as gr
    import pandas as pd

    clients: dict[str, Jobs] = {}
    engines: dict[str, Any] = {}
    outputs: dict[str, str] = {}  # job id -> the output_dir its curve is read from (the editor may change since)

    def jobs(cluster: str) -> Jobs:
        clients[cluster] = clients.get(cluster) or Jobs(cluster)
        return clients[cluster]

    def on_edit(text: str) -> str:
        return check_text(text, base_dir).report

    def on_submit(text: str, cluster: str):
        checked = check_text(text, base_dir)
        if checked.cfg is None:
            return "", "not submitted: " + checked.report
        try:
            job_id = jobs(cluster).submit(checked.cfg)
        except Exception as error:  # noqa: BLE001 - an unreachable cluster is said on the board
            return "", f"not submitted: the cluster at {cluster} did not take the job ({error})"
        outputs[job_id] = make_plan(checked.cfg, base_dir).output_dir
        return job_id, f"submitted **{job_id}** to {cluster}"

    def on_stop(job_id: str, cluster: str) -> str:
        return f"stop asked of {job_id}" if job_id and jobs(cluster).stop(job_id) else "no running job to stop"

    def on_tick(job_id: str, cluster: str):
        """The job's status, log and curve every 2 s: no config is checked again here."""
        status, log = "no job yet", ""
        if job_id:
            try:
                status, log = jobs(cluster).status(job_id), jobs(cluster).logs(job_id)
            except Exception as error:  # noqa: BLE001 - a cluster gone away is said on the board, the next tick retries
                status = f"the cluster at {cluster} does not answer ({type(error).__name__})"
        points = loss_points(outputs[job_id]) if job_id in outputs else []
        frame = pd.DataFrame(points or [], columns=["step", "value", "series"])
        return f"job **{job_id or '-'}**: {status}", log, frame

    def on_checkpoints(text: str) -> str:
        checked = check_text(text, base_dir)
        return checkpoints_text(checked.cfg, base_dir) if checked.cfg else checked.report

    def on_chat(message: str, history: list[dict[str, str]], text: str):
        from inference.commands import open_engine
        from inference.engine import Conversation, Sampling

        try:
            cfg = validate_config(yaml.safe_load(text) or {}, source="the editor", purpose="infer")
            cfg = with_absolute_paths(cfg, base_dir)
            key = cfg.model_dump_json()
            engines[key] = engines.get(key) or open_engine(cfg, None, "the editor")
            turns = [{"role": m["role"], "content": m["content"]} for m in history] + [
                {"role": "user", "content": message}]  # fmt: skip
            reply = engines[key].chat(Conversation(turns, None, None), Sampling.from_config(cfg))[0].text
        except LoomError as error:
            reply = f"cannot chat with this run: {error}"
        return "", history + [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]

    keys = sorted(LoomConfig.model_fields)
    with gr.Blocks(title="Loom board") as board:
        gr.Markdown("# Loom board\nCompose a config, check it as you type, run it as a Ray job and follow it.")
        cluster = gr.Textbox(value=address, label="Ray cluster (dashboard address)", elem_id="cluster")
        with gr.Row():
            model = gr.Textbox(label="model (a local folder or hub id)", elem_id="model")
            stage = gr.Dropdown(list(STAGES), label="stage", value="sft", elem_id="stage")
            method = gr.Dropdown(["lora", "freeze", "full"], label="finetuning_type", value="lora")
            dataset = gr.Dropdown(dataset_names(STARTER, base_dir), label="dataset", elem_id="dataset")
        with gr.Row():
            with gr.Column(scale=3):
                editor = gr.Textbox(value=STARTER, lines=22, label="config (YAML)", elem_id="config")
                with gr.Row():
                    submit = gr.Button("Submit as a Ray job", variant="primary", elem_id="submit")
                    stop = gr.Button("Stop", elem_id="stop")
                    resume = gr.Button("Resume (submit again)", elem_id="resume")
            with gr.Column(scale=2):
                report = gr.Markdown(check_text(STARTER, base_dir).report, elem_id="report")
                lookup = gr.Dropdown(keys, value="learning_rate", label="a key's doc (type to search)", elem_id="key")
                doc = gr.Markdown(key_doc("learning_rate"), elem_id="doc")
        job_id = gr.Textbox(label="job id", interactive=False, elem_id="job_id")
        said = gr.Markdown(elem_id="said")
        status = gr.Markdown(elem_id="status")
        curve = gr.LinePlot(x="step", y="value", color="series", label="loss", elem_id="curve")
        log = gr.Textbox(label="job log", lines=12, max_lines=12, elem_id="log")
        with gr.Accordion("checkpoints", open=False):
            show = gr.Button("List checkpoints", elem_id="list")
            listing = gr.Markdown(elem_id="checkpoints")
        with gr.Accordion("chat with the trained model", open=False):
            chat = gr.Chatbot(elem_id="chat")
            message = gr.Textbox(label="message", elem_id="message")
        editor.change(on_edit, editor, report)
        for picker, key in ((model, "model_name_or_path"), (stage, "stage"), (method, "finetuning_type"),
                            (dataset, "dataset")):  # fmt: skip
            picker.input(lambda value, text, key=key: with_key(text, key, value), [picker, editor], editor)
        lookup.change(key_doc, lookup, doc)
        submit.click(on_submit, [editor, cluster], [job_id, said])
        resume.click(on_submit, [editor, cluster], [job_id, said])
        stop.click(on_stop, [job_id, cluster], said)
        gr.Timer(2).tick(on_tick, [job_id, cluster], [status, log, curve])
        show.click(on_checkpoints, editor, listing)
        message.submit(on_chat, [message, chat, editor], [message, chat])
    return board


def serve(address: str | None = None, base_dir: str | None = None, port: int | None = None) -> None:
    """Launch on GRADIO_SERVER_NAME (default 127.0.0.1, or [::] with GRADIO_IPV6), GRADIO_SERVER_PORT (7860),
    GRADIO_ROOT_PATH, and GRADIO_SHARE (a public gradio.live link: needs the internet)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise LoomError("loom board needs Gradio: pip install 'loom[board]'")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or "http://127.0.0.1:8265"
    host = os.environ.get("GRADIO_SERVER_NAME") or ("[::]" if enabled(os.environ, "GRADIO_IPV6") else "127.0.0.1")
    port = port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    board = build(address, base_dir or os.getcwd())
    print(f"loom board: http://{host}:{port} (Ray jobs at {address})", flush=True)
    board.launch(server_name=host, server_port=port, root_path=os.environ.get("GRADIO_ROOT_PATH") or None,
                 share=enabled(os.environ, "GRADIO_SHARE"), quiet=True)  # fmt: skip
