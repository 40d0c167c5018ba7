"""The experiment-tracker registry: which trackers `report_to` may name, what each needs, and the driver's checks.

One pure table (no Ray, no torch, no tracker imported): the driver's check reads it to refuse a tracker that
cannot start before any worker starts, and rank 0's adapters (workers/trackers.py) are keyed by the same names.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from .environment import enabled
from .errors import Problem
from .suggest import did_you_mean


@dataclass(frozen=True)
class TrackerSpec:
    name: str
    module: str  # what the worker imports
    package: str  # what to pip install


TRACKERS: dict[str, TrackerSpec] = {
    spec.name: spec
    for spec in (
        TrackerSpec("wandb", "wandb", "wandb"),
        TrackerSpec("tensorboard", "tensorboard", "tensorboard"),
        TrackerSpec("mlflow", "mlflow", "mlflow-skinny"),
        TrackerSpec("swanlab", "swanlab", "swanlab[dashboard]"),
    )
}

EXTRA = "pip install 'loom[trackers]'"  # installs every tracker above
_OFF = ("none", "")


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name].module) is not None


def _names(report_to: str | list) -> list[str]:
    values = report_to if isinstance(report_to, list) else str(report_to).split(",")
    return [str(v).strip().lower() for v in values if str(v).strip().lower() not in _OFF]


def requested(report_to: str | list, use_swanlab: bool, env: Mapping[str, str] = os.environ) -> list[str]:
    """The trackers a run starts, in registry order: `report_to`'s names (`all`: every installed one), plus
    swanlab when `use_swanlab` is set; `WANDB_DISABLED` takes wandb out, as in transformers."""
    names = set(_names(report_to))
    if "all" in names:
        names = (names - {"all"}) | {name for name in TRACKERS if installed(name)}
    if use_swanlab:
        names.add("swanlab")
    if enabled(env, "WANDB_DISABLED"):
        names.discard("wandb")
    return [name for name in TRACKERS if name in names]


def wandb_offline(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("WANDB_MODE", "").strip().lower() in ("offline", "disabled") or enabled(env, "WANDB_OFFLINE")


def _wandb_logged_in(env: Mapping[str, str]) -> bool:
    """An API key in the environment, or the one `wandb login` stores in ~/.netrc."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(env.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(uri: str, timeout_s: float = 3.0) -> bool:
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _mlflow_problem(env: Mapping[str, str]) -> str | None:
    uri = env.get("MLFLOW_TRACKING_URI", "")
    scheme = urlparse(uri).scheme if uri else "file"
    if scheme in ("file", "") or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):  # a path (C:\ on Windows)
        return None
    if scheme in ("http", "https"):
        return None if _reachable(uri) else f"MLFLOW_TRACKING_URI {uri!r} does not answer (checked before training)"
    if scheme in ("sqlite", "postgresql", "mysql", "mssql") and importlib.util.find_spec("sqlalchemy") is None:
        return (f"MLFLOW_TRACKING_URI {uri!r} needs a database store, which mlflow-skinny does not have: "
                "install the full `mlflow`, or use a file store or an MLflow server (http://...)")  # fmt: skip
    return None


def tracker_problems(report_to: str | list, use_swanlab: bool, swanlab_mode: str, swanlab_api_key: str | None,
                     env: Mapping[str, str] = os.environ) -> list[Problem]:  # fmt: skip
    """Every reason a requested tracker could not start, found on the driver before any worker starts."""
    known = set(TRACKERS) | {"all", "none"}
    unknown = [name for name in _names(report_to) if name not in known]
    problems = [Problem("report_to", f"unknown tracker {name!r}; known: {', '.join(sorted(known))}"
                                     f"{did_you_mean(name, known)}") for name in unknown]  # fmt: skip
    for name in requested([n for n in _names(report_to) if n in known], use_swanlab, env):
        key = "use_swanlab" if name == "swanlab" and "swanlab" not in _names(report_to) else "report_to"
        if not installed(name):
            problems.append(Problem(key, f"{name}: the package is not installed ({EXTRA}, or pip install "
                                         f"{TRACKERS[name].package!r})"))  # fmt: skip
        elif name == "wandb" and not wandb_offline(env) and not _wandb_logged_in(env):
            problems.append(Problem(key, "wandb: no WANDB_API_KEY and no `wandb login`; set one, or WANDB_MODE="
                                         "offline to write output_dir/wandb, or WANDB_DISABLED=true"))  # fmt: skip
        elif name == "mlflow" and (problem := _mlflow_problem(env)):
            problems.append(Problem(key, f"mlflow: {problem}"))
        elif name == "swanlab":
            problems += _swanlab_problems(key, swanlab_mode, swanlab_api_key, env)
    return problems


def _swanlab_problems(key: str, mode: str, api_key: str | None, env: Mapping[str, str]) -> list[Problem]:
    mode = env.get("SWANLAB_MODE", mode)
    if mode == "local" and importlib.util.find_spec("swanboard") is None:
        return [Problem(key, "swanlab local mode needs its dashboard package: pip install 'swanlab[dashboard]'")]
    if mode == "cloud" and not (api_key or env.get("SWANLAB_API_KEY") or _swanlab_logged_in(env)):
        return [Problem("swanlab_api_key", "swanlab cloud mode needs an API key (swanlab_api_key, SWANLAB_API_KEY "
                                           "or `swanlab login`), or swanlab_mode: local")]  # fmt: skip
    return []


def _swanlab_logged_in(env: Mapping[str, str]) -> bool:
    """`swanlab login` saves its key in a .netrc under ./.swanlab or SWANLAB_ROOT (SWANLAB_SAVE_DIR, ~/.swanlab)."""
    home = env.get("SWANLAB_ROOT") or env.get("SWANLAB_SAVE_DIR") or os.path.join(os.path.expanduser("~"), ".swanlab")
    return any(os.path.isfile(os.path.join(folder, ".netrc")) for folder in (".swanlab", home))


def tracker_metrics(record: Mapping[str, object]) -> dict[str, float]:
    """A trainer_log.jsonl line as the trackers name it (as transformers' callbacks do): `eval_<name>` becomes
    `eval/<name>` (`eval_<dataset>_loss` -> `eval/<dataset>_loss`), every other number `train/<name>`, the step
    `train/global_step`; a per-rank list (memory_peak_gb) one value per rank. The line's wall-clock `time` and
    what is not a number are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "time":  # the trackers stamp their own
            continue
        name = "train/global_step" if key == "step" else (
            f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}")  # fmt: skip
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[name] = value
        elif isinstance(value, list):
            out.update({f"{name}/rank_{rank}": v for rank, v in enumerate(value) if isinstance(v, int | float)})
    return out


def flat_params(config: Mapping[str, object], limit: int = 6000) -> dict[str, str]:
    """A config as flat string parameters (MLflow's kind): nested mappings joined by `.`, values cut at `limit`."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in flat_params(value, limit).items()})
        else:
            out[key] = str(value)[:limit]
    return out
