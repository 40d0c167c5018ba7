"""What the console shows: Loom's own lines, and the libraries' only when asked for.

`LOOM_VERBOSITY` (or LLaMA-Factory's `LLAMAFACTORY_VERBOSITY` when it is unset) is one of debug, info, warning
(the default) or error:
- debug / info: every library line comes back (Ray Train's reports, Ray Data's progress, transformers' bars);
- warning: Loom's lines and the libraries' warnings, less the known false alarms below;
- error: Loom's lines and the libraries' errors only.

`quiet_process` applies it to one process. The driver calls it, and every process of a Loom job runs it at start as
Ray's `worker_process_setup_hook`: training workers, Ray Train's controller, Ray Data's tasks and coordinators, model
actors. Deprecations in Loom's own code are fixed where they are raised, not hidden here. The warnings filtered here
are false alarms of third-party code that Loom cannot change (each says why).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

from .errors import Problem

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip
VARIABLES = ("LOOM_VERBOSITY", "LLAMAFACTORY_VERBOSITY")
SETUP_HOOK = "orchestrator.console.quiet_process"
RAY_DATA_LOGGING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


def _given() -> tuple[str, str] | None:
    for name in VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return None


def verbosity_problems() -> list[Problem]:
    given = _given()
    if given and given[1].lower() not in LEVELS:
        return [Problem(given[0], f"given {given[1]!r}; one of debug, info, warning, error")]
    return []


def level() -> int:
    """The libraries' logging level the environment asks for (warning when unset or unreadable)."""
    given = _given()
    return LEVELS.get(given[1].lower(), logging.WARNING) if given else logging.WARNING


def libraries_verbose() -> bool:
    return level() <= logging.INFO


# (logger, level at most shown) for lines that are the libraries' bookkeeping, not news for the user.
CHATTY_LOGGERS = ("ray.train", "ray.data", "ray.tune", "ray.serve", "transformers", "datasets", "DeepSpeed")
FALSE_ALARMS = (
    # DeepSpeed's auto-detection on a machine without CUDA: CPU is the right accelerator there.
    ("DeepSpeed", "Setting accelerator to CPU"),
    # Ray Data says once per process that it draws no bars: Loom turns them off when stderr is not a terminal.
    ("ray.data._internal.progress", "Progress bars"),
    # Ray's own token-authentication notice on a cluster Loom starts (docs/SECURITY.md says it is on).
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled"),
)


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_process() -> None:
    """Apply the verbosity to this process (idempotent)."""
    wanted = level()
    if wanted <= logging.INFO:
        return
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(wanted)
    for name, text in FALSE_ALARMS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
            logger.addFilter(_Drop(text))
    # PEFT reads `model.is_gradient_checkpointing`, which transformers 5 deprecates in favour of
    # is_activation_checkpointing: a FutureWarning per model load that no Loom call raises.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Ray Train's own dataset manager passes an option Ray Data deprecates (Ray's code, not Loom's).
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions.exclude_resources` is deprecated")
    # Ray Data configures its loggers when imported, from this file when set: its console at warnings.
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING)
    # Ray Train names the logger of its per-report line by its file's path, outside the "ray.train" tree.
    ray_spec = importlib.util.find_spec("ray")  # found, not imported: `loom plan` and friends stay light
    if ray_spec and ray_spec.origin:
        package = os.path.dirname(ray_spec.origin)
        logging.getLogger(os.path.join(package, "train", "v2", "_internal", "execution", "context.py")).setLevel(wanted)
    # transformers reads these when it is imported: set here, a Ray Data task that never imports it pays nothing.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", logging.getLevelName(wanted).lower())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # weight loading and saving bars
    os.environ.setdefault("WANDB_SILENT", "true")  # wandb's banner and run summary (report_to: wandb)
    if "transformers" in sys.modules:  # already imported: tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity(wanted)
