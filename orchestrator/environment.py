"""The environment-variable registry: every variable of LLaMA-Factory's surface, what Loom does with it, where.

One pure table, like the config fields: docs/FEATURES.md lists it (generated), and a test checks that each variable
marked `works` is read by the module named. Pure: no Ray, no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .console import verbosity_problems
from .errors import ConfigError, Problem
from .support import Support


@dataclass(frozen=True)
class EnvVar:
    name: str
    scope: str  # the seed's scope: API, General, Torchrun, Log, Web UI, Setting
    support: Support
    doc: str  # what it does in Loom (works), or what it will mean on Ray (not yet / refused)
    read_by: str = ""  # the module that reads it (works), relative to the repository root; "" where Ray reads it


_WORKS, _NOT_YET, _REFUSED = Support.WORKS, Support.NOT_YET, Support.REFUSED
_TORCHRUN = "refused: Loom starts no torchrun, Ray Train places the workers and picks the rendezvous; "
_NPU = "refused: Loom has no NPU (Ascend) support."

ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar("API_HOST", "API", _WORKS, "Address `loom api` and `loom serve` listen on.", "inference/api.py"),
    EnvVar("API_PORT", "API", _WORKS, "Port of `loom api` and `loom serve`.", "inference/api.py"),
    EnvVar("API_KEY", "API", _WORKS, "Bearer key the API asks of every request (401 without it).", "inference/api.py"),
    EnvVar("API_MODEL_NAME", "API", _WORKS, "Model name the API answers to and lists.", "inference/api.py"),
    EnvVar("API_VERBOSE", "API", _WORKS, "0 turns off the API's (and Serve's) access logs.", "inference/api.py"),
    EnvVar("FASTAPI_ROOT_PATH", "API", _WORKS, "Root path of the API behind a proxy.", "inference/api.py"),
    EnvVar(
        "MAX_CONCURRENT",
        "API",
        _WORKS,
        "Requests generated at once per API process or Serve replica.",
        "inference/api.py",
    ),  # fmt: skip
    EnvVar(
        "DISABLE_VERSION_CHECK",
        "General",
        _WORKS,
        "1 skips the start-up check that the installed torch, ray, transformers, peft, trl, ... meet Loom's "
        "requirements (a mismatch is refused, naming the package, before anything starts).",
        "orchestrator/environment.py",
    ),  # fmt: skip
    EnvVar(
        "FORCE_CHECK_IMPORTS",
        "General",
        _WORKS,
        "As in LLaMA-Factory: with trust_remote_code, transformers' check that each package a model's own code "
        "imports is installed is skipped unless this is 1 (a GPU-only import in a branch never run stops nothing).",
        "orchestrator/environment.py",
    ),
    EnvVar(
        "ALLOW_EXTRA_ARGS",
        "General",
        _WORKS,
        "1: a config key Loom does not know is dropped with a warning on stderr (naming it, with the closest known "
        "key) instead of refused; every other check still applies.",
        "orchestrator/config/loader.py",
    ),  # fmt: skip
    EnvVar(
        "LLAMAFACTORY_VERBOSITY",
        "General",
        _WORKS,
        "Console level (debug, info, warning, error) in every "
        "process of the job; LOOM_VERBOSITY wins when both are set.",
        "orchestrator/console.py",
    ),  # fmt: skip
    EnvVar(
        "USE_MODELSCOPE_HUB",
        "General",
        _WORKS,
        "Datasets: an entry's ms_hub_url is used before its hf_hub_url (needs the modelscope package). "
        "Models: a hub id is refused while it is on (ModelScope models are not loaded); give a local folder.",
        "orchestrator/data/registry.py",
    ),  # fmt: skip
    EnvVar(
        "USE_OPENMIND_HUB",
        "General",
        _WORKS,
        "Datasets: an entry's om_hub_url is used before its hf_hub_url (needs the openmind package). "
        "Models: a hub id is refused while it is on (Modelers (OpenMind) models are not loaded); give a local folder.",
        "orchestrator/data/registry.py",
    ),  # fmt: skip
    EnvVar(
        "USE_RAY",
        "General",
        _WORKS,
        "Loom always runs on Ray: USE_RAY=1 is what it does, USE_RAY=0 is refused.",
        "orchestrator/environment.py",
    ),  # fmt: skip
    EnvVar(
        "RECORD_VRAM",
        "General",
        _WORKS,
        "Every rank's peak device memory (memory_peak_gb) in each logged line.",
        "workers/loop.py",
    ),  # fmt: skip
    EnvVar(
        "OPTIM_TORCH",
        "General",
        _WORKS,
        "On unless 0, as in LLaMA-Factory: every worker gets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True and "
        "TORCH_NCCL_AVOID_RECORD_STREAMS=1 (values set on the driver win).",
        "orchestrator/launch.py",
    ),
    EnvVar("NPU_JIT_COMPILE", "General", _REFUSED, "JIT compilation on Ascend NPUs. " + _NPU),
    EnvVar(
        "CUDA_VISIBLE_DEVICES",
        "General",
        _WORKS,
        "Honoured by Ray: an embedded cluster offers only the GPUs it "
        "names, and Ray sets it in each worker to that worker's GPUs.",
    ),  # fmt: skip
    EnvVar("ASCEND_RT_VISIBLE_DEVICES", "General", _REFUSED, "NPU selection. " + _NPU),
    EnvVar("FORCE_TORCHRUN", "Torchrun", _REFUSED, _TORCHRUN + "every Loom run is launched through Ray."),
    EnvVar("MASTER_ADDR", "Torchrun", _REFUSED, _TORCHRUN + "join a cluster with RAY_ADDRESS or `ray job submit`."),
    EnvVar("MASTER_PORT", "Torchrun", _REFUSED, _TORCHRUN + "join a cluster with RAY_ADDRESS or `ray job submit`."),
    EnvVar(
        "NNODES",
        "Torchrun",
        _REFUSED,
        _TORCHRUN + "on Ray: ray_num_workers = NNODES x NPROC_PER_NODE, on a cluster of NNODES nodes.",
    ),  # fmt: skip
    EnvVar("NODE_RANK", "Torchrun", _REFUSED, _TORCHRUN + "Ray Train gives each worker its rank."),
    EnvVar(
        "NPROC_PER_NODE",
        "Torchrun",
        _REFUSED,
        _TORCHRUN + "on Ray: ray_num_workers (x NNODES) and resources_per_worker GPU: 1.",
    ),  # fmt: skip
    EnvVar(
        "WANDB_DISABLED", "Log", _WORKS, "true takes wandb out of report_to (and of `all`).", "orchestrator/trackers.py"
    ),  # fmt: skip
    EnvVar(
        "WANDB_PROJECT", "Log", _WORKS, "The W&B project of report_to: wandb (default loom).", "workers/trackers.py"
    ),
    EnvVar(
        "WANDB_API_KEY",
        "Log",
        _WORKS,
        "W&B login for report_to: wandb; without it (or `wandb login`) the "
        "driver refuses wandb unless WANDB_MODE=offline.",
        "orchestrator/trackers.py",
    ),  # fmt: skip
    EnvVar(
        "GRADIO_SHARE",
        "Web UI",
        _WORKS,
        "1: `loom board` also opens a public gradio.live link (needs the internet).",
        "orchestrator/board.py",
    ),
    EnvVar(
        "GRADIO_SERVER_NAME",
        "Web UI",
        _WORKS,
        "The address `loom board` listens on (default 127.0.0.1: this machine only).",
        "orchestrator/board.py",
    ),
    EnvVar(
        "GRADIO_SERVER_PORT",
        "Web UI",
        _WORKS,
        "The port of `loom board` (default 7860; --port wins).",
        "orchestrator/board.py",
    ),
    EnvVar(
        "GRADIO_ROOT_PATH", "Web UI", _WORKS, "The root path of `loom board` behind a proxy.", "orchestrator/board.py"
    ),
    EnvVar(
        "GRADIO_IPV6",
        "Web UI",
        _WORKS,
        "1: `loom board` listens on [::] (every IPv6 and IPv4 address) unless GRADIO_SERVER_NAME is set.",
        "orchestrator/board.py",
    ),
    EnvVar(
        "ENABLE_SHORT_CONSOLE",
        "Setting",
        _WORKS,
        "`lmf` is `loom` under LLaMA-Factory's short name while this is on (the default); 0 turns `lmf` off.",
        "orchestrator/cli.py",
    ),  # fmt: skip
)


def enabled(env: Mapping[str, str], name: str, default: str = "0") -> bool:
    """A switch as LLaMA-Factory reads one: true, 1 or y (any case)."""
    return env.get(name, default).strip().lower() in ("true", "1", "y", "yes", "on")


def _set(env: Mapping[str, str], name: str) -> bool:
    return bool(env.get(name, "").strip())


_SWITCHES = ("FORCE_TORCHRUN", "NPU_JIT_COMPILE")  # refused when on
_HUBS = ("USE_MODELSCOPE_HUB", "USE_OPENMIND_HUB")


def other_model_hub(env: Mapping[str, str] = os.environ) -> str | None:
    """The hub variable that is on, if any: a model given by a hub id is then refused (Hugging Face only)."""
    return next((name for name in _HUBS if enabled(env, name)), None)


_VALUES = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "ASCEND_RT_VISIBLE_DEVICES")


def environment_problems(env: Mapping[str, str] = os.environ) -> list[Problem]:
    """Every variable of the surface that is set to something Loom cannot do, with what to do instead."""
    docs = {var.name: var.doc for var in ENVIRONMENT}
    problems = [Problem(name, f"given {env[name]!r}; {docs[name]}") for name in _SWITCHES if enabled(env, name)]
    problems += [Problem(name, f"given {env[name]!r}; {docs[name]}") for name in _VALUES if _set(env, name)]
    if _set(env, "NNODES") or _set(env, "NPROC_PER_NODE"):
        nodes, per_node = env.get("NNODES", "1").strip() or "1", env.get("NPROC_PER_NODE", "").strip() or "1"
        if nodes.isdigit() and per_node.isdigit():
            workers = int(nodes) * int(per_node)
            problems.append(Problem("ray_num_workers", f"NNODES x NPROC_PER_NODE: on Ray, ray_num_workers: {workers} "
                                                       f"with resources_per_worker: {{GPU: 1}}, on a Ray cluster of "
                                                       f"{nodes} node(s) (clusters/ has KubeRay manifests)"))  # fmt: skip
    if _set(env, "USE_RAY") and not enabled(env, "USE_RAY"):
        problems.append(Problem("USE_RAY", f"given {env['USE_RAY']!r}; Loom always runs on Ray (unset it or set 1)"))
    return problems


def version_problems(requirements: Iterable[str], installed: Callable[[str], str | None]) -> list[Problem]:
    """Each requirement (as pip writes them, extras' ones skipped) that the installed version does not meet."""
    from packaging.requirements import Requirement

    problems = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        version = installed(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            given = f"{version} is installed" if version else "it is not installed"
            problems.append(Problem(requirement.name, f"Loom needs {requirement.name}{requirement.specifier}, and "
                                                      f"{given}: pip install -c constraints.txt -e . (or "
                                                      "DISABLE_VERSION_CHECK=1 to run anyway)"))  # fmt: skip
    return problems


def installed_version_problems(env: Mapping[str, str] = os.environ) -> list[Problem]:
    """LLaMA-Factory's start-up version check, against Loom's own requirements (about 50 ms);
    DISABLE_VERSION_CHECK=1 skips it."""
    import importlib.metadata as metadata

    if enabled(env, "DISABLE_VERSION_CHECK"):
        return []
    try:
        requirements = metadata.requires("loom") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return []

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return version_problems(requirements, installed)


def check_environment(env: Mapping[str, str] = os.environ) -> None:
    """Every problem of the driver's environment, reported together before anything starts."""
    problems = verbosity_problems() + environment_problems(env) + installed_version_problems(env)
    if problems:
        raise ConfigError(problems, source="the environment")


_TRANSFORMERS_CHECK: list = []  # transformers' own check_imports, kept while it is replaced


def remote_code_imports(trust_remote_code: bool, env: Mapping[str, str] = os.environ) -> None:
    """LLaMA-Factory's FORCE_CHECK_IMPORTS, applied before a remote-code model or tokenizer is loaded: by default
    transformers' check that every package a remote-code file imports is installed is skipped (a GPU-only import
    such as flash_attn inside a branch that never runs here no longer stops the load); FORCE_CHECK_IMPORTS=1 keeps it."""
    if not trust_remote_code:
        return
    from transformers import dynamic_module_utils as modules

    if enabled(env, "FORCE_CHECK_IMPORTS"):
        if _TRANSFORMERS_CHECK:
            modules.check_imports = _TRANSFORMERS_CHECK.pop()
    elif not _TRANSFORMERS_CHECK:
        _TRANSFORMERS_CHECK.append(modules.check_imports)
        modules.check_imports = modules.get_relative_imports
