"""The environment-variable registry: every variable of LLaMA-Factory's surface, what Loom does with it, where.

One pure table, like the config fields: docs/FEATURES.md lists it (generated), and a test checks that each variable
marked `works` is read by the module named. Pure: no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config.fields import Support


@dataclass(frozen=True)
class EnvVar:
    name: str
    scope: str  # the seed's scope: API, General, Torchrun, Log, Web UI, Setting
    support: Support
    doc: str  # what it does in Loom (works), or what it will mean on Ray (not yet / refused)
    read_by: str = ""  # the module that reads it (works), relative to the repository root; "" where Ray reads it


_WORKS, _NOT_YET = Support.WORKS, Support.NOT_YET
_TRACKERS = "trackers are not wired yet (issue 13)"
_BOARD = "`loom board` is not built yet (issue 13)"
_TORCHRUN = ("Loom starts no torchrun: Ray Train places the workers and picks the rendezvous itself; "
             "the mapping onto ray_num_workers or a refusal is not wired yet (issue 13)")  # fmt: skip

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
        _NOT_YET,
        "Skip the dependency version check at start: Loom pins "
        "its versions in constraints.txt and runs no check, so there is nothing to skip yet.",
    ),  # fmt: skip
    EnvVar("FORCE_CHECK_IMPORTS", "General", _NOT_YET, "Check optional imports even when disabled: not wired yet."),
    EnvVar(
        "ALLOW_EXTRA_ARGS",
        "General",
        _NOT_YET,
        "Unknown keys dropped with a warning instead of refused: not "
        "wired yet (issue 13); unknown keys are always refused today.",
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
        _NOT_YET,
        "Models and datasets from ModelScope: other hubs than Hugging Face are not supported yet.",
    ),  # fmt: skip
    EnvVar(
        "USE_OPENMIND_HUB",
        "General",
        _NOT_YET,
        "Models and datasets from Modelers (OpenMind): other hubs than Hugging Face are not supported yet.",
    ),  # fmt: skip
    EnvVar(
        "USE_RAY",
        "General",
        _NOT_YET,
        "Loom always runs on Ray (USE_RAY=1 is what it does); refusing USE_RAY=0 is not wired yet.",
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
        _NOT_YET,
        "The seed's switch for a particular PyTorch optimisation: Loom does not read it yet.",
    ),
    EnvVar("NPU_JIT_COMPILE", "General", _NOT_YET, "JIT compilation on Ascend NPUs: Loom has no NPU support."),
    EnvVar(
        "CUDA_VISIBLE_DEVICES",
        "General",
        _WORKS,
        "Honoured by Ray: an embedded cluster offers only the GPUs it "
        "names, and Ray sets it in each worker to that worker's GPUs.",
    ),  # fmt: skip
    EnvVar("ASCEND_RT_VISIBLE_DEVICES", "General", _NOT_YET, "NPU selection: Loom has no NPU support."),
    EnvVar("FORCE_TORCHRUN", "Torchrun", _NOT_YET, _TORCHRUN),
    EnvVar("MASTER_ADDR", "Torchrun", _NOT_YET, _TORCHRUN),
    EnvVar("MASTER_PORT", "Torchrun", _NOT_YET, _TORCHRUN),
    EnvVar("NNODES", "Torchrun", _NOT_YET, _TORCHRUN),
    EnvVar("NODE_RANK", "Torchrun", _NOT_YET, _TORCHRUN),
    EnvVar("NPROC_PER_NODE", "Torchrun", _NOT_YET, _TORCHRUN),
    EnvVar("WANDB_DISABLED", "Log", _NOT_YET, _TRACKERS),
    EnvVar("WANDB_PROJECT", "Log", _NOT_YET, _TRACKERS),
    EnvVar("WANDB_API_KEY", "Log", _NOT_YET, _TRACKERS),
    EnvVar("GRADIO_SHARE", "Web UI", _NOT_YET, _BOARD),
    EnvVar("GRADIO_SERVER_NAME", "Web UI", _NOT_YET, _BOARD),
    EnvVar("GRADIO_SERVER_PORT", "Web UI", _NOT_YET, _BOARD),
    EnvVar("GRADIO_ROOT_PATH", "Web UI", _NOT_YET, _BOARD),
    EnvVar("GRADIO_IPV6", "Web UI", _NOT_YET, _BOARD),
    EnvVar(
        "ENABLE_SHORT_CONSOLE",
        "Setting",
        _NOT_YET,
        "LLaMA-Factory's short `lmf` command: Loom's command is "
        "`loom`; an `lmf` alias that this variable switches is not built yet (issue 13).",
    ),  # fmt: skip
)
